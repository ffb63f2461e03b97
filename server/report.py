"""`fedseg report RUN_DIR`: one HTML page that shows a run at a glance: Dice, ε, loss and round time per
site and round, who dropped out or was rejected, the final table, and (when the data is at hand, as in
a simulation) the global model's masks on a few validation slices."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common.config import class_names  # noqa: E402
from common.errors import FedsegError  # noqa: E402
from common.metrics import class_metrics, foreground_dice  # noqa: E402
from common.model import load_global_model  # noqa: E402
from common.overlays import draw_overlays, most_labelled_slices  # noqa: E402
from server.run_record import RunHistory, final_site_table, history_number  # noqa: E402

STATUS_COLOURS = {"ok": "#2ca02c", "rejected": "#d62728", "budget_exhausted": "#ff7f0e", "train_failed": "#7f7f7f",
                  "evaluate_failed": "#7f7f7f", "no_reply": "#000000"}


class ReportError(FedsegError):
    """No report can be drawn: the folder holds no run, or the data root no site."""


def _line_plot(history: RunHistory, key: str, title: str, ylabel: str, path: Path, aggregate: bool = False,
               target: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
    for site, (rounds, values) in sorted(history.site_series(key).items()):
        ax.plot(rounds, values, marker="o", markersize=3, label=site)
    if aggregate:  # the foreground Dice aggregated over sites, per validated round
        done = history.validated_rounds()
        ax.plot([r.round for r in done], [r.dice for r in done], color="black", linewidth=2.2, label="all sites")
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _durations(history: RunHistory, path: Path) -> Path:
    durations = history.durations()
    fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
    ax.bar(list(durations), list(durations.values()), color="#1f77b4")
    ax.set(title="round wall time", xlabel="round", ylabel="seconds")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _participation(history: RunHistory, path: Path) -> Path:
    """Rounds × sites, coloured by what each site's training did: dropouts and rejections stand out."""
    sites = history.site_names()
    rounds = [r for r in history.rounds if r.round > 0]
    fig, ax = plt.subplots(figsize=(5.2, 0.6 + 0.45 * max(1, len(sites))), layout="constrained")
    for x, r in enumerate(rounds):
        for y, site in enumerate(sites):
            status = r.sites.get(site, {}).get("status", "absent")
            ax.add_patch(plt.Rectangle((x, y), 0.92, 0.85, color=STATUS_COLOURS.get(status, "#dddddd")))
    ax.set_xlim(0, max(1, len(rounds)))
    ax.set_ylim(0, max(1, len(sites)))
    ax.set_xticks([x + 0.46 for x in range(len(rounds))], [str(r.round) for r in rounds])
    ax.set_yticks([y + 0.42 for y in range(len(sites))], sites)
    ax.set(title="training per round: who took part", xlabel="round")
    seen = {s.get("status", "absent") for r in rounds for s in r.sites.values()}
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for s, c in STATUS_COLOURS.items() if s in seen]
    ax.legend(handles, [s for s in STATUS_COLOURS if s in seen], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _overlays(run_dir: Path, site_dirs: Sequence[str], path: Path, per_site: int = 2) -> Path | None:
    """Truth and prediction side by side on one patient per site, on its slices with the most
    foreground (drawn only where the data is: a simulation's researcher, or at the site itself)."""
    from common.dataset import Preprocessing, load_site
    from common.inference import native_labels

    global_model = load_global_model(run_dir)
    names = class_names(global_model.config)
    panels = []
    for folder in site_dirs:
        data = load_site(folder, tuple(names), Preprocessing.from_config(global_model.config), float(global_model.config["val-fraction"]))
        if not data.validation:
            continue
        volume = data.validation[0]
        pred = native_labels(global_model.model, volume.image, volume.mask.shape[1:], data.preprocessing.image_size, torch.device("cpu"))
        dice = foreground_dice(class_metrics(pred, volume.mask, len(names), volume.spacing)["dice"])
        for k in most_labelled_slices(volume.mask, per_site):
            panels.append((volume.image[k, 0], volume.mask[k], f"{volume.patient_id} truth"))
            panels.append((volume.image[k, 0], pred[k], f"prediction (volume Dice {dice:.2f})"))
    if not panels:
        return None
    return draw_overlays(panels, names, path, f"global model round {global_model.round}, one patient per site", columns=4)


def write_report(run_dir: str | Path, site_dirs: Sequence[str] = ()) -> Path:
    """RUN_DIR/report.html and its PNGs (RUN_DIR/report/); overlays only when `site_dirs` are given."""
    run_dir = Path(run_dir)
    history = RunHistory.read(run_dir)
    config = history.config
    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    target = history_number(config.get("target-epsilon"))
    plots = [
        _line_plot(history, "val_dice", "validation Dice (foreground mean)", "Dice", folder / "dice.png", aggregate=True),
        _line_plot(history, "epsilon", "patient-level privacy spent (each site's ε at its own policy's δ)", "ε", folder / "epsilon.png", target=target),
        _line_plot(history, "noise_multiplier", "DP-SGD noise multiplier (σ) per site", "σ", folder / "noise.png"),
        _durations(history, folder / "durations.png"),
        _participation(history, folder / "participation.png"),
    ]
    overlay = _overlays(run_dir, site_dirs, folder / "overlays.png") if site_dirs else None
    done, last = history.validated_rounds(), history.last_validated()
    final = last.dice if last else math.nan
    dp = "off" if not math.isfinite(target) and history_number(config.get("noise-multiplier")) <= 0 else f"target patient-level ε {target:g}"
    headline = (f"status <b>{html.escape(str(history.status or '?'))}</b>; {len(done) - 1 if done else 0} of "
                f"{config.get('num-server-rounds')} rounds; final foreground Dice <b>{final:.3f}</b> "
                f"(round 0: {done[0].dice if done else math.nan:.3f}); strategy {html.escape(str(config.get('strategy')))}; "
                f"DP {dp}; wall time {history_number(history.wall_time_s):.0f} s")
    events = "".join(f"<li>{html.escape(e.event)}</li>" for e in history.events)
    images = "".join(f'<img src="report/{p.name}" alt="{p.stem}">' for p in plots)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedseg run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1200px}} img{{max-width:49%;margin:2px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child{{text-align:left}}</style>
</head><body><h1>fedseg run {html.escape(run_dir.name)}</h1><p>{headline}</p>
{images}
<h2>Sites, final round</h2>{final_site_table(history).html()}
{"<h2>Events</h2><ul>" + events + "</ul>" if events else ""}
{f'<h2>Predictions on validation patients</h2><img style="max-width:100%" src="report/{overlay.name}" alt="overlays">' if overlay else ""}
</body></html>"""
    path = run_dir / "report.html"
    path.write_text(page)
    return path
