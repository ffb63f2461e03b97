"""The exact patient count does not leave in the size of the noise: Opacus divides the noisy sum
by the expected batch, planned on the binned count, so two sites in one bin scale their updates alike;
and patients are sampled at the rate the accountant charges, whatever their exact count."""

import math

import torch

import client.training as training
from client.guard import open_guard
from client.site_state import SiteState
from common.config import run_config, TrainSettings
from common.dataset import Preprocessing
from common.model import build_model

import pytest

pytestmark = pytest.mark.usefixtures("task_identity")


def test_update_scale_depends_on_the_patient_bin_not_the_exact_count(tiny_site, tmp_path, monkeypatch):
    guard, _ = open_guard(SiteState(tmp_path / "state"), "north", tiny_site, {"epsilon_budget": 20.0, "delta": 1e-3, "example_count_bin": 2,
                                                                                  "validation_fraction": 0.0})  # one validates: 3+ train
    config = run_config({"image-size": 16, "local-epochs": 1, "batch-size": 1, "noise-multiplier": 1.0, "target-epsilon": math.inf, "delta": 1e-3})
    patients = guard.data(("background", "organ", "lesion"), Preprocessing.from_config(config)).train
    assert len(patients) >= 3
    settings = TrainSettings.from_config({**config, "server-round": 1})
    scales = []
    real_init = training.DPOptimizer.__init__

    def recording(self, optimizer, **kwargs):
        scales.append(kwargs["expected_batch_size"])
        real_init(self, optimizer, **kwargs)
    monkeypatch.setattr(training.DPOptimizer, "__init__", recording)
    rates = []
    real_sampler = training.UniformWithReplacementSampler

    def sampler(*, num_samples, sample_rate, **kwargs):
        rates.append(sample_rate)
        return real_sampler(num_samples=num_samples, sample_rate=sample_rate, **kwargs)
    monkeypatch.setattr(training, "UniformWithReplacementSampler", sampler)
    # One bin of 2: the site plans on 2 patients whichever it holds, and so does a site below the bin
    # (1 patient): there the exact count would otherwise set σ, ε and the scale.
    for count in (1, 2, 3):
        planned = guard.policy.planned_count(count)
        plan = training.plan_round(settings, planned, guard.policy.delta)
        training.train_round(build_model(3), patients[:count], settings, plan, 1, 16, torch.device("cpu"))
    assert scales == [1.0, 1.0, 1.0]  # sampling rate 1 / 2 x the 2 planned patients, not x 1, x 2 and x 3
    # Charged and sampled alike: a rate of the exact count (1 / 3 here) would change the other patients'
    # chance of being sampled when one is added, which the accountant does not cover.
    assert rates == [plan.sample_rate] * 3 == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("counts", [(1, 4, 9, 10, 19), (20, 23, 29), (40, 49)])
def test_the_guard_plans_and_releases_the_same_for_every_count_in_a_bin(counts, tmp_path):
    """σ, the sampling rate, the steps and the example count that leave with an update: one value per
    bin (below the first, as if it held a full bin), so neither the exact count nor a bin's edge
    (the count rounded up next to one rounded down would pin 20 exactly) can be read off them."""
    guard, _ = open_guard(SiteState(tmp_path / "state"), "north", tmp_path, {"epsilon_budget": 20.0, "min_noise_multiplier": 0.0})
    settings = TrainSettings.from_config({**run_config({"batch-size": 8, "local-epochs": 2, "num-server-rounds": 5}), "server-round": 1})
    plans = {guard.plan(settings, n) for n in counts}
    assert len(plans) == 1
    (plan,) = plans
    assert plan.patients % 10 == 0 and plan.patients <= max(10, min(counts)) and plan.noise_multiplier > 0


def test_a_non_private_round_is_planned_on_the_exact_count_and_still_releases_the_bin(tmp_path):
    """A baseline (ε = ∞, where the policy allows one) claims no privacy for its un-noised update, so it
    is not slowed by planning on a full bin; the count it releases is the bin all the same."""
    guard, _ = open_guard(SiteState(tmp_path / "state"), "north", tmp_path, {"allow_non_private": True})
    settings = TrainSettings.from_config({**run_config({"target-epsilon": math.inf, "batch-size": 4}), "server-round": 1})
    plan = guard.plan(settings, 7)
    assert (plan.patients, plan.noise_multiplier, plan.sample_rate) == (7, 0.0, 4 / 7)
    assert guard.policy.planned_count(7) == 10
