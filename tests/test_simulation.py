"""End to end: `fedseg simulate` as a user runs it, with Flower's simulation engine, real DICOM sites."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dicom_factory import blob_volume, write_seg, write_series


def _simulate(tmp_path: Path, *args: str) -> dict:
    run_dir = tmp_path / "run"
    env = {**os.environ, "FEDSEG_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "2", "--local-epochs", "2", "--image-size", "32",
           "--batch-size", "8", "--out", str(run_dir), *args]
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "foreground Dice" in proc.stdout  # the summary table reached the terminal
    for name in ("history.json", "summary.md", "global_model.pt", "checkpoints/global_model-round002.pt"):
        assert (run_dir / name).is_file(), name
    return json.loads((run_dir / "history.json").read_text())


def _check_history(history: dict, sites: set[str], target_epsilon: float) -> None:
    rounds = {r["round"]: r for r in history["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[2]["dice"] > rounds[0]["dice"] + 0.02, [r["dice"] for r in history["rounds"]]
    for name in sites:
        eps = [rounds[r]["sites"][name]["epsilon"] for r in (1, 2)]
        assert rounds[1]["sites"][name]["status"] == "ok" and 0 < eps[0] < eps[1] <= target_epsilon + 0.05
        assert rounds[2]["sites"][name]["examples"] > 0


def test_two_site_simulation_on_built_in_data_beats_the_initial_model(tmp_path):
    # ε = 30 over the run: still DP-SGD with an accountant, with noise small enough that a
    # 2-round run on ~25 slices per site learns reliably.
    history = _simulate(tmp_path, "--sites", "2", "--size", "tiny", "--epsilon", "30")
    _check_history(history, {"site-01", "site-02"}, 30.0)


def test_simulation_on_site_folders_written_by_other_dicom_tools(tmp_path):
    """--data-root: MR series without preamble, shuffled names, third-party SEGs, one site per folder."""
    root = tmp_path / "hospitals"
    for s, site in enumerate(("st-mary", "city-general")):
        for p in range(4):
            image, mask = blob_volume(shape=(6, 32, 32), seed=10 * s + p)
            mask = np.roll(mask, shift=(p - 2) * 2, axis=2)
            image = image + 200.0 * (mask == 1)
            datasets = write_series(root / site / f"export{p}", image, patient=f"{site}-{p}", tilt_deg=10.0 * s, seed=p)
            write_seg(root / site / "annotations" / f"{p}.dcm", datasets, mask, ["Organ", "Lesion"])
    history = _simulate(tmp_path, "--data-root", str(root), "--epsilon", "30")
    _check_history(history, {"st-mary", "city-general"}, 30.0)
