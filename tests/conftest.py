import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

CLASSES = ("background", "organ", "lesion")


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> Path:
    """Two tiny synthetic sites written by our generator (real DICOM + DICOM-SEG files)."""
    from simulations.federation import build_federation

    return build_federation(tmp_path_factory.mktemp("cache"), num_sites=2, seed=0, size="tiny")


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


@pytest.fixture
def fedseg_here(monkeypatch, capsys, caplog) -> Callable[..., subprocess.CompletedProcess]:
    """`fedseg ARGS` run in this process, in `cwd`, answered as tests/commands.py's `fedseg` answers:
    for commands that end without starting a daemon, at no cost of a new interpreter importing
    torch and Flower again (seconds each). The CLI's console logging is not installed (it would stay
    for the tests that follow): what the command logs is in `stdout` all the same, as on a console,
    and the message of a refusal is in `stderr`, where Python prints it."""
    from common import cli

    monkeypatch.setattr(cli, "configure_logging", lambda verbose: None)

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        caplog.clear()
        umask = os.umask(0o022)  # `fedseg server` sets the process's own: not the next test's
        os.umask(umask)
        with caplog.at_level(logging.INFO):
            try:
                code, message = cli.main(list(args)), ""
            except SystemExit as stop:  # as the interpreter ends: a message means status 1
                code, message = (stop.code, "") if isinstance(stop.code, int | None) else (1, f"{stop.code}\n")
            finally:
                os.umask(umask)
        said = capsys.readouterr()
        return subprocess.CompletedProcess(["fedseg", *args], code or 0, said.out + caplog.text, said.err + message)

    return run
