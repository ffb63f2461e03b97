"""The bench's bookkeeping, without training: a row over several seeds keeps its spread, and a run a
results folder already finished is read back while one cut short is run again."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulations import bench


def _row(dice: float, lesion: float, wall: float) -> dict:
    sites = {"site-01": {"dice": dice, "hd95_mm": 10.0, "dice_per_class": [2 * dice - lesion, lesion]},
             "site-02": {"dice": dice + 0.1, "hd95_mm": math.nan, "dice_per_class": [2 * dice + 0.2 - lesion, lesion]}}
    return {**bench._summary(sites), "wall_s": wall, "epsilon_spent": 7.9 + wall / 100, "dice_by_round": [0.0, dice]}


def test_a_row_over_seeds_averages_each_site_and_class_and_keeps_the_spread():
    row = bench.over_seeds({0: _row(0.5, 0.2, 10.0), 1: _row(0.7, 0.4, 20.0), 2: _row(0.6, 0.3, 30.0)})
    assert row["per_site"]["site-01"]["dice"] == pytest.approx(0.6) and row["per_site"]["site-02"]["dice"] == pytest.approx(0.7)
    assert row["mean_dice"] == pytest.approx(0.65)
    assert row["mean_dice_sd"] == pytest.approx(0.1)  # the site-means 0.55, 0.75, 0.65: sample sd
    assert row["mean_dice_per_class"] == pytest.approx([1.0, 0.3]) and row["mean_dice_per_class_sd"][1] == pytest.approx(0.1)
    assert math.isnan(row["per_site"]["site-02"]["hd95_mm"])  # undefined at every seed stays undefined
    assert row["wall_s"] == pytest.approx(20.0) and row["epsilon_spent"] == pytest.approx(8.2)  # ε: the largest spent
    assert row["dice_by_round"] == pytest.approx([0.0, 0.6])
    assert set(row["seeds"]) == {"0", "1", "2"} and row["seeds"]["1"]["mean_dice"] == pytest.approx(0.75)
    one = bench.over_seeds({0: _row(0.5, 0.2, 10.0)})
    assert math.isnan(one["mean_dice_sd"]) and "±" not in bench._spread(one["mean_dice"], one["mean_dice_sd"])
    assert bench._spread(row["mean_dice"], row["mean_dice_sd"]) == "0.650 ± 0.100"


def test_a_row_over_seeds_survives_a_seed_without_a_site_or_a_class():
    """A site that did not report in one seed, or reported no per-class Dice, is averaged over the seeds
    that have it; the row's mean is still the mean of the seeds' own means, the population of its sd."""
    full, partial = _row(0.5, 0.2, 10.0), _row(0.7, 0.4, 20.0)
    del partial["per_site"]["site-02"]
    partial.update(bench._summary(partial["per_site"]))
    full["per_site"]["site-01"]["dice_per_class"] = []
    row = bench.over_seeds({0: full, 1: partial})
    assert row["per_site"]["site-02"]["seeds"] == 1 and row["per_site"]["site-01"]["seeds"] == 2
    assert row["per_site"]["site-02"]["dice"] == pytest.approx(0.6)
    assert row["per_site"]["site-01"]["dice_per_class"] == pytest.approx([1.0, 0.4])  # seed 1's only
    assert row["mean_dice"] == pytest.approx((0.55 + 0.7) / 2) and row["mean_dice_sd"] == pytest.approx(0.15 / 2 ** 0.5)


def test_a_finished_run_is_reused_and_one_cut_short_runs_again(tmp_path, monkeypatch):
    from tests.test_run_history import _written_run

    history_dir = tmp_path / "written"
    history_dir.mkdir()
    _written_run(history_dir)
    plan = bench.PLANS["quick"]
    calls = []

    def fake_run(command, log):  # what `fedseg simulate` leaves: the run's history
        calls.append(command)
        run_dir = command[command.index("--out") + 1]
        shutil.copy(history_dir / "history.json", f"{run_dir}/history.json")
        return 0, 12.5, 300.0

    def make_run_dir(command, log):
        run_dir = tmp_path / "out" / "runs" / "fedavg-seed0"
        run_dir.mkdir(parents=True, exist_ok=True)
        return fake_run(command, log)

    (tmp_path / "out" / "logs").mkdir(parents=True)
    cut_short = tmp_path / "out" / "runs" / "fedavg-seed0"
    cut_short.mkdir(parents=True)
    (cut_short / "half-written").write_text("")
    monkeypatch.setattr(bench, "run_measured", make_run_dir)
    first = bench.simulate(plan, "fedavg-seed0", tmp_path / "out", tmp_path / "cache", "--epsilon", "8", seed=3, patients=7)
    assert len(calls) == 1 and not (cut_short / "half-written").exists()  # started again from nothing
    assert calls[0][calls[0].index("--seed") + 1] == "3" and calls[0][calls[0].index("--patients") + 1] == "7"
    assert json.loads((cut_short / "bench-run.json").read_text())["wall_s"] == 12.5
    again = bench.simulate(plan, "fedavg-seed0", tmp_path / "out", tmp_path / "cache", "--epsilon", "8", seed=3, patients=7)
    assert len(calls) == 1  # read back, not run
    assert again["wall_s"] == first["wall_s"] == 12.5 and again["history"].rounds == first["history"].rounds
    bench.simulate(plan, "fedavg-seed0", tmp_path / "out", tmp_path / "cache", "--epsilon", "3", seed=3, patients=7)
    assert len(calls) == 2  # the same label asked with other arguments: run again, never another run's result


def test_a_measurement_the_folder_holds_is_not_repeated(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return {"epoch_s": 1.5, "ratio": math.nan}

    key = {"plan": bench.asdict(bench.PLANS["quick"]), "seed": 0}
    first = bench._once(tmp_path, "dp-cost", key, measure)
    again = bench._once(tmp_path, "dp-cost", key, measure)
    assert len(calls) == 1 and again["measured"]["epoch_s"] == first["measured"]["epoch_s"] == 1.5
    assert math.isnan(again["measured"]["ratio"]) and again["code"] == bench.code_version()
    bench._once(tmp_path, "dp-cost", {**key, "seed": 1}, measure)  # another plan or seed: measured anew
    assert len(calls) == 2


def test_simulate_refuses_a_validation_key_its_existing_sites_do_not_have(tiny_federation, tmp_path):
    """The key splits patients only when a site's policy is made: a run on sites that already have a
    policy (a reused --ledger-dir, --data-root's own) would otherwise split with the old key, silently."""
    from simulations.simulate import prepare_sites, site_policy_for
    from common.config import RUN_DEFAULTS
    from common.site_files import site_folders

    ledgers = tmp_path / "ledgers"
    prepare_sites(site_folders(tiny_federation), ledgers, site_policy_for(RUN_DEFAULTS, 8.0))  # made with a random key

    def simulate(*args: str) -> subprocess.CompletedProcess:  # the CLI as a user runs it (its logging set up in its own process)
        return subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--data-root", str(tiny_federation), *args],
                              cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    refused = simulate("--ledger-dir", str(ledgers), "--validation-key", "AB" * 16, "--out", str(tmp_path / "run"))
    assert refused.returncode != 0 and "--validation-key applies when a site's policy is first made" in refused.stderr
    assert not (tmp_path / "run").exists()  # stopped before anything ran
    not_hex = simulate("--validation-key", "not-hex")
    assert not_hex.returncode == 2 and "hexadecimal" in not_hex.stderr
