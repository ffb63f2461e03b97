"""Faulty sites for simulations: what a federation must survive (a site that crashes, sends NaN or
wrong-shaped weights, or an update 100x too large), injected on the site's side of its guard socket
(a wrapper around that site's guard), so neither the honest site code nor the app bundle carries any
of it. Researchers use it to try the server's defences; the tests use it too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from client.guard_socket import Handler
from common.array_codec import Arrays

FAULTS = ("crash", "nan", "shape", "scale")


def parse_faults(specs: Sequence[str]) -> dict[int, list[str]]:
    """`SITE:KIND[,KIND...]` (sites numbered from 1) -> the kinds per site index, one per round in turn."""
    faults: dict[int, list[str]] = {}
    for spec in specs:
        site, _, kinds = spec.partition(":")
        names = [k.strip() for k in kinds.split(",") if k.strip()]
        if not site.isdigit() or int(site) < 1 or not names or set(names) - set(FAULTS):
            raise ValueError(f"--fault {spec!r}: expected SITE:KIND[,KIND...] with SITE a number from 1 and KIND one of {FAULTS}")
        faults[int(site) - 1] = names
    return faults


def _corrupt(kind: str, sent: Arrays, trained: Arrays) -> dict[str, np.ndarray]:
    state = dict(trained)
    first = next(iter(state))
    if kind == "nan":
        state[first] = np.full_like(state[first], np.nan)
    elif kind == "shape":
        state[first] = state[first][:-1]
    elif kind == "scale":
        state = {k: sent[k] + 100.0 * (v - sent[k]) for k, v in state.items()}
    return state


class FaultyGuard:
    """A site's guard whose training answers go wrong, one kind per round in turn. "crash" answers
    what a guard whose training raised answers (an error code, nothing trained)."""

    def __init__(self, guard: Handler, site: str, kinds: Sequence[str]) -> None:
        self.guard, self.site, self.kinds = guard, site, list(kinds)

    def handle(self, header: Mapping[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        server_round = header.get("round")
        if header.get("op") != "train" or type(server_round) is not int or server_round < 1:
            return self.guard.handle(header, arrays)
        kind = self.kinds[(server_round - 1) % len(self.kinds)]
        if kind == "crash":
            return {"status": "error", "code": "internal_error", "site": self.site, "metrics": {}}, {}
        reply, out = self.guard.handle(header, arrays)
        if reply.get("status") == "ok" and out:
            out = _corrupt(kind, arrays, out)
        return reply, out
