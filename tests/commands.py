"""Running `fedseg` commands as a person would: in their own process group, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
FEDSEG = [sys.executable, "-m", "common.cli"]


def fedseg(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDSEG, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


class Background:
    """A `fedseg` command in its own process group, output to a file."""

    def __init__(self, name: str, args: list[str], cwd: Path) -> None:
        self.log = cwd / f"{name}.out"
        self.proc = subprocess.Popen([*FEDSEG, *args], cwd=cwd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"exited early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.5)

    def group(self) -> list[int]:
        """Live processes in this command's process group (it and everything it started)."""
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        return alive

    def stop(self) -> list[int]:
        """SIGTERM to fedseg alone (it must stop its children); returns what was still alive after it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(1)
        leftovers = self.group()
        if leftovers:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return leftovers


def require_nginx() -> None:
    """`fedseg server` needs nginx (its edge). The README's test setup installs it; CI must have it."""
    from server.edge import EdgeError, find_nginx

    try:
        find_nginx()
    except EdgeError:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed: .ci/run installs nginx-light")
        pytest.skip("nginx not installed (apt-get install nginx-light)")
