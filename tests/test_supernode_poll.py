"""The site's SuperNode is Flower's own command with its hard-coded waits capped."""

import subprocess
import sys
from pathlib import Path

from client.supernode_poll import PATCH, supernode_launcher

STOCK = Path(sys.executable).parent / "flower-supernode"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_launcher_is_flowers_supernode_command():
    ours = subprocess.run([*supernode_launcher(), "--help"], capture_output=True, text=True, timeout=120)
    stock = subprocess.run([str(STOCK), "--help"], capture_output=True, text=True, timeout=120)
    assert ours.returncode == stock.returncode == 0
    assert ours.stdout == stock.stdout and "--isolation" in ours.stdout


def test_the_supernode_loop_sleeps_at_most_the_poll():
    probe = "\nt0 = time.monotonic(); loop.time.sleep(3); print(round(time.monotonic() - t0, 2)); print(loop.time.monotonic() > 0)"
    out = _python(PATCH + probe, "0.1")
    assert out.returncode == 0, out.stderr
    slept, other = out.stdout.split()
    assert float(slept) < 1.0 and other == "True"  # 3 s asked, 0.1 s slept; the rest of `time` is intact


def test_a_flower_that_polls_differently_stops_the_command():
    changed = "import flwr.supernode.start_client_internal as m\nm.time = None\n"
    out = _python(changed + PATCH, "0.1")
    assert out.returncode == 1 and "pinned flwr" in out.stderr
