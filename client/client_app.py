"""The site's Flower ClientApp: a courier that owns nothing.

It comes in the app bundle the coordinator ships, so it is not trusted with anything: it cannot read
the data folder, the privacy ledger or the policy (a deployed site runs it as another OS user), and
imports neither torch nor opacus. It hands the global model and the run's request to the site guard
and the guard's answer — DP-SGD weights and rounded metrics, or a refusal code — to Flower.

Deployed: the guard is reached through the Unix socket named in the node config (`guard-socket`).
Simulated (`fedseg simulate`): Flower's virtual SuperNodes have only a `partition-id`, so the socket
is that entry of the list `fedseg simulate` puts in the environment it starts Flower in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.guard_socket import GuardClient, Handler
from common.site_reply import reply_content, weights_of

GuardFor = Callable[[Mapping[str, Any]], Handler]
SIMULATED_SOCKETS = "FEDSEG_SIMULATED_GUARD_SOCKETS"  # os.pathsep-separated, one per partition-id


def socket_guard(node_config: Mapping[str, Any]) -> Handler:
    """The site's guard: the node config's socket (a deployed site always names one), else the
    simulation's socket for this virtual SuperNode."""
    if "guard-socket" in node_config:
        return GuardClient(str(node_config["guard-socket"]))
    sockets = [s for s in os.environ.get(SIMULATED_SOCKETS, "").split(os.pathsep) if s]
    index = int(node_config.get("partition-id", -1))
    if not 0 <= index < len(sockets):
        raise LookupError(f"no guard socket for this SuperNode: neither `guard-socket` in its node config nor "
                          f"partition {index} in ${SIMULATED_SOCKETS}")
    return GuardClient(sockets[index])


def relay(guard: Handler, msg: Message, context: Context, op: str) -> Message:
    """The message's weights and config to the guard; its answer back as a Flower reply."""
    config = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
    header = {"op": op, "run": str(context.run_id), "round": int(config.get("server-round", 0)), "settings": config}
    try:
        arrays = weights_of(msg.content)
    except ValueError:  # weights that do not unpack: the guard refuses them as not fitting its model
        arrays = {}
    try:
        reply, out = guard.handle(header, arrays)
    except (OSError, ValueError):  # the guard is down or answered nonsense: a code, nothing else
        reply, out = {"status": "error", "code": "guard_unreachable", "metrics": {}}, {}
    return Message(content=reply_content(reply, out), reply_to=msg)


def build_client_app(guard_for: GuardFor = socket_guard) -> ClientApp:
    """A ClientApp relaying to the guard `guard_for(context.node_config)`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return relay(guard_for(context.node_config), msg, context, "train")

    @app.evaluate()
    def validate(msg: Message, context: Context) -> Message:
        return relay(guard_for(context.node_config), msg, context, "validate")

    return app


app = build_client_app()
