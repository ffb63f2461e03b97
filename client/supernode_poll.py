"""The SuperNode command, with its waits shortened while a run is on.

Flower 1.41's SuperNode sleeps a hard-coded 3 s between pulls while it has no message, and 0.5 s
between looks for the ClientApp's reply (`flwr/supernode/start_client_internal.py`, the module's
only uses of `time`); neither can be configured. A round waits for its slowest site, so it pays the
largest of the sites' idle delays: 2.25 s on average at 3 sites, before any site has started. We
run Flower's own `flower_supernode()` after giving that one module a `time` whose `sleep` is capped
at `poll` seconds (the local waits at 0.1 s) for `active` seconds after the SuperNode starts or has
answered a message; nothing else in Flower changes. So during a run a site asks the server for work
every `poll` seconds (2 small signed requests a second at 0.5 s), and a site idle for longer falls
back to Flower's 3 s, which keeps the server's and the edge's load and logs as they were between runs.

flwr is pinned (pyproject); if its module no longer looks as read here, the command stops with a
message rather than silently running with Flower's waits.
"""

from __future__ import annotations

import sys

IDLE_POLL_S = 0.5
ACTIVE_S = 600.0  # fast polling lasts this long after the last message: rounds of a run come closer together

PATCH = """
import sys, time, types
import flwr.supernode.start_client_internal as loop
if getattr(loop, "time", None) is not time or not callable(getattr(loop, "_push_messages", None)):
    sys.exit("fedseg: this flwr's SuperNode no longer polls as fedseg expects; install the pinned flwr")
poll, active = float(sys.argv.pop(1)), float(sys.argv.pop(1))
busy = [time.monotonic()]
push = loop._push_messages
def answering(*args, **kwargs):
    busy[0] = time.monotonic()
    try:
        return push(*args, **kwargs)
    finally:
        busy[0] = time.monotonic()  # a round longer than the window must not fall back to the slow poll
shorter = types.ModuleType("time")
shorter.__dict__.update(time.__dict__)
local = min(poll, 0.1)  # the 0.5 s waits are for the ClientApp's answer on this machine: no network cost
shorter.sleep = lambda s: time.sleep(min(s, poll if s >= 1 else local) if time.monotonic() - busy[0] < active else s)
loop.time, loop._push_messages = shorter, answering
"""
RUN = """
from flwr.supernode.cli.flower_supernode import flower_supernode
sys.argv[0] = "flower-supernode"
sys.exit(flower_supernode())
"""


def supernode_launcher(poll: float = IDLE_POLL_S, active: float = ACTIVE_S) -> list[str]:
    """The start of a command line that runs `flower-supernode ARGS...` (append ARGS) with its
    waits capped at `poll` seconds while active; `-I`: nothing from this user's environment on
    Python's path."""
    return [sys.executable, "-I", "-c", PATCH + RUN, str(poll), str(active)]
