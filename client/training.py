"""One round of local training at a site (Opacus DP-SGD unless the run is a non-DP baseline), and
validation of a model on the site's held-out patients."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader

from client.privacy_ledger import PrivacyLedger
from common.config import TrainSettings
from common.dataset import SiteData, SliceDataset
from common.losses import segmentation_loss
from common.metrics import class_metrics, foreground_dice


# Opacus' hooks on the first layer fire without input gradients: expected, and harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class BudgetExhausted(RuntimeError):
    """Training this round would push the site past its ε budget."""


@dataclass
class RoundResult:
    train_loss: float
    steps: int
    noise_multiplier: float
    epsilon: float


def plan_noise(settings: TrainSettings, sample_rate: float) -> float:
    """σ for this site: given explicitly, or calibrated so the whole run spends the target ε."""
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier
    return float(get_noise_multiplier(
        target_epsilon=settings.target_epsilon, target_delta=settings.delta, sample_rate=sample_rate,
        epochs=settings.num_rounds * settings.local_epochs, accountant="rdp",
    ))


def train_round(model: torch.nn.Module, data: SiteData, settings: TrainSettings, ledger: PrivacyLedger,
                epsilon_budget: float, device: torch.device, run: str) -> RoundResult:
    """Local epochs from the global weights; refuses (BudgetExhausted) before touching the data."""
    torch.manual_seed(settings.seed * 100_003 + settings.server_round)
    dataset = SliceDataset(data.train_images, data.train_masks, augment=True, seed=settings.seed + settings.server_round)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True)
    sample_rate = 1.0 / len(loader)  # what Opacus' Poisson sampler uses
    steps = settings.local_epochs * len(loader)
    sigma = plan_noise(settings, sample_rate) if settings.private else 0.0
    planned = ledger.epsilon(settings.delta, [(sigma, sample_rate, steps)]) if settings.private else math.inf
    if planned > epsilon_budget:
        spent = ledger.epsilon(settings.delta)
        raise BudgetExhausted(f"training round {settings.server_round} would raise ε from {spent:.3g} to {planned:.3g}, "
                              f"over this site's budget of {epsilon_budget:.3g} (δ={settings.delta:g})")
    model.to(device).train()
    global_weights = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=settings.momentum)
    engine = None
    if settings.private:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the secure-RNG notice; README's privacy section covers it
            engine = PrivacyEngine(accountant="rdp")
            engine.accountant.history = list(ledger.history)  # compose with every earlier round and run
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=settings.max_grad_norm, poisson_sampling=True,
            )
    loss_fn = segmentation_loss()
    losses = []
    for _ in range(settings.local_epochs):
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            # An empty Poisson batch still takes a (pure-noise) step, as the accountant assumes.
            loss = loss_fn(logits, masks) if len(images) else logits.sum() * 0.0
            loss.backward()
            optimizer.step()
            if len(images):
                losses.append(float(loss.detach()))
            if settings.proximal_mu > 0:  # FedProx pull towards the global model: data-independent
                with torch.no_grad():
                    for p, g in zip(model.parameters(), global_weights):
                        p.sub_(settings.learning_rate * settings.proximal_mu * (p - g))
    history = engine.accountant.history if engine else ledger.history
    epsilon = ledger.record_round(history, settings.delta, run, settings.server_round, settings.private)
    return RoundResult(float(np.mean(losses)) if losses else math.nan, steps, sigma, epsilon)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: SiteData, num_classes: int, device: torch.device) -> dict[str, float]:
    """Per-class Dice/IoU/HD95 over the site's validation patients (each a 3D volume), averaged."""
    model.to(device).eval()
    per_volume = []
    for volume in data.validation:
        logits = torch.cat([model(torch.as_tensor(chunk).to(device)) for chunk in np.array_split(volume.image, max(1, len(volume.image) // 32))])
        pred = logits.argmax(dim=1).cpu().numpy()
        per_volume.append(class_metrics(pred, volume.mask, num_classes, volume.spacing))
    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN classes stay NaN
        for name in ("dice", "iou", "hd95"):
            per_class = np.nanmean(np.stack([m[name] for m in per_volume]), axis=0)
            metrics[name] = foreground_dice(per_class) if name == "dice" else float(np.nanmean(per_class))
            for c, value in enumerate(per_class, start=1):
                metrics[f"{name}-class{c}"] = float(value)
    return metrics
