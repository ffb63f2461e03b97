"""The courier's `flwr-clientapp` launcher runs Flower's own command without importing the SuperNode."""

import subprocess
import sys
from pathlib import Path

import pytest

from client.clientapp_launcher import write_launcher
from client.isolation import Courier
from client.supernode import courier_env

STOCK = Path(sys.executable).parent / "flwr-clientapp"


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # real processes: Flower's command, four times
def test_launcher_is_flowers_command_without_the_supernode(tmp_path):
    launcher = write_launcher(tmp_path)
    ours, stock = _run(str(launcher)), _run(str(STOCK))
    assert ours.returncode == stock.returncode == 0
    assert ours.stdout == stock.stdout and "--runtime-api-address" in ours.stdout
    imported = _run(sys.executable, "-X", "importtime", str(launcher)).stderr
    assert "flwr.supernode.runtime.run_clientapp" in imported
    assert "sqlalchemy" not in imported and "flwr.supernode.cli.flower_supernode" not in imported
    assert "sqlalchemy" in _run(sys.executable, "-X", "importtime", str(STOCK)).stderr  # what the launcher saves


def test_launcher_is_never_written_through_a_planted_link(tmp_path):
    target = tmp_path / "ledger.jsonl"
    target.write_text("kept")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "flwr-clientapp").symlink_to(target)
    with pytest.raises(FileExistsError):
        write_launcher(tmp_path / "bin")
    assert target.read_text() == "kept"


def test_superexec_finds_the_launcher_first(tmp_path):
    launcher = write_launcher(tmp_path)
    courier = Courier(None, None, None, tmp_path, tmp_path)
    found = subprocess.run(["sh", "-c", "command -v flwr-clientapp"], env=courier_env(courier, launcher), capture_output=True, text=True)
    assert found.stdout.strip() == str(launcher)
    found = subprocess.run(["sh", "-c", "command -v flwr-clientapp"], env=courier_env(courier, None), capture_output=True, text=True)
    assert found.stdout.strip() == str(STOCK)
