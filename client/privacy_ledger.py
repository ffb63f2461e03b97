"""The site's record of privacy spent on one dataset, composed over every round of every run.

A ClientApp is re-created each round and runs end, but DP guarantees compose over every release from
the same data. The ledger stores Opacus' RDP accountant history (noise multiplier, sample rate,
steps) in a JSON file keyed by the dataset's fingerprint, written atomically after each round.
Training without DP marks the dataset as unbounded (ε = ∞) for good. A round holds an exclusive
lock on the ledger from its budget check to its write, so two runs training on the same data at
once cannot both spend the same remaining budget.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opacus.accountants import RDPAccountant

Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class LedgerError(RuntimeError):
    """The ledger exists but cannot be trusted; the site must stop rather than reset it to zero."""


class PrivacyLedger:
    def __init__(self, ledger_dir: str | Path, fingerprint: str, site: str) -> None:
        self.path = Path(ledger_dir) / f"privacy_ledger-{fingerprint}.json"
        self.site, self.fingerprint = site, fingerprint
        self.history: list[Event] = []
        self.non_private_rounds = 0
        self.rounds: list[dict] = []
        if self.path.exists():
            self._load()

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Exclusive use of the ledger across processes, re-read from disk once the lock is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    self._load()
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.history = [(float(s), float(q), int(n)) for s, q, n in data["accountant_history"]]
            self.non_private_rounds = int(data["non_private_rounds"])
            self.rounds = list(data["rounds"])
            if data["fingerprint"] != self.fingerprint:
                raise ValueError("fingerprint mismatch")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable or corrupt ({err}). It is not reset: restore it "
                f"from backup, or ask your privacy officer before removing it."
            ) from err

    def epsilon(self, delta: float, planned: list[Event] | None = None) -> float:
        """ε spent so far (plus `planned` steps), from Opacus' RDP accountant."""
        if self.non_private_rounds:
            return math.inf
        events = self.history + list(planned or [])
        if not events:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = events
        return float(accountant.get_epsilon(delta))

    def record_round(self, history: list[Event], delta: float, run: str, server_round: int, private: bool) -> float:
        """Replace the accountant history with the one after this round, persist it, return ε."""
        self.history = [tuple(e) for e in history]
        if not private:
            self.non_private_rounds += 1
        eps = self.epsilon(delta)
        self.rounds.append({"run": run, "round": server_round, "private": private, "epsilon": eps, "delta": delta, "time": time.time()})
        self._write()
        return eps

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"site": self.site, "fingerprint": self.fingerprint, "accountant": "rdp",
                   "accountant_history": self.history, "non_private_rounds": self.non_private_rounds, "rounds": self.rounds}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
