"""The courier's `flwr-clientapp`: Flower's own entry function, started without the SuperNode.

Flower runs every message in a fresh `flwr-clientapp` process that SuperExec finds on PATH. That
command's module lives in the package `flwr.supernode.cli`, whose `__init__` also imports the whole
SuperNode command (SQLAlchemy, Alembic, FastAPI, its object store), which a ClientApp never uses:
~1.2 s of CPU in every message's process (measured on the 2-core machine: 2.6–3.0 s vs 1.3–1.9 s to
import), paid by every site in every round. The launcher puts an empty stand-in for that package
first, so Python loads only `flwr_clientapp.py` from its folder, and then runs Flower's function
unchanged: same arguments, same behaviour.
"""

from __future__ import annotations

import sys
from pathlib import Path

LAUNCHER = """#!{python}
import importlib.util, sys, types

cli = types.ModuleType("flwr.supernode.cli")
cli.__path__ = [importlib.util.find_spec("flwr.supernode").submodule_search_locations[0] + "/cli"]
sys.modules["flwr.supernode.cli"] = cli
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

sys.exit(flwr_clientapp())
"""


def write_launcher(folder: Path) -> Path:
    """`folder/flwr-clientapp` for this Python; put `folder` first on SuperExec's PATH."""
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = folder / "flwr-clientapp"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(0o755)
    return path
