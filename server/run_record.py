"""What a run leaves behind: global-model checkpoints, `history.json` and a summary table.

`RunRecord` writes them. Every reader of history.json (resume, `run_status`, the resume config, the
report, the bench) gets it as a typed `RunHistory` (`RunHistory.read`), so which rounds were completed
or validated, and how the final per-site table reads, is decided here once. The file format is the
writer's: numbers are read the way `history_number` reads them (null is NaN, "inf" is ∞) and written
the way `json_ready` writes them; a key a record does not know (sites add metrics over time) is kept
in its `extra`, and a site's entry is kept whole as a plain dict of metrics, so a load/save round trip
loses nothing.

Every file is written to a temporary name and renamed into place, so a crash mid-write never
leaves a truncated checkpoint or history behind the "latest" name.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from flwr.app import ArrayRecord

from common.class_codes import Pair, consensus, stored
from common.config import class_names

HISTORY_FILE = "history.json"


class HistoryFormatError(ValueError):
    """The file is JSON, but not a run's history."""


def json_ready(value: Any) -> Any:
    """JSON has no NaN/Infinity: undefined metrics become null, ε = ∞ becomes the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


def history_number(value: Any) -> float:
    """A number as history.json holds it, back as a float: null is NaN, "inf" is ∞ (see `json_ready`)."""
    return math.nan if value is None else float(value)


def cell(value: Any, spec: str = ".3f") -> str:
    """A table cell: undefined (a class absent from the truth, a site that did not report) is a dash."""
    number = history_number(value)
    return "–" if math.isnan(number) else format(number, spec)


_BOOKKEEPING = ("extra", "key_order")


@dataclass
class _JsonRecord:
    """A dataclass read from, and written back to, one JSON object: its fields by name, the `_numbers`
    among them through `history_number`, every other key in `extra`. Written back in the order the
    keys were read (new ones after them); a field that is None, or that the object read lacked and
    still holds its default, is left out."""

    _required: ClassVar[dict[str, type]] = {}  # key: the JSON type it must hold
    _numbers: ClassVar[tuple[str, ...]] = ()
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    key_order: tuple[str, ...] = field(default=(), kw_only=True, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        return cls(**cls._fields_from(data))

    @classmethod
    def _fields_from(cls, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise HistoryFormatError(f"a {cls.__name__} is a JSON object, not {type(data).__name__}")
        wrong = [k for k, kind in cls._required.items() if not isinstance(data.get(k), kind)]
        if wrong:
            raise HistoryFormatError(f"a {cls.__name__} lacks {', '.join(wrong)} (or holds another type there)")
        known = {f.name for f in fields(cls)} - set(_BOOKKEEPING)
        try:
            values = {k: history_number(v) if k in cls._numbers else v for k, v in data.items() if k in known}
        except TypeError as err:
            raise HistoryFormatError(f"a {cls.__name__} holds a number that is none: {err}") from err
        return {**values, "extra": {k: v for k, v in data.items() if k not in known}, "key_order": tuple(data)}

    def to_json(self) -> dict[str, Any]:
        """The JSON object this record was read from (the writer's keys, numbers as it writes them)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in _BOOKKEEPING and self._written(f)}
        out = {**{k: v for k, v in out.items() if v is not None}, **self.extra}
        position = {k: i for i, k in enumerate(self.key_order)}
        return json_ready(dict(sorted(out.items(), key=lambda item: position.get(item[0], len(position)))))

    def _written(self, f: Field) -> bool:
        """A key that the object read lacked stays absent while its field holds the default."""
        if not self.key_order or f.name in self.key_order:
            return True
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        return getattr(self, f.name) != default


def _plain(value: Any) -> Any:
    if isinstance(value, _JsonRecord):
        return value.to_json()
    return [_plain(v) for v in value] if isinstance(value, list) else value


@dataclass
class RoundRecord(_JsonRecord):
    """One round: the sites' entries (plain dicts of metrics: training of this round, validation of
    this round's global model), when it started, its checkpoint and duration, and the aggregated
    foreground Dice of its global model (None: not validated; NaN: validated, undefined)."""

    _required: ClassVar[dict[str, type]] = {"round": int}
    _numbers: ClassVar[tuple[str, ...]] = ("started", "duration_s", "dice")

    round: int
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float | None = None
    train_bytes_to_each_site: int | None = None
    evaluate_bytes_to_each_site: int | None = None
    checkpoint: str | None = None
    duration_s: float | None = None
    dice: float | None = None

    @property
    def validated(self) -> bool:
        return self.dice is not None

    @property
    def completed(self) -> bool:
        """Its global model was saved: a resumed run goes on after it. Histories written before
        2026-11-23 name no checkpoint; there a validated round counts as completed."""
        return self.checkpoint is not None or self.validated


@dataclass
class RunEvent(_JsonRecord):
    """What a reader of the run must know: a resumption, a retry, a stop."""

    _required: ClassVar[dict[str, type]] = {"event": str}
    _numbers: ClassVar[tuple[str, ...]] = ("time",)

    event: str
    time: float | None = None


@dataclass
class RunHistory(_JsonRecord):
    """A run's history.json: its config, status ("running", "completed", "stopped"; None in a file
    that never said), rounds in order, events, the Flower node id → site name map, wall time, and
    what each class is in codes (`common.class_codes.stored`; {} before any site sent codes, and in
    older files)."""

    _required: ClassVar[dict[str, type]] = {"config": dict, "rounds": list}
    _numbers: ClassVar[tuple[str, ...]] = ("wall_time_s",)

    config: dict[str, Any]
    status: str | None = None
    privacy_unit: str | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    site_nodes: dict[str, str] = field(default_factory=dict)
    events: list[RunEvent] = field(default_factory=list)
    wall_time_s: float | None = None
    class_codes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> RunHistory:
        values = cls._fields_from(data)
        values["rounds"] = [RoundRecord.from_json(r) for r in values["rounds"]]
        if "events" in values:
            if not isinstance(values["events"], list):
                raise HistoryFormatError("a history's events are a list")
            values["events"] = [RunEvent.from_json(e) for e in values["events"]]
        return cls(**values)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunHistory:
        """RUN_DIR/history.json. OSError when it cannot be read, ValueError when it is not a run's
        history (not JSON, or a HistoryFormatError)."""
        return cls.from_json(json.loads((Path(run_dir) / HISTORY_FILE).read_text()))

    def completed_rounds(self) -> list[RoundRecord]:
        return [r for r in self.rounds if r.completed]

    def last_completed(self) -> RoundRecord | None:
        """The round a resumed run goes on after."""
        return max(self.completed_rounds(), key=lambda r: r.round, default=None)

    def validated_rounds(self) -> list[RoundRecord]:
        return [r for r in self.rounds if r.validated]

    def last_validated(self) -> RoundRecord | None:
        """The last round whose global model the sites validated: its site entries hold both that
        round's training and the validation of what it produced (the run's final state)."""
        return max(self.validated_rounds(), key=lambda r: r.round, default=None)

    def dice_series(self) -> list[float]:
        """The aggregated foreground Dice of every round in order, NaN where it was not validated."""
        return [math.nan if r.dice is None else r.dice for r in self.rounds]

    def durations(self) -> dict[int, float]:
        """Round → wall time (s), for the rounds that were timed (round 0 trains nothing)."""
        return {r.round: r.duration_s for r in self.rounds if r.duration_s is not None}

    def by_round(self) -> dict[int, RoundRecord]:
        return {r.round: r for r in self.rounds}

    def site_names(self) -> list[str]:
        return sorted({name for r in self.rounds for name in r.sites})

    def site_series(self, key: str) -> dict[str, tuple[list[int], list[float]]]:
        """Per site: the rounds whose entry has `key`, and its values."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for r in self.rounds:
            for site, entry in r.sites.items():
                if key in entry:
                    rounds, values = out.setdefault(site, ([], []))
                    rounds.append(r.round)
                    values.append(history_number(entry[key]))
        return out


@dataclass(frozen=True)
class SiteTable:
    """The run's final per-site table: one row per site of the last validated round, as text cells.
    The summary (markdown) and the report (HTML) show the same rows."""

    round: int | None
    header: tuple[str, ...]
    numeric: tuple[bool, ...]  # per column: right-aligned in markdown
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> str:
        align = tuple("---:" if n else "---" for n in self.numeric)
        return "\n".join("| " + " | ".join(line) + " |" for line in (self.header, align, *self.rows))

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return f"<p>Final round: {'–' if self.round is None else self.round}</p><table><tr>{head}</tr>{rows}</table>"


def final_site_table(history: RunHistory) -> SiteTable:
    """The table the summary (summary.md, the end of a run) and the report (report.html) both show."""
    last = history.last_validated()
    try:  # a history's own list: older code accepted lists (a repeated name) that are refused today
        classes = " / ".join(class_names(history.config)[1:])
    except (KeyError, ValueError):
        classes = "per class"
    header = ("site", "train patients (binned)", "val Dice", f"Dice {classes}", "HD95 (mm)", "patient-level ε spent", "training status")
    numeric = (False, True, True, False, True, True, False)
    rows = tuple((name, cell(s.get("examples"), ".0f"), cell(s.get("val_dice")),
                  " / ".join(cell(d) for d in s.get("val_dice_per_class", [])) or "–",
                  cell(s.get("val_hd95_mm"), ".1f"), cell(s.get("epsilon"), ".2f"), str(s.get("status", "–")))
                 for name, s in sorted((last.sites if last else {}).items()))
    return SiteTable(None if last is None else last.round, header, numeric, rows)


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


def run_status(run_dir: str | Path) -> str | None:
    """"completed", "stopped", "running" (or interrupted), or None when the folder holds no run."""
    try:
        return RunHistory.read(run_dir).status
    except (OSError, ValueError):
        return None


class ResumeError(RuntimeError):
    """The run folder holds nothing a run can be resumed from."""


def weighted_as_it_ran(classes: str) -> str:
    """A run's `classes` with the loss weights it trained with. Since per-class weights, a run's record
    writes every weight (`run_config`); a list without any is from before, when the code weighed the
    first class 2 and the last 40, those between spaced geometrically (one class: 2)."""
    if ":" in classes:
        return classes
    names = [c.strip() for c in classes.split(",") if c.strip()]
    ratio = 20.0 ** (1 / (len(names) - 1)) if len(names) > 1 else 1.0
    return ",".join(f"{name}:{2.0 * ratio**i:.12g}" for i, name in enumerate(names))


class RunRecord:
    def __init__(self, run_dir: str | Path, config: dict[str, Any]) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rounds: dict[int, dict[str, Any]] = {}
        self.site_nodes: dict[str, str] = {}  # Flower node id -> site name, learnt from replies
        # Site name -> the class codes it released; every training reply brings them again, so a resumed run relearns them.
        self.site_codes: dict[str, dict[str, Pair]] = {}
        self.class_codes: dict[str, Any] = {}  # what the sites agree each class is (`stored`): checkpoints and history
        self.events: list[dict[str, Any]] = []  # resumptions, retries, a stop: what a reader must know
        self.status = "running"
        self.started = time.time()
        self.elapsed_before = 0.0
        self.clocked: set[int] = set()  # rounds whose messages went out in this process

    @classmethod
    def resume(cls, run_dir: str | Path, config: dict[str, Any]) -> tuple[RunRecord, dict[str, Any], int]:
        """The record of an interrupted run, cut back to its last completed round, and that round's
        checkpoint. Only `config`'s RESUMABLE keys override the run's own configuration; keys the run
        predates take what the run used (not `config`'s: a resume asking for another value must not
        change it mid-run): `ct-window` its default, `spacing` 0 (whole slices), `mr-intensity`
        percentiles, class weights `weighted_as_it_ran`."""
        from common.config import RESUMABLE, RUN_DEFAULTS

        run_dir = Path(run_dir)
        try:
            history = RunHistory.read(run_dir)
        except (OSError, ValueError) as err:
            raise ResumeError(f"cannot resume from {run_dir}: no readable history.json ({err})") from err
        completed = history.last_completed()
        if completed is None:
            raise ResumeError(f"cannot resume from {run_dir}: no round was completed")
        last = completed.round
        checkpoint = torch.load(run_dir / "checkpoints" / f"global_model-round{last:03d}.pt", weights_only=True)
        saved = {**history.config, "classes": weighted_as_it_ran(str(history.config.get("classes", RUN_DEFAULTS["classes"]))),
                 "spacing": history.config.get("spacing", 0.0),  # before `spacing`, slices were resampled whole (0)
                 "mr-intensity": history.config.get("mr-intensity", "percentiles")}
        record = cls(run_dir, {**RUN_DEFAULTS, **saved, **{k: config[k] for k in RESUMABLE if k in config}})
        record.rounds = {r.round: r.to_json() for r in history.rounds if r.round <= last}
        record.site_nodes = dict(history.site_nodes)
        record.class_codes = dict(history.class_codes)
        record.events = [e.to_json() for e in history.events]
        wall = history.wall_time_s
        record.elapsed_before = wall if wall is not None and math.isfinite(wall) else 0.0
        lost = sorted({r.round for r in history.rounds} - set(record.rounds))
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

    def agree_on_codes(self) -> list[str]:
        """`class_codes` from the sites' (`site_codes`): per class the coding a strict majority of the
        sites that released one for it released; the classes they disagree on (what the sites' SEGs say,
        never which site's patients)."""
        agreed, disputed = consensus(self.site_codes.values())
        if self.site_codes:
            self.class_codes = stored(agreed)
        return disputed

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord, strategy_state: dict[str, Any]) -> Path:
        """The round's global model; from here on the round survives a crash (its validation rides
        in the next round's train message). A round's duration ends here."""
        state = {"state_dict": arrays.to_torch_state_dict(), "round": server_round, "config": self.config,
                 "strategy_state": strategy_state, "class_codes": self.class_codes}
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

    def _history_json(self) -> dict[str, Any]:
        return json_ready({"config": self.config, "status": self.status, "privacy_unit": "patient",
                           "rounds": [self.rounds[r] for r in sorted(self.rounds)], "site_nodes": self.site_nodes,
                           "events": self.events, "wall_time_s": self.elapsed_before + time.time() - self.started,
                           "class_codes": self.class_codes})

    def write_history(self) -> None:
        history = self._history_json()
        _atomic_write(self.dir / HISTORY_FILE, lambda fh: json.dump(history, fh, indent=1))

    def history(self) -> RunHistory:
        """What a reader of history.json gets, as it stands now."""
        return RunHistory.from_json(self._history_json())

    def summary(self) -> str:
        """The table shown at the end of a run (also saved as summary.md)."""
        history = self.history()
        lines = ["| round | foreground Dice | duration (s) |", "|---:|---:|---:|"]
        lines += [f"| {r.round} | {cell(r.dice)} | {cell(r.duration_s, '.1f')} |" for r in history.rounds]
        text = "\n".join(lines) + "\n\n" + final_site_table(history).markdown()
        _atomic_write(self.dir / "summary.md", lambda fh: fh.write(f"# fedseg run summary\n\nDelta: {self.config.get('delta')}\n\n{text}\n"))
        return text
