"""Flower's daemons (SuperLink, SuperNode) and CLI run as child processes of `fedseg`.

Everything a child prints goes to its log file; the console gets the lines a person wants to read
(not the per-poll HTTP access lines), or everything with --verbose. On SIGINT/SIGTERM the child is
stopped (SIGTERM, then SIGKILL after a grace period) so no daemon outlives the command that started it.
Flower's daemons start helpers of their own (SuperExec, app processes) that can outlive them; `fedseg`
makes itself their subreaper, so such orphans come back to it and are stopped too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import psutil

from common.errors import FedsegError

log = logging.getLogger(__name__)

# Flower's INFO chatter and uvicorn's per-request access log: kept in the log file only.
_NOISE = re.compile(r"( INFO \[uvicorn|uvicorn\.access|^INFO:\s|^\x1b\[92mINFO \x1b\[0m:|^\s*$|^\d\d/\d\d/\d{4} [\d:]+:INFO:\s*$)")


_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _libc_prctl()  # looked up here, not in the forked child


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when `fedseg` dies, even by SIGKILL, so that no daemon
    (a SuperLink still serving, an edge still open) outlives the command that started it."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def adopt_orphans() -> None:
    """Linux: descendants whose parent dies are re-parented to this process, not to init."""
    if _PRCTL is not None:  # elsewhere orphans go to init, as usual
        _PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _alive(proc: psutil.Process) -> bool:
    """Running, or stopped, or sleeping: anything but gone or a zombie waiting to be collected."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) descendants of `pid`, parents before children. Found by parent links, not by
    process group or session: Flower's SuperExec runs in a session of its own."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [child.pid for child in below if _alive(child)]


def reap_orphans(keep: Sequence[int] = ()) -> None:
    """Collect adopted orphans that have exited (all our zombie children but `keep`, which Popen owns)."""
    for child in psutil.Process().children():
        if child.pid not in keep and not _alive(child):
            try:
                os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def stop_descendants(grace: float = 5.0) -> None:
    """SIGTERM every process still below us, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = descendants(os.getpid())
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and descendants(os.getpid()) and time.monotonic() < deadline:
            reap_orphans()
            time.sleep(0.2)
    reap_orphans()


class FlowerProcess:
    """One child process whose output is logged in full and shown filtered."""

    def __init__(self, command: Sequence[str], env: dict[str, str], cwd: Path, log_file: Path | None,
                 verbose: bool = False, console: bool = True, user: int | None = None, group: int | None = None,
                 name: str | None = None) -> None:
        self.command = list(command)
        self.name = name or Path(self.command[0]).name  # what the operator is told: `python -c ...` needs a name
        self.log_file = log_file
        self.verbose = verbose
        self.console = console
        self.tail: deque[str] = deque(maxlen=40)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        adopt_orphans()
        self.proc = subprocess.Popen(self.command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                     user=user, group=group, extra_groups=[] if user is not None else None,
                                     preexec_fn=_die_with_parent)
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _copy_output(self) -> None:
        kept = self.log_file.open("a", encoding="utf-8") if self.log_file else None
        try:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.tail.append(line.rstrip("\n"))
                if kept:
                    kept.write(line)
                    kept.flush()
                if self.console and (self.verbose or not _NOISE.search(line)):
                    sys.stdout.write(line)
                    sys.stdout.flush()
        finally:
            if kept:
                kept.close()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        code = self.proc.wait()
        self._pump.join(timeout=5)
        return code

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit code."""
        if self.running():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait()

    def output_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.tail)[-lines:])


class ProcessError(FedsegError):
    """A Flower daemon or CLI that fedseg runs as a child cannot be started."""


class MissingExecutable(ProcessError):
    """A Flower console script is not installed in the environment fedseg runs in."""


def flower_executable(name: str) -> str:
    """Flower's console script from the environment fedseg runs in, not whatever PATH finds first."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise MissingExecutable(f"{name} not found: is flwr installed in this environment ({sys.executable})?")
    return found


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(proc: FlowerProcess, host: str, port: int, timeout: float = 60.0) -> bool:
    """True once `host:port` accepts connections; False if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            return False
        if port_open(host, port):
            return True
        time.sleep(0.3)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_until_stopped(proc: FlowerProcess, *others: FlowerProcess) -> int:
    """Block until the child (or any of `others`) exits or we are told to stop (Ctrl-C, SIGTERM); then
    stop them all and whatever they left behind. Returns the first child's exit code."""
    stopping = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.running() and all(p.running() for p in others) and not stopping.is_set():
            stopping.wait(0.5)
            reap_orphans(keep=[proc.pid, *(p.pid for p in others)])
        if stopping.is_set():
            log.info("stopping ...")
        elif others:  # one of several daemons ended by itself: say which, or the rest just vanish
            ended = next(p for p in (proc, *others) if not p.running())
            log.info(f"{ended.name} exited (code {ended.proc.returncode}); stopping the rest")
        for other in others:
            other.stop()
        code = proc.stop()
        stop_descendants()
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
