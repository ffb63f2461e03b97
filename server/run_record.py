"""What a run leaves behind: global-model checkpoints, `history.json` and a summary table.

Every file is written to a temporary name and renamed into place, so a crash mid-write never
leaves a truncated checkpoint or history behind the "latest" name.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _clean(value: Any) -> Any:
    """JSON has no NaN/Infinity: undefined metrics become null, ε = ∞ becomes the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run_status(run_dir: str | Path) -> str | None:
    """"completed", "stopped", "running" (or interrupted), or None when the folder holds no run."""
    try:
        return json.loads((Path(run_dir) / "history.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def history_number(value: Any) -> float:
    """A number as history.json holds it, back as a float: null is NaN, "inf" is ∞ (see `_clean`)."""
    return math.nan if value is None else float(value)


def cell(value: Any, spec: str = ".3f") -> str:
    """A table cell: undefined (a class absent from the truth, a site that did not report) is a dash."""
    number = history_number(value)
    return "–" if math.isnan(number) else format(number, spec)


class ResumeError(RuntimeError):
    """The run folder holds nothing a run can be resumed from."""


class RunRecord:
    def __init__(self, run_dir: str | Path, config: dict[str, Any]) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rounds: dict[int, dict[str, Any]] = {}
        self.site_nodes: dict[str, str] = {}  # Flower node id -> site name, learnt from replies
        self.events: list[dict[str, Any]] = []  # resumptions, retries, a stop: what a reader must know
        self.status = "running"
        self.started = time.time()
        self.elapsed_before = 0.0
        self.clocked: set[int] = set()  # rounds whose messages went out in this process

    @classmethod
    def resume(cls, run_dir: str | Path, config: dict[str, Any]) -> tuple[RunRecord, dict[str, Any], int]:
        """The record of an interrupted run, cut back to its last completed round, and that round's
        checkpoint. Only `config`'s RESUMABLE keys override the run's own configuration."""
        from common.config import RESUMABLE

        run_dir = Path(run_dir)
        try:
            history = json.loads((run_dir / "history.json").read_text())
        except (OSError, ValueError) as err:
            raise ResumeError(f"cannot resume from {run_dir}: no readable history.json ({err})") from err
        done = [r["round"] for r in history["rounds"] if "checkpoint" in r or "dice" in r]  # "dice": histories before 2026-11-23
        if not done:
            raise ResumeError(f"cannot resume from {run_dir}: no round was completed")
        last = max(done)
        checkpoint = torch.load(run_dir / "checkpoints" / f"global_model-round{last:03d}.pt", weights_only=True)
        record = cls(run_dir, {**history["config"], **{k: config[k] for k in RESUMABLE if k in config}})
        record.rounds = {r["round"]: r for r in history["rounds"] if r["round"] <= last}
        record.site_nodes = dict(history.get("site_nodes", {}))
        record.events = list(history.get("events", []))
        record.elapsed_before = float(history.get("wall_time_s", 0.0))
        lost = sorted({r["round"] for r in history["rounds"]} - set(record.rounds))
        record.event(f"resumed after round {last}" + (f"; round {lost[0]} (in flight at the stop) is run again" if lost else ""))
        return record, checkpoint, last

    def event(self, text: str) -> None:
        self.events.append({"time": time.time(), "event": text})
        self.write_history()

    def finish(self, status: str) -> None:
        self.status = status
        self.write_history()

    def round(self, server_round: int) -> dict[str, Any]:
        return self.rounds.setdefault(server_round, {"round": server_round, "sites": {}, "started": time.time()})

    def start_round(self, server_round: int) -> None:
        """The round's clock starts when its first messages go out: time spent waiting for sites to
        come online is the federation's, not the round's (it shows as the gap between rounds)."""
        if server_round not in self.clocked:  # a retry keeps the first attempt's start
            self.clocked.add(server_round)
            self.round(server_round)["started"] = time.time()

    def site(self, server_round: int, site: str) -> dict[str, Any]:
        return self.round(server_round)["sites"].setdefault(site, {})

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord, strategy_state: dict[str, Any]) -> Path:
        """The round's global model; from here on the round survives a crash (its validation rides
        in the next round's train message). A round's duration ends here."""
        state = {"state_dict": arrays.to_torch_state_dict(), "round": server_round, "config": self.config,
                 "strategy_state": strategy_state}
        path = self.dir / "checkpoints" / f"global_model-round{server_round:03d}.pt"
        _atomic_write(path, lambda fh: torch.save(state, fh), mode="wb")
        _atomic_write(self.dir / "global_model.pt", lambda fh: torch.save(state, fh), mode="wb")
        entry = self.round(server_round)
        entry["checkpoint"] = path.name
        if server_round > 0:
            entry["duration_s"] = time.time() - entry["started"]
        self.write_history()
        return path

    def close_round(self, server_round: int, dice: float) -> None:
        self.round(server_round)["dice"] = dice
        self.write_history()

    def write_history(self) -> None:
        history = {"config": self.config, "status": self.status, "privacy_unit": "patient", "rounds": [self.rounds[r] for r in sorted(self.rounds)],
                   "site_nodes": self.site_nodes, "events": self.events,
                   "wall_time_s": self.elapsed_before + time.time() - self.started}
        _atomic_write(self.dir / "history.json", lambda fh: json.dump(_clean(history), fh, indent=1))

    def summary(self) -> str:
        """The table shown at the end of a run (also saved as summary.md)."""
        def fmt(v: Any, spec: str = ".3f") -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec) if isinstance(v, float) else str(v)
        rounds = [self.rounds[r] for r in sorted(self.rounds)]
        lines = ["| round | foreground Dice | duration (s) |", "|---:|---:|---:|"]
        lines += [f"| {r['round']} | {fmt(r.get('dice'))} | {fmt(r.get('duration_s'), '.1f')} |" for r in rounds]
        last = rounds[-1] if rounds else {"sites": {}}
        lines += ["", "| site | train patients (binned) | val Dice | Dice per class | HD95 (mm) | patient-level ε spent | status |", "|---|---:|---:|---|---:|---:|---|"]
        for name, s in sorted(last["sites"].items()):
            per_class = " / ".join(fmt(d) for d in s.get("val_dice_per_class", []))
            lines.append(f"| {name} | {fmt(s.get('examples'))} | {fmt(s.get('val_dice'))} | {per_class or '-'} | {fmt(s.get('val_hd95_mm'), '.1f')} "
                         f"| {fmt(s.get('epsilon'), '.2f')} | {s.get('status', '-')} |")
        text = "\n".join(lines)
        _atomic_write(self.dir / "summary.md", lambda fh: fh.write(f"# fedseg run summary\n\nDelta: {self.config.get('delta')}\n\n{text}\n"))
        return text
