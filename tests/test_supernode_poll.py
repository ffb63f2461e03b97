"""The site's SuperNode is Flower's own command with its hard-coded waits capped."""

import subprocess
import sys
from pathlib import Path

import pytest

from client.supernode_poll import PATCH, supernode_launcher

STOCK = Path(sys.executable).parent / "flower-supernode"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # real processes: Flower's SuperNode command, twice
def test_launcher_is_flowers_supernode_command():
    ours = subprocess.run([*supernode_launcher(), "--help"], capture_output=True, text=True, timeout=120)
    stock = subprocess.run([str(STOCK), "--help"], capture_output=True, text=True, timeout=120)
    assert ours.returncode == stock.returncode == 0
    assert ours.stdout == stock.stdout and "--isolation" in ours.stdout


def test_the_supernode_loop_polls_fast_only_while_a_run_is_on():
    """poll 0.1 s for 1 s after start or after answering a message; Flower's own wait otherwise."""
    probe = """
def timed(seconds):
    t0 = time.monotonic(); loop.time.sleep(seconds); return round(time.monotonic() - t0, 2)
fresh = timed(3)
time.sleep(1.2)
idle = timed(0.6)
try:
    loop._push_messages(None, None, None, None)  # what the loop calls after pulling a message
except Exception:
    pass
print(fresh, idle, timed(3), loop.time.monotonic() > 0)
"""
    out = _python(PATCH + probe, "0.1", "1.0")
    assert out.returncode == 0, out.stderr
    fresh, idle, answered, other = out.stdout.split()
    assert float(fresh) < 0.5  # just started: 3 s asked, 0.1 s slept
    assert float(idle) >= 0.55  # idle past the window: Flower's own wait
    assert float(answered) < 0.5  # a message was answered: fast again
    assert other == "True"  # the rest of `time` is intact


def test_a_flower_that_polls_differently_stops_the_command():
    changed = "import flwr.supernode.start_client_internal as m\nm.time = None\n"
    out = _python(changed + PATCH, "0.1", "1.0")
    assert out.returncode == 1 and "pinned flwr" in out.stderr
