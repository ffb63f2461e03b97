"""`fedseg bench`: is federated + DP training worth it, and what does it cost?

Everything is measured in one run on this machine, so ratios (DP vs non-DP, federated vs pooled) are
read from numbers taken side by side. Federated methods run through `fedseg simulate` (Flower's
simulation engine, the real ServerApp and ClientApp); the pooled and local-only baselines train the
same model with the same code for the same number of optimisation steps: a site does `rounds x
local-epochs` epochs over its own slices in every setting, the pool the same epochs over all slices.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import platform
from queue import Empty
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.site_policy import SitePolicy
from common.config import class_names
from common.dataset import Preprocessing, SiteData, load_site
from common.processes import descendants
from server.run_record import RunHistory, cell, history_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    sites: int
    size: str
    rounds: int
    local_epochs: int
    image_size: int
    batch_size: int
    epsilons: tuple[float, ...]
    scale: tuple[int, ...]
    cost_rounds: int = 2  # rounds for the deployment and scale runs: they measure time, not accuracy
    real_dp: bool = True  # also run the real-scan federation with DP (ε = 8)
    seed: int = 0


PLANS = {
    "quick": Plan(sites=2, size="tiny", rounds=1, local_epochs=1, image_size=32, batch_size=8, epsilons=(8.0,), scale=(2,), cost_rounds=1,
                  real_dp=False),
    "full": Plan(sites=3, size="default", rounds=6, local_epochs=2, image_size=64, batch_size=16, epsilons=(1.0, 3.0, 8.0), scale=(4, 16, 32)),
}
FEDERATED = ("fedavg", "fedprox", "fedadam")


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(command: list[str], log: Path) -> tuple[int, float, float]:
    """Run a command; return its exit code, wall seconds and the peak resident memory (MB) of its
    whole process tree (Ray's workers included), sampled every 0.5 s."""
    started, peak = time.time(), 0
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while proc.poll() is None:
            peak = max(peak, sum(_rss_kb(p) for p in [proc.pid, *descendants(proc.pid)]))
            time.sleep(0.5)
    return proc.returncode, time.time() - started, peak / 1024


def simulate(plan: Plan, label: str, out: Path, cache: Path, *options: str, sites: int | None = None,
             size: str | None = None, data_root: Path | None = None) -> dict[str, Any]:
    """One `fedseg simulate` run; its history plus wall time and peak memory."""
    run_dir = out / "runs" / label
    source = ["--data-root", str(data_root)] if data_root else ["--sites", str(sites or plan.sites), "--size", size or plan.size]
    command = [sys.executable, "-m", "common.cli", "simulate", *source, "--rounds", str(plan.rounds),
               "--local-epochs", str(plan.local_epochs), "--image-size", str(plan.image_size), "--batch-size", str(plan.batch_size),
               "--seed", str(plan.seed), "--cache-dir", str(cache), "--out", str(run_dir),
               "--ledger-dir", str(run_dir / "sites"), *options]  # each benchmark run is its own experiment
    code, wall, peak = run_measured(command, out / "logs" / f"{label}.log")
    if code != 0:
        raise RuntimeError(f"benchmark run {label} failed; see {out / 'logs' / f'{label}.log'}")
    return {"history": RunHistory.read(run_dir), "wall_s": wall, "peak_mb": peak}


def _last_validated(history: RunHistory) -> dict[str, dict[str, Any]]:
    """The site entries of the run's last validated round (a benchmark run always has one)."""
    last = history.last_validated()
    if last is None:
        raise RuntimeError("the benchmark run validated no round")
    return last.sites


def _final_sites(history: RunHistory) -> dict[str, dict[str, Any]]:
    return {name: {"dice": history_number(s.get("val_dice")), "hd95_mm": history_number(s.get("val_hd95_mm")),
                   "dice_per_class": [history_number(d) for d in s.get("val_dice_per_class") or []]}
            for name, s in _last_validated(history).items()}


def _mean(values: list[float]) -> float:
    """Mean of the defined values; NaN (not a warning) when none is, e.g. HD95 of an empty prediction."""
    defined = [v for v in values if math.isfinite(v)]
    return float(np.mean(defined)) if defined else math.nan


def _summary(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over the sites; per class too (the headline Dice averages classes: a lesion that is never
    learned hides behind a good organ)."""
    classes = max((len(s["dice_per_class"]) for s in per_site.values()), default=0)
    return {"per_site": per_site, "mean_dice": _mean([s["dice"] for s in per_site.values()]),
            "mean_hd95_mm": _mean([s["hd95_mm"] for s in per_site.values()]),
            "mean_dice_per_class": [_mean([s["dice_per_class"][c] for s in per_site.values() if c < len(s["dice_per_class"])])
                                    for c in range(classes)]}


SLICES_PER_PATIENT = SitePolicy().slices_per_patient


def _site_data(site_dir: str, config: dict[str, Any]) -> SiteData:
    """A site's patients as a bench run sees them (a fixed split: the bench is the researcher's own)."""
    return load_site(site_dir, tuple(class_names(config)), Preprocessing.from_config(config), float(config["val-fraction"]))


def centralised(plan: Plan, site_dirs: list[str]) -> dict[str, Any]:
    """Pooled (all sites' slices together: the ceiling) and each site alone, non-DP, evaluated on
    every site's validation patients."""
    import torch

    from client.training import evaluate, plan_round, train_round
    from common.config import TrainSettings, run_config
    from common.model import build_model

    config = run_config({"image-size": plan.image_size, "batch-size": plan.batch_size, "seed": plan.seed,
                         "target-epsilon": math.inf, "num-server-rounds": 1, "local-epochs": plan.rounds * plan.local_epochs})
    data = {Path(d).name: _site_data(d, config) for d in site_dirs}
    pooled = SiteData("pooled", [p for d in data.values() for p in d.train], [], None)
    settings = TrainSettings.from_config({**config, "server-round": 1})

    def trained_on(train: SiteData) -> dict[str, Any]:
        torch.manual_seed(plan.seed)
        model = build_model(3)
        started = time.time()
        round_plan = plan_round(settings, len(train.train), settings.delta)
        train_round(model, train.train, settings, round_plan, SLICES_PER_PATIENT, torch.device("cpu"))
        seconds = time.time() - started
        per_site = {}
        for name, site in data.items():
            m = evaluate(model, site, 3, torch.device("cpu"))
            per_site[name] = {"dice": m["dice"], "hd95_mm": m["hd95"],
                              "dice_per_class": [m[f"dice-class{c}"] for c in range(1, len(class_names(config)))]}
        return {**_summary(per_site), "steps": round_plan.steps, "train_s": seconds}

    return {"pooled": trained_on(pooled), "local_only": {name: trained_on(d) for name, d in data.items()}}


def _epoch_cost(private: bool, plan: Plan, site_dir: str, queue: Any) -> None:
    """In a fresh process (spawned): one local epoch, DP or not; its time and peak memory."""
    import torch

    from client.training import plan_round, train_round
    from common.config import TrainSettings, run_config
    from common.model import build_model

    torch.set_num_threads(1)
    config = run_config({"image-size": plan.image_size, "batch-size": plan.batch_size, "num-server-rounds": 1, "local-epochs": 1,
                         "target-epsilon": 8.0 if private else math.inf})
    data = _site_data(site_dir, config)
    before = _rss_kb(os.getpid())
    peak = [before]
    sampling = threading.Event()

    def sample() -> None:  # RSS every 5 ms while training: the peak of training itself, not of loading the data
        while not sampling.is_set():
            peak[0] = max(peak[0], _rss_kb(os.getpid()))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    settings = TrainSettings.from_config({**config, "server-round": 1})
    round_plan = plan_round(settings, len(data.train), settings.delta)
    # A first round pays one-off costs (allocator, vmap tracing, lazy imports); the second is timed.
    train_round(build_model(3), data.train, settings, round_plan, SLICES_PER_PATIENT, torch.device("cpu"))
    started = time.perf_counter()
    train_round(build_model(3), data.train, settings, round_plan, SLICES_PER_PATIENT, torch.device("cpu"))
    seconds = time.perf_counter() - started
    sampling.set()
    sampler.join()
    queue.put({"epoch_s": seconds, "steps": round_plan.steps, "patients": len(data.train), "slices": data.train_slices,
               "peak_rss_mb": peak[0] / 1024, "rss_before_training_mb": before / 1024})


def dp_cost(plan: Plan, site_dir: str) -> dict[str, Any]:
    """DP-SGD vs plain SGD: time per epoch and peak memory, same model, data and thread count."""
    context = multiprocessing.get_context("spawn")
    out = {}
    for private in (False, True):
        queue = context.Queue()
        proc = context.Process(target=_epoch_cost, args=(private, plan, site_dir, queue))
        proc.start()
        measured = None
        while measured is None and (proc.is_alive() or not queue.empty()):
            try:
                measured = queue.get(timeout=1.0)
            except Empty:
                continue
        proc.join(timeout=60)
        if measured is None:
            raise RuntimeError(f"the {'DP' if private else 'SGD'} epoch measurement failed (exit code {proc.exitcode}); see its traceback above")
        out["dp" if private else "no_dp"] = measured
    out["time_ratio"] = out["dp"]["epoch_s"] / out["no_dp"]["epoch_s"]
    growth = {k: out[k]["peak_rss_mb"] - out[k]["rss_before_training_mb"] for k in ("dp", "no_dp")}
    out["memory_ratio"] = growth["dp"] / growth["no_dp"] if growth["no_dp"] >= 1.0 else math.nan  # below 1 MB: noise
    return out


def round_overhead(history: RunHistory) -> dict[str, Any]:
    """Round wall time ÷ the slowest site's own compute in that round's one message: its training
    and its validation of the weights it received (recorded under the previous round)."""
    rounds, ratios = history.by_round(), []
    for number, r in rounds.items():
        received = rounds[number - 1].sites if number - 1 in rounds else {}
        compute = [history_number(s.get("train_seconds")) + _or_zero(received.get(name, {}).get("val_seconds"))
                   for name, s in r.sites.items()]
        compute = [c for c in compute if math.isfinite(c)]
        if number > 0 and compute and r.duration_s is not None:
            ratios.append({"round": number, "round_s": r.duration_s, "slowest_site_compute_s": max(compute),
                           "ratio": r.duration_s / max(compute)})
    return {"rounds": ratios, "mean_ratio": _mean([x["ratio"] for x in ratios])}


def _or_zero(value: Any) -> float:
    number = history_number(value)
    return number if math.isfinite(number) else 0.0


def communication(history: RunHistory) -> dict[str, Any]:
    """Bytes per site per round, as the server measured the serialised messages."""
    down, up = [], []
    for r in history.rounds:
        if r.round == 0:
            continue
        for s in r.sites.values():
            if "train_reply_bytes" in s:
                down.append((r.train_bytes_to_each_site or 0) + (r.evaluate_bytes_to_each_site or 0))
                up.append(s["train_reply_bytes"] + s.get("evaluate_reply_bytes", 0))
    return {"to_site_bytes_per_round": _mean(down), "from_site_bytes_per_round": _mean(up)}


def inference_speed(size: int = 256, batch: int = 16, seconds: float = 3.0) -> dict[str, float]:
    """Slices per second through the U-Net at size x size, on the CPU and on the GPU when present."""
    import torch

    from common.model import build_model

    model = build_model(3).eval()
    out = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        model.to(device)
        x = torch.randn(batch, 1, size, size, device=device)
        with torch.no_grad():
            model(x)
            started, done = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                model(x)
                done += batch
            if device == "cuda":
                torch.cuda.synchronize()
        out[f"{device}_slices_per_s"] = done / (time.perf_counter() - started)
    out["threads"] = torch.get_num_threads()
    return out


def parameter_count() -> int:
    from common.model import build_model

    return sum(p.numel() for p in build_model(3).parameters())


def deployment_overhead(plan: Plan, out: Path, site_dirs: list[str]) -> dict[str, Any]:
    """The same round with real processes: `fedseg server`, one `fedseg site` per site (its guard,
    SuperNode and courier; 1 thread each, all on this machine) and `fedseg run` at ε 8, over
    loopback (insecure: overhead, not security)."""
    from client.isolation import ensure_user, let_courier_run_python
    from common.processes import free_port, port_open

    base, port = out / "deployment", free_port()
    base.mkdir(parents=True, exist_ok=True)
    fedseg = [sys.executable, "-m", "common.cli"]
    procs = []
    try:
        server = subprocess.Popen([*fedseg, "server", str(base / "coordinator"), "--insecure", "--port", str(port)],
                                  stdout=(base / "server.log").open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(server)
        deadline = time.time() + 120
        while not port_open("127.0.0.1", port):
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the benchmark's server did not start; see {base / 'server.log'}")
            time.sleep(0.5)
        if os.geteuid() == 0:  # the sites' couriers run as an unprivileged user, who must be able to run this Python
            ensure_user()
            let_courier_run_python()
        for i, folder in enumerate(site_dirs):
            os.chmod(folder, 0o700)  # a site refuses data its courier could read
            site = str(base / f"site-{i + 1}")
            subprocess.run([*fedseg, "site-init", site, "--epsilon-budget", "1000", "--min-noise-multiplier", "0"], check=True,
                           capture_output=True)
            procs.append(subprocess.Popen([*fedseg, "site", site, "--data", folder, "--server", f"127.0.0.1:{port}", "--insecure", "--threads", "1"],
                                          stdout=(base / f"site-{i + 1}.log").open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        code, wall, _ = run_measured([*fedseg, "run", str(base / "coordinator"), "--rounds", str(plan.cost_rounds), "--local-epochs",
                                      str(plan.local_epochs), "--image-size", str(plan.image_size), "--batch-size", str(plan.batch_size),
                                      "--epsilon", "8", "--min-sites", str(len(site_dirs)), "--run-dir", "runs/bench"], base / "run.log")
        if code != 0:
            raise RuntimeError(f"the benchmark's deployment run failed; see {base / 'run.log'}")
        history = RunHistory.read(base / "coordinator" / "runs" / "bench")
        return {"wall_s": wall, **round_overhead(history), "communication": communication(history)}
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_deployment_bench(plan_name: str, out: Path, cache: Path, repeats: int = 3) -> dict[str, Any]:
    """Only the plan's deployment row, `repeats` times (a fresh server and fresh sites each time):
    round wall time ÷ the slowest site's compute, with its spread."""
    from simulations.federation import build_federation
    from common.site_files import site_folders

    plan = PLANS[plan_name]
    out.mkdir(parents=True, exist_ok=True)
    sites = site_folders(build_federation(cache, plan.sites, plan.seed, plan.size))
    runs = []
    for repeat in range(repeats):
        log.info(f"deployment run {repeat + 1} of {repeats}: real server and site processes ...")
        runs.append(deployment_overhead(plan, out / f"run-{repeat + 1}", sites))
    ratios = [x["ratio"] for run in runs for x in run["rounds"]]
    results = {"plan": plan_name, **asdict(plan), "date": time.strftime("%Y-%m-%d"), "command": "fedseg bench --deployment-only",
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}", "runs": runs,
               "mean_ratio": _mean(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    rows = [f"| {i + 1} | {run['wall_s']:.0f} s | **{run['mean_ratio']:.2f}x** ({_per_round(run)}) |" for i, run in enumerate(runs)]
    (out / "table.md").write_text("\n".join(["| run | wall time | round wall time / slowest site's compute |", "|---:|---:|---|", *rows, "",
                                             f"mean {results['mean_ratio']:.2f}x, range {results['min_ratio']:.2f}–{results['max_ratio']:.2f}x "
                                             f"over {len(ratios)} rounds"]) + "\n")
    return results


def run_bench(plan_name: str, out: Path, cache: Path, deployment: bool) -> dict[str, Any]:
    """Every benchmark of the plan; results.json, table.md and plots in `out`."""
    from simulations.federation import build_federation
    from common.site_files import site_folders

    plan = PLANS[plan_name]
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    sites = site_folders(build_federation(cache, plan.sites, plan.seed, plan.size))
    results: dict[str, Any] = {"plan": plan_name, **asdict(plan), "date": time.strftime("%Y-%m-%d"),
                               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                               "command": f"fedseg bench{' --quick' if plan_name == 'quick' else ''}", "federated": {}, "dp": {}}
    for strategy in FEDERATED:
        log.info(f"federated {strategy}, no DP ...")
        run = simulate(plan, f"{strategy}-nodp", out, cache, "--strategy", strategy, "--epsilon", "inf")
        results["federated"][strategy] = {**_summary(_final_sites(run["history"])), "wall_s": run["wall_s"], "peak_mb": run["peak_mb"],
                                          "dice_by_round": run["history"].dice_series()}
        if strategy == "fedavg":
            baseline = run
    for epsilon in plan.epsilons:
        log.info(f"fedavg with DP, ε = {epsilon:g} ...")
        run = simulate(plan, f"fedavg-dp-eps{epsilon:g}", out, cache, "--epsilon", str(epsilon))
        results["dp"][f"{epsilon:g}"] = {**_summary(_final_sites(run["history"])), "wall_s": run["wall_s"],
                                         "epsilon_spent": max(history_number(s.get("epsilon")) for s in _last_validated(run["history"]).values()),
                                         "dice_by_round": run["history"].dice_series()}
    log.info("pooled and local-only baselines ...")
    results.update(centralised(plan, sites))
    log.info("DP-SGD vs SGD: one epoch each, fresh processes ...")
    results["dp_cost"] = dp_cost(plan, sites[0])
    results["round_overhead_simulation"] = round_overhead(baseline["history"])
    results["communication"] = {**communication(baseline["history"]), "parameters": parameter_count()}
    if deployment:
        log.info("the same rounds with real server and site processes ...")
        results["round_overhead_deployment"] = deployment_overhead(plan, out, sites)
    results["scale"] = {}
    for count in plan.scale:
        log.info(f"{count} simulated sites ...")
        same_as_baseline = (count, "tiny", plan.cost_rounds, plan.image_size, plan.batch_size) == (plan.sites, plan.size, plan.rounds, 32, 8)
        run = baseline if same_as_baseline else simulate(plan, f"scale-{count}", out, cache, "--epsilon", "inf", "--rounds",
                                                         str(plan.cost_rounds), "--image-size", "32", "--batch-size", "8",
                                                         sites=count, size="tiny")
        durations = [seconds for number, seconds in run["history"].durations().items() if number > 0]
        results["scale"][str(count)] = {"round_s": _mean(durations), "peak_mb": run["peak_mb"], "wall_s": run["wall_s"]}
    log.info("a federation from a real scan (MNI152 template, nilearn) ...")
    results["real"] = real_images(plan, out, cache)
    log.info("inference speed ...")
    results["inference_256"] = inference_speed()
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(table(results))
    plots(results, out)
    return results


def real_images(plan: Plan, out: Path, cache: Path) -> dict[str, Any]:
    """FedAvg with and without DP on the MNI152 federation (grey and white matter), same settings."""
    from simulations.brain import CLASS_NAMES, build_brain_federation

    root = build_brain_federation(cache, plan.sites, plan.seed, plan.size)
    classes = ",".join(CLASS_NAMES[1:])
    result = {"source": "MNI152 ICBM 2009a T1 + grey/white-matter maps from nilearn, as MR DICOM + DICOM-SEG per site",
              "classes": classes}
    for label, epsilon in (("no_dp", "inf"), ("dp8", "8"))[: 2 if plan.real_dp else 1]:
        run = simulate(plan, f"real-fedavg-{label}", out, cache, "--epsilon", epsilon, "--classes", classes, data_root=root)
        result[label] = {**_summary(_final_sites(run["history"])), "wall_s": run["wall_s"],
                         "dice_per_class": {n: s.get("val_dice_per_class") for n, s in _last_validated(run["history"]).items()},
                         "dice_by_round": run["history"].dice_series()}
    return result


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Where we are against the targets in the issue, as measured."""
    fedavg, pooled = results["federated"]["fedavg"], results["pooled"]
    own = {site: results["local_only"][site]["per_site"][site]["dice"] for site in results["local_only"]}
    fed = fedavg["per_site"]
    dp8 = results["dp"].get("8")
    return {
        "federated_over_pooled": fedavg["mean_dice"] / pooled["mean_dice"] if pooled["mean_dice"] else math.nan,
        "sites_not_worse_than_local": {s: fed[s]["dice"] >= own[s] for s in own},
        "dp8_over_nodp": dp8["mean_dice"] / fedavg["mean_dice"] if dp8 and fedavg["mean_dice"] else math.nan,
    }


def _per_round(overhead: dict[str, Any]) -> str:
    return ", ".join(f"{x['round_s']:.1f} s / {x['slowest_site_compute_s']:.1f} s" for x in overhead["rounds"])


def table(results: dict[str, Any]) -> str:
    """The markdown table the README shows."""
    sites = sorted(results["pooled"]["per_site"])
    head = "| method | " + " | ".join(sites) + " | mean Dice | mean Dice per class | mean HD95 (mm) |"
    lines = [head, "|---|" + "---:|" * (len(sites) + 3)]

    def row(name: str, entry: dict[str, Any]) -> None:
        cells = [cell(entry["per_site"][s]["dice"]) for s in sites]
        per_class = " / ".join(cell(d) for d in entry["mean_dice_per_class"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{cell(entry['mean_dice'])}** | {per_class} | {cell(entry['mean_hd95_mm'], '.1f')} |")

    row("pooled (all data in one place; ceiling)", results["pooled"])
    for site, entry in sorted(results["local_only"].items()):
        row(f"{site} alone", entry)
    for strategy, entry in results["federated"].items():
        row(f"{strategy}, no DP", entry)
    for epsilon, entry in results["dp"].items():
        row(f"fedavg, DP ε = {epsilon} (spent {cell(entry['epsilon_spent'], '.2f')})", entry)
    t, cost, comm = results["targets"], results["dp_cost"], results["communication"]
    sim = results["round_overhead_simulation"]
    lines += ["", "| cost | measured |", "|---|---|",
              f"| DP-SGD vs SGD, one epoch ({cost['dp']['slices']} slices, 1 thread) | {cost['dp']['epoch_s']:.2f} s vs "
              f"{cost['no_dp']['epoch_s']:.2f} s: **{cost['time_ratio']:.2f}x** time |",
              f"| peak memory of that training, DP vs SGD (RSS growth over the loaded data) | {cost['dp']['peak_rss_mb'] - cost['dp']['rss_before_training_mb']:.0f} MB vs "
              f"{cost['no_dp']['peak_rss_mb'] - cost['no_dp']['rss_before_training_mb']:.0f} MB: **{cell(cost['memory_ratio'], '.2f')}x** |",
              f"| round wall time / slowest site's compute, simulation | **{sim['mean_ratio']:.2f}x** ({_per_round(sim)}) |"]
    if "round_overhead_deployment" in results:
        dep = results["round_overhead_deployment"]
        lines.append(f"| round wall time / slowest site's compute, real server + site processes | **{dep['mean_ratio']:.2f}x** "
                     f"({_per_round(dep)}) |")
    lines += [f"| model parameters | {comm['parameters']:,} |",
              f"| bytes per site per round (train + validate messages, measured) | to the site {comm['to_site_bytes_per_round'] / 1e6:.2f} MB, "
              f"from it {comm['from_site_bytes_per_round'] / 1e6:.2f} MB |"]
    real = results["real"]
    for label, name in (("no_dp", "no DP"), ("dp8", "DP ε = 8")):
        if label not in real:
            continue
        entry = real[label]
        lines.append(f"| real scans (MNI152, {len(entry['per_site'])} sites, grey / white matter), fedavg {name} | mean Dice "
                     f"**{entry['mean_dice']:.3f}** (" + ", ".join(f"{s} {v['dice']:.3f}" for s, v in sorted(entry["per_site"].items())) + ") |")
    for count, entry in results["scale"].items():
        lines.append(f"| {count} simulated sites (tiny data, 32 px) | {entry['round_s']:.1f} s per round, peak memory {entry['peak_mb']:.0f} MB |")
    inf = results["inference_256"]
    lines.append(f"| inference, 256x256 slices | CPU ({inf['threads']} threads) {inf['cpu_slices_per_s']:.0f} slices/s"
                 + (f", GPU {inf['cuda_slices_per_s']:.0f} slices/s" if "cuda_slices_per_s" in inf else "") + " |")
    lines += ["", "| target | where we are |", "|---|---|",
              f"| federated Dice ≥ 0.99 × pooled | {t['federated_over_pooled']:.3f} × pooled |",
              "| every site's federated Dice ≥ its local-only Dice | "
              + ", ".join(f"{s}: {'yes' if ok else 'no'}" for s, ok in t["sites_not_worse_than_local"].items()) + " |",
              f"| DP at ε = 8 ≥ 0.95 × non-DP | {cell(t['dp8_over_nodp'])} × non-DP |"]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Dice vs round per method, Dice vs ε, and the cost bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for name, entry in [*((f"{k}, no DP", v) for k, v in results["federated"].items()),
                        *((f"fedavg, ε = {k}", v) for k, v in results["dp"].items())]:
        ax.plot(range(len(entry["dice_by_round"])), entry["dice_by_round"], marker="o", markersize=3, label=name)
    ax.axhline(results["pooled"]["mean_dice"], color="black", linestyle="--", label="pooled (ceiling)")
    ax.set(title="validation Dice per round", xlabel="round", ylabel="mean foreground Dice")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(out / "dice_vs_round.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    eps = sorted(results["dp"], key=float)
    ax.plot([float(e) for e in eps], [results["dp"][e]["mean_dice"] for e in eps], marker="o", label="fedavg with DP")
    ax.axhline(results["federated"]["fedavg"]["mean_dice"], color="tab:green", linestyle="--", label="fedavg, no DP")
    ax.axhline(results["pooled"]["mean_dice"], color="black", linestyle=":", label="pooled, no DP")
    ax.set(title="utility vs privacy (δ = 1e-5)", xlabel="ε (whole training, per site)", ylabel="mean foreground Dice")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(out / "dice_vs_epsilon.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    cost = results["dp_cost"]
    bars = {"DP / SGD epoch time": cost["time_ratio"], "DP / SGD memory": cost["memory_ratio"],
            "round / site compute (sim)": results["round_overhead_simulation"]["mean_ratio"]}
    if "round_overhead_deployment" in results:
        bars["round / site compute (processes)"] = results["round_overhead_deployment"]["mean_ratio"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    ax.barh(list(bars), list(bars.values()), color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlim(0, max(v for v in bars.values() if math.isfinite(v)) * 1.2)
    for y, value in enumerate(bars.values()):
        ax.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
    ax.set(title="what DP and federation cost (ratios)", xlabel="ratio")
    paths.append(out / "cost.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths
