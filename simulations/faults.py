"""Faulty sites for simulations: what a federation must survive (a site that crashes, sends NaN or
wrong-shaped weights, or an update 100x too large), injected as a Flower ClientApp mod so the honest
site code stays untouched. Researchers use it to try the server's defences; the tests use it too."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Context, Message, MessageType

from common.site_reply import weights_content, weights_of

FAULTS = ("crash", "nan", "shape", "scale")
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


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


def _corrupt(kind: str, sent: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    state = dict(trained)
    first = next(iter(state))
    if kind == "nan":
        state[first] = np.full_like(state[first], np.nan)
    elif kind == "shape":
        state[first] = state[first][:-1]
    elif kind == "scale":
        state = {k: sent[k] + 100.0 * (v - sent[k]) for k, v in state.items()}
    return state


def fault_mod(faults: dict[int, list[str]]) -> Mod:
    """A ClientApp mod making the listed sites' training replies faulty, one kind per round in turn."""
    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        kinds = faults.get(int(context.node_config["partition-id"]))
        if not kinds or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        kind = kinds[(int(msg.content["config"]["server-round"]) - 1) % len(kinds)]
        if kind == "crash":
            raise RuntimeError("injected fault: the site crashed during training")
        reply = call_next(msg, context)
        if not reply.has_error() and "arrays" in reply.content.array_records:
            weights_content(reply.content, _corrupt(kind, weights_of(msg.content), weights_of(reply.content)))
        return reply
    return mod
