"""The courier's `flwr-clientapp`: Flower's own entry function, started without the SuperNode.

Flower runs every message in a fresh `flwr-clientapp` process that SuperExec finds on PATH. That
command's module lives in the package `flwr.supernode.cli`, whose `__init__` also imports the whole
SuperNode command (SQLAlchemy, Alembic, FastAPI, its object store), which a ClientApp never uses:
~1.2 s of CPU in every message's process (measured on the 2-core machine: 2.6–3.0 s vs 1.3–1.9 s to
import), paid by every site in every round. The launcher puts an empty stand-in for that package
first, so Python loads only `flwr_clientapp.py` from its folder, and then runs Flower's function
unchanged: same arguments, exit code and signal handling.

It lives in a folder only the guard's user can write (the courier may read and run it), runs with
`-I` (no script folder, user site or PYTHON* variables on its path), and is created exclusively,
never through a link.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LAUNCHER = """#!{python} -I
import importlib.util, sys, types

if __name__ == "__main__":
    cli = types.ModuleType("flwr.supernode.cli")
    cli.__path__ = [importlib.util.find_spec("flwr.supernode").submodule_search_locations[0] + "/cli"]
    sys.modules["flwr.supernode.cli"] = cli
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.exit(flwr_clientapp())
"""
SHEBANG_MAX = 127  # what Linux reads of a #! line


def write_launcher(folder: Path) -> Path | None:
    """`folder/flwr-clientapp` for this Python (put `folder` first on SuperExec's PATH), or None
    where a #! line cannot name this Python (a space in its path, or too long): Flower's own
    command is then used, only slower. `folder` must be writable by this user alone."""
    python = sys.executable
    if " " in python or len(python) + 4 > SHEBANG_MAX:
        return None
    path = folder / "flwr-clientapp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
    with os.fdopen(fd, "w") as out:
        out.write(LAUNCHER.format(python=python))
        os.fchmod(out.fileno(), 0o755)  # whatever the umask
    return path
