"""common.processes finds what a child started by parent links: a helper in a session of its own
(as Flower's SuperExec is) is found, an exited one is not, and adopted orphans are collected."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common.processes import descendants

# A child that starts a grandchild in a new session, prints its pid and waits.
_TREE = ("import subprocess, sys, time\n"
         "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
         "print(g.pid, flush=True)\n"
         "time.sleep(60)\n")


def _wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_descendants_cross_sessions_and_skip_the_dead():
    child = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert os.getsid(grandchild) != os.getsid(child.pid)  # a process-group or session scan would miss it
        assert descendants(child.pid) == [grandchild]
        ours = descendants(os.getpid())
        assert ours.index(child.pid) < ours.index(grandchild)  # parents before children
        os.kill(grandchild, 9)  # a zombie until its parent collects it: not a live descendant
        _wait_until(lambda: descendants(child.pid) == [])
    finally:
        for pid in descendants(child.pid):  # if a check above failed
            os.kill(pid, 9)
        child.kill()
        child.wait()
    assert descendants(child.pid) == []  # gone: nothing, no error


# Run in a child of its own: being a subreaper is not something to leave on the test process.
_ORPHANS = """
import os, subprocess, sys, time
import psutil
from common.processes import adopt_orphans, reap_orphans

def wait_until(check):
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)

adopt_orphans()
kept = subprocess.Popen([sys.executable, "-c", "pass"])
# The middle process exits at once; its child (an orphan) comes back to us and exits shortly after.
middle = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                           "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.5)']).pid)"],
                          stdout=subprocess.PIPE, text=True)
orphan = int(middle.stdout.readline())
middle.wait()
zombie = lambda pid: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
wait_until(lambda: zombie(kept.pid))
wait_until(lambda: psutil.Process(orphan).ppid() == os.getpid() and zombie(orphan))
reap_orphans(keep=[kept.pid])
assert not psutil.pid_exists(orphan)
assert zombie(kept.pid)  # Popen still owns it
assert kept.wait() == 0
print("ok")
"""


def test_adopted_orphans_are_reaped_but_kept_children_are_not():
    done = subprocess.run([sys.executable, "-c", _ORPHANS], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
