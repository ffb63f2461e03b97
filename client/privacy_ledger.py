"""The site's privacy ledger: one per site, append-only, hash-chained JSON lines. Also its audit log.

Every release (a trained model, validation metrics) and every refusal is one line, with the time, the
run and round, the SHA-256 of the arrays released, the metrics (and a trained model's class codes) as
released and the ε before and after. DP composes over every release from the same patients, whatever the run, seed, split or class
list, so there is one ledger for the site: a new or re-anonymised patient inherits the running total
(conservative). Each line carries the hash of the line before it: an edited, reordered or replaced
ledger fails its check and stops the site; it is never reset to zero. ε comes from Opacus' RDP
accountant over the (σ, patient sampling rate, steps) of every training line.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
GENESIS_PREV = "0" * 64


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, sigma: float) -> tuple[float, ...]:
    return tuple(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def rdp_epsilon(events: list[Event], delta: float) -> float:
    """What Opacus' RDPAccountant says for this history, without recomputing the RDP of each entry:
    RDP adds up over steps, so each (σ, q) is computed once and scaled by its steps."""
    rdp = sum(steps * np.asarray(_rdp_per_step(q, sigma)) for sigma, q, steps in events)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha": ε is still valid
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


class LedgerError(RuntimeError):
    """The ledger is missing, unreadable or altered: the site must stop rather than start from zero."""


def _digest(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(lines: list[str]) -> list[dict[str, Any]]:
    """The entries, if the chain holds from the genesis line to the last; LedgerError otherwise."""
    entries, prev = [], GENESIS_PREV
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise LedgerError(f"line {number} is not JSON") from err
        if not isinstance(entry, dict) or entry.get("prev") != prev or entry.get("hash") != _digest(entry) or entry.get("seq") != number - 1:
            raise LedgerError(f"line {number} breaks the hash chain (edited, removed or reordered)")
        entries.append(entry)
        prev = entry["hash"]
    if not entries or entries[0].get("kind") != "genesis":
        raise LedgerError("the ledger does not start with its genesis line")
    return entries


class PrivacyLedger:
    def __init__(self, path: str | Path, entries: list[dict[str, Any]]) -> None:
        self.path, self.entries = Path(path), entries

    @classmethod
    def create(cls, path: str | Path, site: str) -> PrivacyLedger:
        """A new site's ledger: its genesis line. Refuses to replace an existing one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(path, [])
        # A random nonce: no two ledgers ever share a genesis hash, so a replaced one is always caught.
        genesis = ledger._entry("genesis", {"site": site, "nonce": secrets.token_hex(16), "keeps_head": True})
        with open(path, "x") as fh:
            fh.write(json.dumps(genesis, sort_keys=True) + "\n")
        path.chmod(0o600)
        cls(path, [genesis])._write_head()
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path, genesis: str | None = None) -> PrivacyLedger:
        """The ledger at `path`, checked; `genesis` (the hash the site policy names) must match."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"the privacy ledger {path} is missing. fedseg never starts a site's ledger again from zero: "
                              "restore it from backup, or ask your privacy officer")
        head = cls(path, [])._read_head()  # before the lines: a head is written after its line, never ahead of it
        try:
            entries = verify(path.read_text().splitlines())
        except (OSError, UnicodeDecodeError, LedgerError) as err:
            raise LedgerError(f"the privacy ledger {path} cannot be trusted ({err}). It is not reset: restore it from "
                              "backup, or ask your privacy officer") from err
        if genesis is not None and entries[0]["hash"] != genesis:
            raise LedgerError(f"the privacy ledger {path} is not the one this site's policy names (another genesis): "
                              "restore the site's own ledger from backup")
        ledger = cls(path, entries)
        if head is None and entries[0].get("keeps_head"):
            raise LedgerError(f"the privacy ledger's head file {ledger.head_path} is missing: the ledger may have been cut "
                              "short. It is not recreated: restore both from backup, or ask your privacy officer")
        if head is None:  # a ledger from before heads were kept: start keeping one, where this user may write
            try:
                ledger._write_head()
            except PermissionError:  # an auditor reading someone else's ledger
                pass
        elif not (head["seq"] < len(entries) and entries[head["seq"]]["hash"] == head["hash"]):
            raise LedgerError(f"the privacy ledger {path} ends before line {head['seq'] + 1}, which it recorded (cut short, or an "
                              "older backup restored on its own): restore its latest copy, or ask your privacy officer")
        return ledger

    @property
    def head_path(self) -> Path:
        """The last line's number and hash, kept beside the ledger: a chain cut at its end still
        verifies, this file does not let it pass unnoticed."""
        return self.path.with_suffix(".head")

    def _read_head(self) -> dict[str, Any] | None:
        try:
            head = json.loads(self.head_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise LedgerError(f"the ledger's head file {self.head_path} is unreadable ({err}): ask your privacy officer") from err
        if not (isinstance(head, dict) and isinstance(head.get("seq"), int) and head["seq"] >= 0 and isinstance(head.get("hash"), str)):
            raise LedgerError(f"the ledger's head file {self.head_path} is malformed: ask your privacy officer")
        return head

    def _write_head(self) -> None:
        temporary = self.head_path.with_suffix(".head.tmp")
        with open(temporary, "w") as fh:
            fh.write(json.dumps({"seq": self.entries[-1]["seq"], "hash": self.entries[-1]["hash"]}))
            fh.flush()
            os.fsync(fh.fileno())  # never an empty head after a power cut: that would stop the site for good
        temporary.chmod(0o600)
        os.replace(temporary, self.head_path)

    @property
    def genesis(self) -> str:
        return self.entries[0]["hash"]

    @property
    def history(self) -> list[Event]:
        return [tuple(e["event"]) for e in self.entries if e["kind"] == "train"]  # type: ignore[misc]

    def epsilon(self, delta: float, planned: list[Event] | None = None) -> float:
        """Patient-level ε spent so far (plus `planned`), from Opacus' RDP accountant; ∞ once any
        round trained without noise."""
        events = self.history + list(planned or [])
        if any(not sigma > 0 for sigma, _, _ in events):  # no noise (or NaN): unbounded
            return math.inf
        if not events:
            return 0.0
        eps = rdp_epsilon(events, delta)
        return eps if math.isfinite(eps) else math.inf

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Exclusive use across processes from a budget check to the line that records it; the
        ledger is re-read and re-checked once the lock is held."""
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.entries = PrivacyLedger.open(self.path, self.genesis).entries
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _entry(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        prev = self.entries[-1]["hash"] if self.entries else GENESIS_PREV
        entry = {"seq": len(self.entries), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, **fields, "prev": prev}
        return {**entry, "hash": _digest(entry)}

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One line, flushed and fsynced before anything it describes leaves the site."""
        entry = self._entry(kind, json.loads(json.dumps(fields, default=str)))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries.append(entry)
        self._write_head()
        return entry
