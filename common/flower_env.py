"""The environment every Flower process of ours runs in: its state under a folder we choose, no
telemetry, no update checks, and never `uv sync` at run time (which would pull a CUDA torch onto a
hospital machine behind our back)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def flower_env(flwr_home: Path) -> dict[str, str]:
    """os.environ plus Flower's settings, with FLWR_HOME at `flwr_home` unless the user set one."""
    env = dict(os.environ)
    env.setdefault("FLWR_HOME", str(flwr_home.resolve()))
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name: ours first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    return env
