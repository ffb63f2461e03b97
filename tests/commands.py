"""Running `fedseg` commands as a person would: in their own process group, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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

    def _started(self) -> list[psutil.Process]:
        """This command and what it started, by parent links (Flower's SuperExec runs in a session of its
        own, outside the process group) and by process group (what was orphaned and re-parented)."""
        try:
            found = [psutil.Process(self.proc.pid)]
            found += found[0].children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        seen = {p.pid for p in found}
        for proc in psutil.process_iter():
            try:
                if proc.pid not in seen and os.getpgid(proc.pid) == self.proc.pid:
                    found.append(proc)
            except OSError:  # gone
                pass
        return found

    def group(self) -> list[int]:
        """Live processes of this command: it and everything it started (its process group and its descendants)."""
        return [p.pid for p in self._started() if _alive(p)]

    def stop(self) -> list[int]:
        """SIGTERM to fedseg alone (it must stop its children); returns what was still alive after it,
        including helpers in sessions of their own that fedseg started (seen before it was told to stop)."""
        started = self._started()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(1)
        leftovers = [p for p in {p.pid: p for p in [*started, *self._started()]}.values() if _alive(p)]
        if leftovers:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in leftovers:  # those in sessions of their own
            try:
                proc.kill()  # psutil checks the pid was not reused meanwhile
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in leftovers]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def require_nginx() -> None:
    """`fedseg server` needs nginx (its edge). The README's test setup installs it; CI must have it."""
    from server.edge import EdgeError, find_nginx

    try:
        find_nginx()
    except EdgeError:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed: .ci/run installs nginx-light")
        pytest.skip("nginx not installed (apt-get install nginx-light)")
