"""The SuperNode command, with its waits shortened.

Flower 1.41's SuperNode sleeps a hard-coded 3 s between pulls while it has no message, and 0.5 s
between looks for the ClientApp's reply (`flwr/supernode/start_client_internal.py`, the module's
only uses of `time`); neither can be configured. A round waits for its slowest site, so it pays the
largest of the sites' idle delays: 2.25 s on average at 3 sites, before any site has started. We
run Flower's own `flower_supernode()` after giving that one module a `time` whose `sleep` is capped
at `poll` seconds; nothing else in Flower changes. The cost: an idle site asks the server for work
every `poll` seconds (2 small signed requests a second at 0.5 s) instead of every 3 s.

flwr is pinned (pyproject); if its module no longer uses `time` as read here, the command stops with
a message rather than silently running with Flower's waits.
"""

from __future__ import annotations

import sys

IDLE_POLL_S = 0.5

PATCH = """
import sys, time, types
import flwr.supernode.start_client_internal as loop
if getattr(loop, "time", None) is not time:
    sys.exit("fedseg: this flwr's SuperNode no longer polls as fedseg expects; install the pinned flwr")
poll = float(sys.argv.pop(1))
shorter = types.ModuleType("time")
shorter.__dict__.update(time.__dict__)
shorter.sleep = lambda seconds: time.sleep(min(seconds, poll))
loop.time = shorter
"""
RUN = """
from flwr.supernode.cli.flower_supernode import flower_supernode
sys.argv[0] = "flower-supernode"
sys.exit(flower_supernode())
"""


def supernode_launcher(poll: float = IDLE_POLL_S) -> list[str]:
    """The start of a command line that runs `flower-supernode ARGS...` (append ARGS) with its
    waits capped at `poll` seconds; `-I`: nothing from this user's environment on Python's path."""
    return [sys.executable, "-I", "-c", PATCH + RUN, str(poll)]
