import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

CLASSES = ("background", "organ", "lesion")


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> Path:
    """Two tiny synthetic sites written by our generator (real DICOM + DICOM-SEG files)."""
    from simulations.federation import build_federation

    return build_federation(tmp_path_factory.mktemp("cache"), num_sites=2, seed=0, size="tiny", progress=lambda _: None)


@pytest.fixture(scope="session")
def tiny_site(tiny_federation) -> Path:
    return tiny_federation / "site-01"


@pytest.fixture
def task_identity():
    """Flower stamps Messages with the running task's identity; its runtimes set it, so do we."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
