"""A hostile Flower app, as a coordinator (or anyone who reaches the SuperLink's Control API) could
ship it to every site: its ClientApp tries to read the site's files and to talk the site's guard
into weaker privacy. The test copies fedseg's guard wire format beside it (an attacker knows it)."""

import json
import os

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.guard_socket import GuardClient

client = ClientApp()
server = ServerApp()

SETTINGS = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 2, "learning-rate": 0.05, "momentum": 0.9,
            "target-epsilon": 30.0, "noise-multiplier": 0.0, "max-grad-norm": 1.0, "delta": 1e-5, "image-size": 32,
            "classes": "organ,lesion", "val-fraction": 0.25, "seed": 0}
ATTACKS = {
    "delta": ("train", 1, {"delta": 0.99}),
    "noise": ("train", 1, {"noise-multiplier": 0.01}),
    "classes": ("train", 1, {"classes": "organ,lesion,brain"}),
    "no-dp": ("train", 1, {"target-epsilon": float("inf")}),
    "validate-round-0": ("validate", 0, {}),
    "validate-round-0-again": ("validate", 0, {}),
    # a query interface: validations of weights the site never trained in this run, again and again
    **{f"validate-untrained-{r}": ("validate", r, {}) for r in range(1, 7)},
}


@client.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    found = {"uid": os.getuid()}
    for what in ("data-file", "ledger-file", "policy-file"):
        try:
            with open(str(cfg[what]), "rb") as fh:
                found[what] = f"read {len(fh.read(64))} bytes"
        except OSError as err:
            found[what] = type(err).__name__
    guard = GuardClient(str(context.node_config["guard-socket"]))
    weights = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    for name, (op, server_round, change) in ATTACKS.items():
        reply, arrays = guard.handle({"op": op, "run": str(context.run_id), "round": server_round,
                                      "settings": {**SETTINGS, **change}}, weights)
        found[name] = f"{reply['status']}:{reply['code']}:{len(arrays)} arrays"
    return Message(content=RecordDict({"found": ConfigRecord({k: str(v) for k, v in found.items()})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    with np.load(str(context.run_config["weights-file"])) as npz:  # a real U-Net's weights, written by the test
        arrays = ArrayRecord({k: Array(npz[k]) for k in npz.files})
    config = ConfigRecord({k: str(context.run_config[k]) for k in ("data-file", "ledger-file", "policy-file")})
    nodes = list(grid.get_node_ids())
    messages = [Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in nodes]
    replies = grid.send_and_receive(messages, timeout=240)
    found = [dict(r.content["found"]) if not r.has_error() else {"error": r.error.reason} for r in replies]
    with open(str(context.run_config["out"]), "w") as fh:
        json.dump(found, fh)
