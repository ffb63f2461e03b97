"""`fedseg bench`: is federated + DP training worth it, and what does it cost?

Everything is measured in one run on this machine, so ratios (DP vs non-DP, federated vs pooled) are
read from numbers taken side by side. Federated methods run through `fedseg simulate` (Flower's
simulation engine, the real ServerApp and ClientApp); the pooled and local-only baselines train the
same model with the same code and the same sampling plan: a site is planned on `rounds x local-epochs`
expected passes over `SitePolicy.planned_count` of its patients in every setting (the pool likewise over
all patients), so a site's steps match its federated ones; the baselines keep one learning rate where a
federated run decays it over the rounds.
Every accuracy row is repeated per seed (a seed picks the built-in federation's patients, the
model's initialisation and which patients validate; DP noise comes from the OS), reported as mean ±
sd over the seeds. Within a seed every row validates on the same patients: the baselines split with
the key the simulated sites are given. A finished run is kept in the results folder with the code
version that made it, so a bench cut short continues where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
from queue import Empty
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from client.site_policy import SitePolicy
from common.config import RUN_DEFAULTS, class_names
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
    spacing: float
    batch_size: int
    epsilons: tuple[float, ...]
    scale: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    patients: tuple[int, ...] = ()  # Dice vs patients per site, FedAvg at ε 8 (the size's own count is the ε 8 row)
    cost_rounds: int = 2  # rounds for the deployment and scale runs: they measure time, not accuracy
    real_dp: bool = True  # also run the real-scan federation with DP (ε = 8)


PLANS = {
    "quick": Plan(sites=2, size="tiny", rounds=1, local_epochs=1, image_size=32, spacing=8.0, batch_size=8, epsilons=(8.0,), scale=(2,), patients=(3,),
                  cost_rounds=1, real_dp=False),
    # The product's own recipe: what `fedseg simulate` runs by default.
    "full": Plan(sites=3, size="default", rounds=RUN_DEFAULTS["num-server-rounds"], local_epochs=RUN_DEFAULTS["local-epochs"],
                 image_size=RUN_DEFAULTS["image-size"], spacing=RUN_DEFAULTS["spacing"], batch_size=RUN_DEFAULTS["batch-size"], epsilons=(1.0, 3.0, 8.0),
                 scale=(4, 16), seeds=(0, 1, 2), patients=(10, 25, 100)),  # 32 simulated sites need ~30 GB: a guard each
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


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this code, with `+changes-<hash>` when the tree differs from it (tracked
    changes and untracked Python outside results/), or "unknown" outside its own git checkout. A kept
    run is reused only by the same version: results from other code are never mixed in silently."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root:
            return "unknown"  # a copy inside some other repository: its commit is not ours
        commit = git("rev-parse", "--short", "HEAD").strip()
        changes = git("diff", "HEAD", "--", ".", ":(exclude)results") + git("ls-files", "--others", "--exclude-standard", "--", "*.py",
                                                                            ":(exclude)results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (f"+changes-{hashlib.sha256(changes.encode()).hexdigest()[:8]}" if changes else "")


def validation_key(seed: int) -> str:
    """The validation-split key of a seed's simulated sites and baselines: the same patients validate
    every row of that seed."""
    return hashlib.sha256(f"fedseg bench validation split, seed {seed}".encode()).hexdigest()[:32]


def _keep(path: Path, record: dict[str, Any]) -> None:
    """Written whole or not at all: a bench killed mid-write leaves no half record to trip over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, default=str))
    os.replace(partial, path)


def _kept(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """A record kept for the same key, else None (none, another key, or unreadable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == json.loads(json.dumps(key, default=str)) else None


def simulate(plan: Plan, label: str, out: Path, cache: Path, *options: str, seed: int, sites: int | None = None,
             size: str | None = None, patients: int | None = None, data_root: Path | None = None) -> dict[str, Any]:
    """One `fedseg simulate` run; its history plus wall time and peak memory. A run this results folder
    already finished with the same arguments on the same data is read back, not repeated; any other
    starts again."""
    from simulations.federation import federation_dir

    source = ["--data-root", str(data_root)] if data_root else ["--sites", str(sites or plan.sites), "--size", size or plan.size]
    if patients is not None:
        source += ["--patients", str(patients)]
    arguments = ["simulate", *source, "--rounds", str(plan.rounds), "--local-epochs", str(plan.local_epochs), "--image-size",
                 str(plan.image_size), "--spacing", str(plan.spacing), "--batch-size", str(plan.batch_size), "--seed", str(seed), "--cache-dir", str(cache),
                 "--validation-key", validation_key(seed), *options]
    data = data_root or federation_dir(cache, sites or plan.sites, seed, size or plan.size, patients)  # its name has the generator's version
    key = {"arguments": arguments, "data": Path(data).name, "code": code_version()}
    run_dir = out / "runs" / label
    record = _kept(run_dir / "bench-run.json", key)
    if record is not None:
        log.info(f"{label}: finished by an earlier call on this folder (code {record['code']}), reused")
        return {"history": RunHistory.read(run_dir), **record}
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "common.cli", *arguments, "--out", str(run_dir),
               "--ledger-dir", str(run_dir / "sites")]  # each benchmark run is its own experiment
    code, wall, peak = run_measured(command, out / "logs" / f"{label}.log")
    if code != 0:
        raise RuntimeError(f"benchmark run {label} failed; see {out / 'logs' / f'{label}.log'}")
    record = {"key": key, "code": key["code"], "date": time.strftime("%Y-%m-%d"), "wall_s": wall, "peak_mb": peak}
    _keep(run_dir / "bench-run.json", record)
    return {"history": RunHistory.read(run_dir), **record}


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


def _sd(values: list[float]) -> float:
    """Sample standard deviation of the defined values; NaN with fewer than two (one seed has no spread)."""
    defined = [v for v in values if math.isfinite(v)]
    return float(np.std(defined, ddof=1)) if len(defined) > 1 else math.nan


def _summary(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over the sites; per class too (the headline Dice averages classes: a lesion that is never
    learned hides behind a good organ)."""
    classes = max((len(s["dice_per_class"]) for s in per_site.values()), default=0)
    return {"per_site": per_site, "mean_dice": _mean([s["dice"] for s in per_site.values()]),
            "mean_hd95_mm": _mean([s["hd95_mm"] for s in per_site.values()]),
            "mean_dice_per_class": [_mean([s["dice_per_class"][c] for s in per_site.values() if c < len(s["dice_per_class"])])
                                    for c in range(classes)]}


def over_seeds(by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One row from the same method run with several seeds. The row's mean Dice (and each class's) is
    the mean over seeds of each seed's own, with its sd across seeds: one population for both, the
    spread the seeds alone make. Each site's entry averages the seeds that have it (`seeds`: how many).
    Numbers kept with a row are averaged (peak memory: the largest; ε spent: the largest);
    `dice_by_round` is averaged round by round. Every seed's own row stays under `seeds`."""
    runs = list(by_seed.values())
    classes = max(len(r["mean_dice_per_class"]) for r in runs)

    def per_class(values: list[list[float]], c: int) -> list[float]:
        return [v[c] for v in values if c < len(v)]

    per_site = {}
    for site in sorted(set().union(*(r["per_site"] for r in runs))):
        entries = [r["per_site"][site] for r in runs if site in r["per_site"]]
        per_site[site] = {"dice": _mean([e["dice"] for e in entries]), "hd95_mm": _mean([e["hd95_mm"] for e in entries]),
                          "dice_per_class": [_mean(per_class([e["dice_per_class"] for e in entries], c)) for c in range(classes)],
                          "seeds": len(entries)}
    seed_classes = [r["mean_dice_per_class"] for r in runs]
    row: dict[str, Any] = {
        "per_site": per_site, "mean_dice": _mean([r["mean_dice"] for r in runs]), "mean_dice_sd": _sd([r["mean_dice"] for r in runs]),
        "mean_hd95_mm": _mean([r["mean_hd95_mm"] for r in runs]),
        "mean_dice_per_class": [_mean(per_class(seed_classes, c)) for c in range(classes)],
        "mean_dice_per_class_sd": [_sd(per_class(seed_classes, c)) for c in range(classes)]}
    for key, value in runs[0].items():
        if key in ("epsilon_spent", "peak_mb"):
            row[key] = max(r[key] for r in runs)
        elif key == "dice_by_round":
            row[key] = [_mean(list(values)) for values in itertools.zip_longest(*(r[key] for r in runs), fillvalue=math.nan)]
        elif isinstance(value, (int, float)) and key not in row:
            row[key] = _mean([r[key] for r in runs])
    row["seeds"] = {str(seed): {k: v for k, v in r.items() if k != "dice_by_round"} for seed, r in by_seed.items()}
    return row


SITE = SitePolicy()  # what a simulated site allows by default: slices per patient, validation share, planned count


def _site_data(site_dir: str, config: dict[str, Any], seed: int) -> SiteData:
    """A site's patients split as that seed's simulated sites split them."""
    return load_site(site_dir, tuple(class_names(config)), Preprocessing.from_config(config), SITE.validation_fraction,
                     bytes.fromhex(validation_key(seed)))


def centralised(plan: Plan, site_dirs: list[str], seed: int) -> dict[str, Any]:
    """Pooled (all sites' slices together: the ceiling) and each site alone, non-DP, evaluated on
    every site's validation patients."""
    import torch

    from client.training import evaluate, plan_round, train_round
    from common.config import TrainSettings, run_config
    from common.model import build_model

    config = run_config({"image-size": plan.image_size, "spacing": plan.spacing, "batch-size": plan.batch_size, "seed": seed,
                         "target-epsilon": math.inf, "num-server-rounds": 1, "local-epochs": plan.rounds * plan.local_epochs})
    data = {Path(d).name: _site_data(d, config, seed) for d in site_dirs}
    pooled = SiteData("pooled", [p for d in data.values() for p in d.train], [], None, Preprocessing.from_config(config))
    settings = TrainSettings.from_config({**config, "server-round": 1})

    def trained_on(train: SiteData) -> dict[str, Any]:
        torch.manual_seed(seed)
        model = build_model(3)
        started = time.time()
        round_plan = plan_round(settings, SITE.planned_count(len(train.train), settings.private), settings.delta)
        train_round(model, train.train, settings, round_plan, SITE.slices_per_patient, plan.image_size, torch.device("cpu"))
        seconds = time.time() - started
        per_site = {}
        for name, site in data.items():
            m = evaluate(model, site, 3, torch.device("cpu"))
            per_site[name] = {"dice": m["dice"], "hd95_mm": m["hd95"],
                              "dice_per_class": [m[f"dice-class{c}"] for c in range(1, len(class_names(config)))]}
        return {**_summary(per_site), "steps": round_plan.steps, "train_s": seconds}

    return {"pooled": trained_on(pooled), "local_only": {name: trained_on(d) for name, d in data.items()}}


def plain_round(model: Any, patients: list, settings: Any, plan: Any, slices_per_patient: int, patch: int) -> None:
    """What DP-SGD's cost is measured against: plain SGD on the same sampled patients' patches, one
    batched backward a step, no per-patient gradients, clipping or noise. (The product's non-private
    rounds clip per patient, as DP does, so they cost what DP does and measure nothing here.)"""
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from client.training import patch_batch
    from common.dataset import augmentation
    from common.losses import patient_loss

    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=settings.momentum)
    loss_fn, augment = patient_loss(settings.class_weights), augmentation(settings.seed)
    model.train()
    for batch in UniformWithReplacementSampler(num_samples=len(patients), sample_rate=plan.sample_rate, steps=plan.steps):
        if not batch:
            continue
        optimizer.zero_grad(set_to_none=True)
        images, masks = patch_batch([patients[i] for i in batch], slices_per_patient, patch, augment, torch.Generator())
        onehot = torch.nn.functional.one_hot(masks, len(settings.class_weights)).movedim(-1, 2).float()
        logits = model(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        torch.stack([loss_fn(logits[i], onehot[i]) for i in range(len(batch))]).mean().backward()
        optimizer.step()


def _epoch_cost(private: bool, plan: Plan, site_dir: str, seed: int, queue: Any) -> None:
    """In a fresh process (spawned): one local epoch of DP-SGD or of plain SGD, on the same plan (the DP
    round's sampling rate and steps, so both do the same work); its time and peak memory."""
    import torch

    from client.training import plan_round, train_round
    from common.config import TrainSettings, run_config
    from common.model import build_model

    torch.set_num_threads(1)
    config = run_config({"image-size": plan.image_size, "spacing": plan.spacing, "batch-size": plan.batch_size, "num-server-rounds": 1, "local-epochs": 1,
                         "target-epsilon": 8.0})
    data = _site_data(site_dir, config, seed)
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
    round_plan = plan_round(settings, SITE.planned_count(len(data.train), settings.private), settings.delta)
    def one_round() -> None:
        if private:
            train_round(build_model(3), data.train, settings, round_plan, SITE.slices_per_patient, plan.image_size, torch.device("cpu"))
        else:
            plain_round(build_model(3), data.train, settings, round_plan, SITE.slices_per_patient, plan.image_size)

    one_round()  # a first round pays one-off costs (allocator, vmap tracing, lazy imports); the second is timed
    started = time.perf_counter()
    one_round()
    seconds = time.perf_counter() - started
    sampling.set()
    sampler.join()
    queue.put({"epoch_s": seconds, "steps": round_plan.steps, "patients": len(data.train), "slices": data.train_slices,
               "peak_rss_mb": peak[0] / 1024, "rss_before_training_mb": before / 1024})


def dp_cost(plan: Plan, site_dir: str, seed: int) -> dict[str, Any]:
    """DP-SGD vs plain SGD: time per epoch and peak memory, same model, data and thread count."""
    context = multiprocessing.get_context("spawn")
    out = {}
    for private in (False, True):
        queue = context.Queue()
        proc = context.Process(target=_epoch_cost, args=(private, plan, site_dir, seed, queue))
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


def inference_speed(size: int = 256, pixel_mm: float = 1.5, slices: int = 32, seconds: float = 3.0) -> dict[str, float]:
    """Slices per second of `fedseg predict`'s own path (`segment_series`: windowing, resampling to the
    run's spacing, the sliding window, scores back on the series' grid), on a size x size CT series
    at `pixel_mm`, with the default run config; on the CPU and on the GPU when present."""
    import torch

    from common.config import run_config
    from common.dicom_io import Series
    from common.inference import segment_series
    from common.model import build_model

    model = build_model(3).eval()
    preprocessing = Preprocessing.from_config(run_config())
    volume = np.random.default_rng(0).normal(40, 100, (slices, size, size)).astype(np.float32)
    series = Series(uid="1.2.3", patient_id="bench", modality="CT", sop_uids=[], volume=volume, spacing=(3.0, pixel_mm, pixel_mm),
                    origin=np.zeros(3), orientation=np.array([1.0, 0, 0, 0, 1, 0]))
    out = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        segment_series(model, series, preprocessing, torch.device(device))  # warm-up
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            segment_series(model, series, preprocessing, torch.device(device))  # ends on the CPU: synchronised
            done += slices
        out[f"{device}_slices_per_s"] = done / (time.perf_counter() - started)
    out.update({"threads": torch.get_num_threads(), "pixel_mm": pixel_mm, "spacing_mm": preprocessing.spacing, "patch": preprocessing.image_size})
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
    shutil.rmtree(base, ignore_errors=True)  # a measurement cut short left sites that `site-init` would refuse to set up again
    base.mkdir(parents=True)
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
                                      str(plan.local_epochs), "--image-size", str(plan.image_size), "--spacing", str(plan.spacing),
                                      "--batch-size", str(plan.batch_size), "--epsilon", "8", "--min-sites", str(len(site_dirs)), "--run-dir", "runs/bench"], base / "run.log")
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
    sites = site_folders(build_federation(cache, plan.sites, plan.seeds[0], plan.size))
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


def _once(out: Path, name: str, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A measurement this results folder already holds for the same `key` and code version is read
    back from `runs/NAME.json`, not repeated. The record: the key, the code version, the date, `measured`."""
    path = out / "runs" / f"{name}.json"
    record = _kept(path, {**key, "code": code_version()})
    if record is not None:
        log.info(f"{name}: measured by an earlier call on this folder (code {record['code']}), reused")
        return record
    key = {**key, "code": code_version()}
    record = {"key": key, "code": key["code"], "date": time.strftime("%Y-%m-%d"), "measured": measure()}
    _keep(path, record)
    return record


def _federated_row(run: dict[str, Any], epsilon: float) -> dict[str, Any]:
    row = {**_summary(_final_sites(run["history"])), "wall_s": run["wall_s"], "peak_mb": run["peak_mb"],
           "dice_by_round": run["history"].dice_series()}
    if math.isfinite(epsilon):
        row["epsilon_spent"] = max(history_number(s.get("epsilon")) for s in _last_validated(run["history"]).values())
    return row


def run_bench(plan_name: str, out: Path, cache: Path, deployment: bool, seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Every benchmark of the plan, each accuracy row once per seed; results.json, table.md and plots in
    `out`. Rows run in order of what they tell (FedAvg with and without DP and the baselines first), so
    a bench cut short has those for every seed."""
    from simulations.brain import CLASS_NAMES, build_brain_federation
    from simulations.federation import build_federation, patient_range
    from common.site_files import site_folders

    plan = PLANS[plan_name]
    seeds = seeds or plan.seeds
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    results: dict[str, Any] = {"plan": plan_name, **asdict(plan), "seeds": list(seeds), "date": time.strftime("%Y-%m-%d"),
                               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                               "command": f"fedseg bench{' --quick' if plan_name == 'quick' else ''}"}
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    histories: dict[str, dict[str, Any]] = {}
    codes = {code_version()}  # this call's, and those of the runs it reuses

    def federated(key: str, seed: int, epsilon: float, *options: str, **where: Any) -> None:
        run = simulate(plan, f"{key}-seed{seed}", out, cache, "--epsilon", f"{epsilon:g}", *options, seed=seed, **where)
        rows.setdefault(key, {})[seed] = _federated_row(run, epsilon)
        histories.setdefault(key, run)
        codes.add(run["code"])

    def once(name: str, seed: int, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        record = _once(out, name, {"plan": asdict(plan), "seed": seed, "validation_key": validation_key(seed), "site": asdict(SITE)}, measure)
        codes.add(record["code"])
        return record["measured"]

    for seed in seeds:
        log.info(f"seed {seed}: fedavg without and with DP (ε = 8), pooled and local-only baselines ...")
        federated("fedavg-nodp", seed, math.inf)
        if 8.0 in plan.epsilons:
            federated("fedavg-dp-eps8", seed, 8.0)
        baselines = once(f"centralised-seed{seed}", seed,
                         lambda: centralised(plan, site_folders(build_federation(cache, plan.sites, seed, plan.size)), seed))
        for name, row in baselines.items():
            if name == "local_only":
                for site, site_row in row.items():
                    rows.setdefault(f"alone:{site}", {})[seed] = site_row
            else:
                rows.setdefault(name, {})[seed] = row
    for seed in seeds:
        for epsilon in (e for e in plan.epsilons if e != 8.0):
            log.info(f"seed {seed}: fedavg with DP, ε = {epsilon:g} ...")
            federated(f"fedavg-dp-eps{epsilon:g}", seed, epsilon)
    for seed in seeds:
        for count in plan.patients:
            log.info(f"seed {seed}: fedavg at ε = 8 with {count} patients per site ...")
            federated(f"fedavg-dp-eps8-patients{count}", seed, 8.0, patients=count)
    for seed in seeds:
        for strategy in (s for s in FEDERATED if s != "fedavg"):
            log.info(f"seed {seed}: {strategy}, no DP ...")
            federated(f"{strategy}-nodp", seed, math.inf, "--strategy", strategy)
    classes = ",".join(f"{name}:2" for name in CLASS_NAMES[1:])  # foreground 2 × background: no lesion weight here
    # The task's own pixel size: at the built-in CT's 4 mm the MR federation loses grey matter (ε 8: 0.357 ± 0.039 against 0.482 ± 0.157 at 2 mm).
    brain_spacing = "2"
    for seed in seeds:
        log.info(f"seed {seed}: a federation from a real scan (MNI152 template, nilearn) ...")
        root = build_brain_federation(cache, plan.sites, seed, plan.size)
        for label, epsilon in (("no_dp", math.inf), ("dp8", 8.0))[: 2 if plan.real_dp else 1]:
            federated(f"real-fedavg-{label}", seed, epsilon, "--classes", classes, "--spacing", brain_spacing, data_root=root)

    results["federated"] = {strategy: over_seeds(rows[f"{strategy}-nodp"]) for strategy in FEDERATED}
    results["dp"] = {f"{e:g}": over_seeds(rows[f"fedavg-dp-eps{e:g}"]) for e in plan.epsilons}
    default_count = patient_range(plan.size)[0]
    results["patients"] = {str(count): {**over_seeds(rows[f"fedavg-dp-eps8-patients{count}"]), "per_site_range": patient_range(plan.size, count)}
                           for count in plan.patients}
    if "8" in results["dp"]:
        results["patients"][str(default_count)] = {**results["dp"]["8"], "per_site_range": patient_range(plan.size)}
    results["pooled"] = over_seeds(rows["pooled"])
    results["local_only"] = {key.removeprefix("alone:"): over_seeds(by_seed) for key, by_seed in rows.items() if key.startswith("alone:")}
    results["real"] = {"source": "MNI152 ICBM 2009a T1 + grey/white-matter maps from nilearn, as MR DICOM + DICOM-SEG per site",
                       "classes": classes, **{label: over_seeds(rows[f"real-fedavg-{label}"]) for label in ("no_dp", "dp8")
                                              if f"real-fedavg-{label}" in rows}}
    baseline = histories["fedavg-nodp"]
    first_sites = site_folders(build_federation(cache, plan.sites, seeds[0], plan.size))
    log.info("DP-SGD vs SGD: one epoch each, fresh processes ...")
    results["dp_cost"] = once("dp-cost", seeds[0], lambda: dp_cost(plan, first_sites[0], seeds[0]))
    results["round_overhead_simulation"] = round_overhead(baseline["history"])
    results["communication"] = {**communication(baseline["history"]), "parameters": parameter_count()}
    if deployment:
        log.info("the same rounds with real server and site processes ...")
        results["round_overhead_deployment"] = once("deployment", seeds[0], lambda: deployment_overhead(plan, out, first_sites))
    results["scale"] = {}
    for count in plan.scale:
        log.info(f"{count} simulated sites ...")
        same_as_baseline = (count, "tiny", plan.cost_rounds, plan.image_size, plan.batch_size) == (plan.sites, plan.size, plan.rounds, 32, 8)
        run = baseline if same_as_baseline else simulate(plan, f"scale-{count}", out, cache, "--epsilon", "inf", "--rounds",
                                                         str(plan.cost_rounds), "--image-size", "32", "--batch-size", "8",
                                                         seed=seeds[0], sites=count, size="tiny")
        durations = [seconds for number, seconds in run["history"].durations().items() if number > 0]
        results["scale"][str(count)] = {"round_s": _mean(durations), "peak_mb": run["peak_mb"], "wall_s": run["wall_s"]}
        codes.add(run["code"])
    log.info("inference speed ...")
    results["inference_256"] = inference_speed()
    results["code"] = sorted(codes)
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(table(results))
    plots(results, out)
    return results


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Where we are against the issue's targets, as measured (means over the seeds)."""
    fedavg, pooled = results["federated"]["fedavg"], results["pooled"]
    own = {site: results["local_only"][site]["per_site"][site]["dice"] for site in results["local_only"]}
    fed = fedavg["per_site"]
    dp8 = results["dp"].get("8")
    real = results["real"].get("no_dp")
    return {
        "pooled_dice_per_class": pooled["mean_dice_per_class"],
        "federated_over_pooled": fedavg["mean_dice"] / pooled["mean_dice"] if pooled["mean_dice"] else math.nan,
        "sites_not_worse_than_local": {s: s in fed and fed[s]["dice"] >= own[s] for s in own},
        "dp8_over_nodp": dp8["mean_dice"] / fedavg["mean_dice"] if dp8 and fedavg["mean_dice"] else math.nan,
        "real_no_dp": real["mean_dice"] if real else math.nan,
    }


def _per_round(overhead: dict[str, Any]) -> str:
    return ", ".join(f"{x['round_s']:.1f} s / {x['slowest_site_compute_s']:.1f} s" for x in overhead["rounds"])


def _spread(mean: float, sd: float) -> str:
    """`mean ± sd`; the mean alone where there is no spread (one seed)."""
    return cell(mean) + ("" if math.isnan(history_number(sd)) else f" ± {cell(sd)}")


def table(results: dict[str, Any]) -> str:
    """The markdown table the README shows: per site the mean over the seeds; the mean Dice and each
    class's with their sd across seeds."""
    sites = sorted(results["pooled"]["per_site"])
    seeds = len(results["seeds"])
    head = ("| method | " + " | ".join(sites) + f" | mean Dice ({seeds} seed{'s' if seeds > 1 else ''}{', ± sd' if seeds > 1 else ''}) "
            "| mean Dice per class | mean HD95 (mm) |")
    lines = [f"Code: {', '.join(results['code'])}. Within a seed, the rows on the default federation validate on the same patients.", "",
             head, "|---|" + "---:|" * (len(sites) + 3)]

    def row(name: str, entry: dict[str, Any]) -> None:
        cells = [cell(entry["per_site"][s]["dice"]) if s in entry["per_site"] else "" for s in sites]
        per_class = " / ".join(_spread(d, sd) for d, sd in zip(entry["mean_dice_per_class"], entry["mean_dice_per_class_sd"]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{_spread(entry['mean_dice'], entry['mean_dice_sd'])}** | {per_class} "
                     f"| {cell(entry['mean_hd95_mm'], '.1f')} |")

    row("pooled (all data in one place; ceiling)", results["pooled"])
    for site, entry in sorted(results["local_only"].items()):
        row(f"{site} alone", entry)
    for strategy, entry in results["federated"].items():
        row(f"{strategy}, no DP (ε = ∞)", entry)
    for epsilon, entry in results["dp"].items():
        row(f"fedavg, DP ε = {epsilon} (spent {cell(entry['epsilon_spent'], '.2f')})", entry)
    for count, entry in sorted(results["patients"].items(), key=lambda item: int(item[0])):
        fewest, most = entry["per_site_range"]
        row(f"fedavg, DP ε = 8, {fewest}–{most} patients per site (about a quarter validate)", entry)
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
                     f"**{_spread(entry['mean_dice'], entry['mean_dice_sd'])}** ("
                     + ", ".join(f"{s} {v['dice']:.3f}" for s, v in sorted(entry["per_site"].items())) + ") |")
    for count, entry in results["scale"].items():
        lines.append(f"| {count} simulated sites (tiny data, 32 px) | {entry['round_s']:.1f} s per round, peak memory {entry['peak_mb']:.0f} MB |")
    inf = results["inference_256"]
    where = f", {inf['pixel_mm']:g} mm pixels, predicted at {inf['spacing_mm']:g} mm in {inf['patch']}² windows" if "patch" in inf else ""
    lines.append(f"| inference, 256x256 slices{where} | CPU ({inf['threads']} threads) {inf['cpu_slices_per_s']:.0f} slices/s"
                 + (f", GPU {inf['cuda_slices_per_s']:.0f} slices/s" if "cuda_slices_per_s" in inf else "") + " |")
    lines += ["", "| target | where we are |", "|---|---|",
              "| pooled non-DP Dice: organ ≥ 0.95, lesion ≥ 0.70 (built-in classes) | "
              + " / ".join(cell(d) for d in t["pooled_dice_per_class"]) + " |",
              f"| federated non-DP Dice ≥ 0.97 × pooled | {cell(t['federated_over_pooled'])} × pooled |",
              "| every site's federated Dice ≥ its local-only Dice | "
              + ", ".join(f"{s}: {'yes' if ok else 'no'}" for s, ok in t["sites_not_worse_than_local"].items()) + " |",
              f"| DP at ε = 8 ≥ 0.90 × federated non-DP | {cell(t['dp8_over_nodp'])} × non-DP |",
              f"| real scans (MNI152 grey / white matter), non-DP Dice ≥ 0.85 | {cell(t['real_no_dp'])} |"]
    return "\n".join(lines) + "\n"


def _error_bars(entries: list[dict[str, Any]]) -> list[float]:
    return [e["mean_dice_sd"] if math.isfinite(e["mean_dice_sd"]) else 0.0 for e in entries]


def _saved(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Dice vs round per method, Dice vs ε, Dice vs patients per site, and the cost bars."""
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
    paths.append(_saved(fig, ax, out / "dice_vs_round.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    eps = sorted(results["dp"], key=float)
    ax.errorbar([float(e) for e in eps], [results["dp"][e]["mean_dice"] for e in eps], yerr=_error_bars([results["dp"][e] for e in eps]),
                marker="o", capsize=3, label="fedavg with DP (± sd over seeds)")
    ax.axhline(results["federated"]["fedavg"]["mean_dice"], color="tab:green", linestyle="--", label="fedavg, no DP")
    ax.axhline(results["pooled"]["mean_dice"], color="black", linestyle=":", label="pooled, no DP")
    ax.set(title="utility vs privacy (δ = 1e-5)", xlabel="ε (whole training, per site)", ylabel="mean foreground Dice", xscale="log")
    paths.append(_saved(fig, ax, out / "dice_vs_epsilon.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    counts = sorted(results["patients"], key=int)
    entries = [results["patients"][c] for c in counts]
    ax.errorbar([int(c) for c in counts], [e["mean_dice"] for e in entries], yerr=_error_bars(entries), marker="o", capsize=3,
                label="mean foreground Dice")
    for c, name in enumerate(class_names(RUN_DEFAULTS)[1:]):
        if all(len(e["mean_dice_per_class"]) > c for e in entries):
            ax.plot([int(n) for n in counts], [e["mean_dice_per_class"][c] for e in entries], marker=".", linestyle=":", label=name)
    ax.set(title="fedavg at ε = 8: Dice vs patients per site", xlabel="fewest patients per site (about a quarter validate)", ylabel="Dice",
           xscale="log")
    paths.append(_saved(fig, ax, out / "dice_vs_patients.png"))

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
