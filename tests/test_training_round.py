"""What a site's training round takes from the run config: the class weights of `classes` (the task's,
not a rule on the list's order), and, for a non-private (ε = ∞ baseline) round, the DP step without
its noise: each patient's gradient clipped to `max-grad-norm`, summed, divided by the expected batch
(clipping only the batch's gradient, FedAvg without DP lost the organ on two seeds of three; README)."""

import math

import pytest
import torch

import client.training as training
from client.guard import open_guard
from client.site_state import SiteState
from common.config import TrainSettings, run_config
from common.dataset import Preprocessing
from common.model import build_model

pytestmark = pytest.mark.usefixtures("task_identity")


def test_a_non_private_step_is_the_dp_step_without_its_noise(tiny_site, tmp_path, monkeypatch):
    """Every patient's gradient is clipped by itself (the clipping norm is far below each), the sum is
    divided by the expected batch, and no noise is drawn: a step moves the weights at most
    lr × norm × (patients in it) / expected batch, whatever one patient's gradient."""
    guard, _ = open_guard(SiteState(tmp_path / "state"), "north", tiny_site, {"allow_non_private": True, "validation_fraction": 0.0})
    config = run_config({"image-size": 16, "local-epochs": 1, "batch-size": 2, "target-epsilon": math.inf, "momentum": 0.0,
                         "learning-rate": 1.0, "max-grad-norm": 1e-3})
    settings = TrainSettings.from_config({**config, "server-round": 1})
    patients = guard.data(("background", "organ", "lesion"), Preprocessing.from_config(config)).train
    plan = training.plan_round(settings, guard.policy.planned_count(len(patients), private=False), guard.policy.delta)
    assert plan.noise_multiplier == 0
    clipped = []
    real_step = training.DPOptimizer.step

    def step(self, *args, **kwargs):
        norms = None  # an empty Poisson batch
        if self.params[0].grad_sample.shape[0]:
            norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) ** 2 for p in self.params]).sum(0).sqrt()
        result = real_step(self, *args, **kwargs)
        clipped.append((norms, [p.grad.detach().clone() for p in self.params]))
        return result

    monkeypatch.setattr(training.DPOptimizer, "step", step)
    import opacus.optimizers.optimizer as opacus_optimizer

    stds = []
    real_noise = opacus_optimizer._generate_noise
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", lambda std, *args, **kwargs: stds.append(std) or real_noise(std, *args, **kwargs))
    torch.manual_seed(0)
    model = build_model(3)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    training.train_round(model, patients, settings, plan, 1, 16, torch.device("cpu"))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    lr, expected = training.round_learning_rate(settings), plan.sample_rate * plan.patients
    for norms, grads in clipped:
        step_norm = float(torch.cat([g.flatten() for g in grads]).norm())
        count = 0 if norms is None else len(norms)
        assert step_norm <= count * 1e-3 / expected * 1.0001  # each patient contributes at most the clipping norm
        if norms is not None:
            assert (norms > 1e-3).all()  # and every one was clipped: a loose bound would not have held them
    assert stds and set(stds) == {0.0}  # no noise
    assert 0 < float((after - before).norm()) <= sum(len(n) if n is not None else 0 for n, _ in clipped) * lr * 1e-3 / expected * 1.0001


def test_the_loss_weighs_the_classes_as_the_run_config_says(tiny_site, tmp_path, monkeypatch):
    guard, _ = open_guard(SiteState(tmp_path / "state"), "north", tiny_site, {"validation_fraction": 0.0})
    weights = []
    real_loss = training.patient_loss
    monkeypatch.setattr(training, "patient_loss", lambda w: weights.append(list(w)) or real_loss(w))
    for classes in ("organ:3,lesion:7.5", "organ,lesion"):
        config = run_config({"image-size": 16, "local-epochs": 1, "batch-size": 2, "classes": classes})
        settings = TrainSettings.from_config({**config, "server-round": 1})
        patients = guard.data(("background", "organ", "lesion"), Preprocessing.from_config(config)).train
        plan = training.plan_round(settings, guard.policy.planned_count(len(patients)), guard.policy.delta)
        training.train_round(build_model(3), patients, settings, plan, 1, 16, torch.device("cpu"))
    assert weights == [[1.0, 3.0, 7.5], [1.0, 1.0, 1.0]]


def test_a_weighted_class_costs_more_when_it_is_missed():
    """The weights are applied, not just passed: predicting the lesion as organ costs far more at
    lesion weight 40 than unweighted."""
    from common.losses import patient_loss

    truth = torch.zeros(1, 3, 4, 4)
    truth[:, 0] = 1
    truth[:, 0, 1:3, 1:3], truth[:, 1, 1:3, 1:3] = 0, 1  # organ
    truth[:, 1, 2, 2], truth[:, 2, 2, 2] = 0, 1  # a lesion pixel inside it
    lesion_missed = 5 * truth[:, [0, 1, 1]]  # the lesion pixel scored as organ
    lesion_missed[:, 2] = 0
    cost = {w: float(patient_loss([1.0, 1.0, w])(lesion_missed, truth) - patient_loss([1.0, 1.0, w])(5 * truth, truth))
            for w in (1.0, 40.0)}
    assert cost[40.0] > 10 * cost[1.0] > 0
