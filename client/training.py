"""One round of local training at a site: DP-SGD with the *patient* as the unit of privacy, and
validation of a model on the site's held-out patients.

Each step Poisson-samples patients (not slices); a sampled patient contributes a fixed number of
patches of its slices, drawn by the site from that patient's own labels (foreground-oversampled), and the gradient of that patient's loss is clipped as one (per-patient
gradients by `torch.func.vmap`; clipping, noise and averaging by Opacus' DPOptimizer). Opacus' RDP
accountant over (σ, patient sampling rate, steps) then bounds what any one patient can change.
The sampler and the noise draw from a generator the site seeds from the OS: nobody who knows the run
config can replay or subtract them. The run seed only drives augmentation.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.func import functional_call, grad_and_value, vmap

from common.config import TrainSettings
from common.dataset import Patient, SiteData, augmentation
from common.inference import native_labels
from common.losses import patient_loss
from common.metrics import class_metrics, foreground_dice

Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one accountant entry
# Per-patient gradients are computed this many patients at a time: the same numbers, in a fraction of
# the memory (measured, `fedseg bench`'s DP-cost epoch, 64 px, 4 slices a patient, 1 thread: peak
# 278–295 MB against 928–1120 MB for the whole batch at once, equal time within noise).
PATIENTS_PER_CHUNK = 4


@dataclass(frozen=True)
class RoundPlan:
    """What a round will spend, known before any data is touched."""

    sample_rate: float  # expected patients per step / the planned count (SitePolicy.planned_count); what is sampled and charged
    steps: int
    noise_multiplier: float  # 0: not private
    patients: int  # the count it was planned on (SitePolicy.planned_count of the site's): the update is scaled by it too

    @property
    def event(self) -> Event:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def plan_round(settings: TrainSettings, num_patients: int, delta: float) -> RoundPlan:
    """Patient sampling rate and steps for `local_epochs` expected passes over the patients; σ as
    given, or calibrated so the run's rounds together spend the target ε (at the site's δ)."""
    q = min(1.0, settings.batch_size / num_patients)
    steps = max(1, round(settings.local_epochs / q))
    if not settings.private:
        return RoundPlan(q, steps, 0.0, num_patients)
    sigma = settings.noise_multiplier or calibrated_noise(settings.target_epsilon, delta, q, steps * settings.num_rounds)
    return RoundPlan(q, steps, sigma, num_patients)


@functools.lru_cache(maxsize=64)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' calibration (seconds of RDP maths): once per run and site, not every round."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


def os_seeded_generator(device: torch.device) -> torch.Generator:
    """A generator nobody outside this process can predict (Opacus' secure_mode wants torchcsprng,
    unmaintained for current torch; its secure noise path takes any generator)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _slices(patient: Patient, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """`count` of the patient's slices, each with the class its patch is to be centred on (0: anywhere),
    foreground-oversampled as nnU-Net does: when the patient has foreground, at least half of them (as
    far as it has such slices) show its rarest foreground class, and their patches are centred on it.

    The choice reads this patient's own labels only (the patient is the privacy unit: this is its own
    processing, like augmentation); no statistic over other patients enters. With replacement only
    when the patient has fewer slices than `count`."""
    n = len(patient.masks)
    present = np.bincount(np.concatenate([m.ravel() for m in patient.masks]), minlength=2)[1:]
    if not present.any():
        return [(k, 0) for k in _draw(np.arange(n), count, generator)]
    rarest = 1 + int(np.argmin(np.where(present > 0, present, np.iinfo(np.int64).max)))
    showing = np.flatnonzero([(m == rarest).any() for m in patient.masks])
    others = np.setdiff1d(np.arange(n), showing)
    wanted = min(len(showing), max(math.ceil(count / 2), count - len(others)))
    picked = [(k, rarest) for k in _draw(showing, wanted, generator)] + [(k, 0) for k in _draw(others, min(count - wanted, len(others)), generator)]
    return picked + [(k, 0) for k in _draw(np.arange(n), count - len(picked), generator)]


def _patch(image: np.ndarray, mask: np.ndarray, size: int, focus: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A `size` x `size` patch of one slice ([1, H, W] image, [H, W] mask): centred on a random pixel of
    class `focus` (0: anywhere on the slice), shifted to lie within it. A slice smaller than the patch
    is padded by its edge pixels, as prediction's sliding window pads it."""
    short = [max(0, size - n) for n in mask.shape]
    if any(short):
        pad = [(d // 2, d - d // 2) for d in short]
        image, mask = np.pad(image, [(0, 0), *pad], mode="edge"), np.pad(mask, pad, mode="edge")
    if focus:
        ys, xs = np.nonzero(mask == focus)
        pick = int(torch.randint(len(ys), (1,), generator=generator))
        centre = (ys[pick], xs[pick])
    else:
        centre = tuple(int(torch.randint(n, (1,), generator=generator)) for n in mask.shape)
    y, x = (min(max(0, c - size // 2), n - size) for c, n in zip(centre, mask.shape))
    return image[:, y:y + size, x:x + size], mask[y:y + size, x:x + size]


def _draw(pool: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    """`count` of `pool` without replacement (with it only when the pool is smaller)."""
    if count <= 0 or len(pool) == 0:
        return pool[:0]
    if len(pool) >= count:
        return pool[torch.randperm(len(pool), generator=generator)[:count].numpy()]
    return pool[torch.randint(len(pool), (count,), generator=generator).numpy()]


def round_learning_rate(settings: TrainSettings) -> float:
    """The run's learning rate, cosine-decayed over the rounds from its full value (round 1) towards a
    tenth: late rounds add less DP noise to the weights, so the last global model does not swing from
    round to round (measured). A function of the round number only: data-independent."""
    progress = (settings.server_round - 1) / max(1, settings.num_rounds)
    return settings.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_round(model: torch.nn.Module, patients: Sequence[Patient], settings: TrainSettings, plan: RoundPlan,
                slices_per_patient: int, patch: int, device: torch.device) -> float:
    """`plan.steps` steps from the global weights; returns the mean training loss of sampled patients."""
    # Both OS-seeded: the sampler draws on the CPU, Opacus draws the noise where the weights are.
    sampling, noise = os_seeded_generator(torch.device("cpu")), os_seeded_generator(torch.device(device))
    augment = augmentation(settings.seed * 100_003 + settings.server_round)
    model.to(device).train()
    global_weights = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    # Patients are sampled at plan.sample_rate, the rate the accountant charges: a rate that moved with
    # len(patients) would change every other patient's chance of being sampled when one is added, which
    # the accountant does not cover. Opacus divides the noisy sum by the batch expected of the planned
    # count, not of len(patients): the noise's size in the released weights would give the exact count
    # away. So a step's batch is N / N_planned of the run's (larger above one bin, smaller below).
    expected_batch = plan.sample_rate * plan.patients
    lr = round_learning_rate(settings)
    # A non-private round (σ 0: an ε = ∞ baseline) takes the same clipped per-patient step without the
    # noise, so a baseline differs from DP by the noise alone. (Clipping only the batch's gradient, its
    # FedAvg lost the organ on two seeds of three: 0.62 ± 0.25 against 0.83 ± 0.04; README.)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum), noise_multiplier=plan.noise_multiplier,
                            max_grad_norm=settings.max_grad_norm, expected_batch_size=expected_batch, generator=noise, secure_mode=True)
    num_classes = model.state_dict()[names[-1]].shape[0]
    loss_fn = patient_loss(settings.class_weights).to(device)

    def loss_of(params: dict[str, torch.Tensor], images: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (params, buffers), (images,)), onehot)

    per_patient = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0), chunk_size=PATIENTS_PER_CHUNK)
    sampler = UniformWithReplacementSampler(num_samples=len(patients), sample_rate=plan.sample_rate, generator=sampling, steps=plan.steps)
    losses: list[float] = []
    for batch in sampler:
        optimizer.zero_grad(set_to_none=True)
        params = {n: p.detach() for n, p in model.named_parameters()}
        if batch:
            images, masks = patch_batch([patients[i] for i in batch], slices_per_patient, patch, augment, sampling)
            onehot = torch.nn.functional.one_hot(masks.to(device), num_classes).movedim(-1, 2).float()
            grads, loss = per_patient(params, images.to(device), onehot)  # one gradient per patient, for Opacus to clip and noise
            for name, p in model.named_parameters():
                p.grad_sample = grads[name]
            losses.extend(loss.detach().cpu().tolist())
        else:  # an empty Poisson batch still takes a noise-only step
            for name, p in model.named_parameters():
                p.grad_sample = torch.zeros((0, *p.shape), device=device)
        optimizer.step()
        if settings.proximal_mu > 0:  # FedProx pull towards the global model: data-independent
            with torch.no_grad():
                for p, g in zip(model.parameters(), global_weights):
                    p.sub_(lr * settings.proximal_mu * (p - g))
    return float(np.mean(losses)) if losses else math.nan


def patch_batch(patients: Sequence[Patient], count: int, size: int, augment, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[patients, count, 1, size, size] image patches and [patients, count, size, size] class indices,
    augmented: what a step trains on (the bench's plain-SGD reference too)."""
    images, masks = [], []
    for patient in patients:
        for k, focus in _slices(patient, count, generator):
            image, mask = _patch(patient.images[k], patient.masks[k], size, focus, generator)
            item = augment({"image": image, "mask": mask[None].astype(np.float32)})
            images.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32))
            masks.append(torch.as_tensor(np.asarray(item["mask"]))[0].round().long())
    shape = (len(patients), count)
    return torch.stack(images).reshape(*shape, *images[0].shape), torch.stack(masks).reshape(*shape, *masks[0].shape)


def evaluate(model: torch.nn.Module, data: SiteData, num_classes: int, device: torch.device) -> dict[str, float]:
    """Per-class Dice/IoU/HD95 over the site's validation patients (each a 3D volume), averaged. Each is
    scored on its series' own pixel grid and spacing, predicted as `fedseg predict` writes it: the Dice
    a site reports is the Dice of what prediction gives it."""
    patch = data.preprocessing.image_size
    per_volume = [class_metrics(native_labels(model, v.image, v.mask.shape[1:], patch, device), v.mask, num_classes, v.spacing)
                  for v in data.validation]
    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN classes stay NaN
        for name in ("dice", "iou", "hd95"):
            per_class = np.nanmean(np.stack([m[name] for m in per_volume]), axis=0)
            metrics[name] = foreground_dice(per_class) if name == "dice" else float(np.nanmean(per_class))
            for c, value in enumerate(per_class, start=1):
                metrics[f"{name}-class{c}"] = float(value)
    return metrics
