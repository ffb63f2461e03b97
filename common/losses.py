"""Class-weighted Dice + cross-entropy for one patient's slices.

Under patient-level DP the loss is a function of one patient alone: its Dice is pooled over that
patient's slices (`batch=True` inside a per-patient call), never over other patients.

Why class weights: every patient's gradient is clipped to the same norm, so what matters is the share
of that gradient that points at each class. Unweighted Dice+CE spends it on background and the large
organ, and under DP noise the small lesion was never learned (Dice 0.00 at every site). Fixed weights
(no statistic of any patient enters) give the small classes their share. Measured on the built-in
federation at patient-level ε 8 (3 sites, 12 rounds, OS noise seeds, in-process runs of this training
code): with 40–50 patients per site, [1, 2, 10] learned the lesion in 1 of 3 runs and [1, 2, 20] in
13 of 15; with 50–60 patients, [1, 2, 20] in 1 of 3 and [1, 2, 40] in 8 of 8 (lesion Dice 0.34–0.60
per site at round 12), at an organ cost (0.73–0.87 against 0.88–0.92). README: the default command's runs.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss

# Weight of the first and of the last listed foreground class; those between are spaced geometrically.
# Classes are listed from the largest structure to the smallest (the default "organ,lesion" is).
FIRST_FOREGROUND_WEIGHT = 2.0
LAST_FOREGROUND_WEIGHT = 40.0


def class_weights(num_classes: int) -> torch.Tensor:
    """[num_classes] weights, background 1: data-independent, so they cost no privacy."""
    foreground = num_classes - 1
    if foreground <= 1:
        return torch.tensor([1.0, FIRST_FOREGROUND_WEIGHT][:num_classes])
    ratio = (LAST_FOREGROUND_WEIGHT / FIRST_FOREGROUND_WEIGHT) ** (1 / (foreground - 1))
    return torch.tensor([1.0] + [FIRST_FOREGROUND_WEIGHT * ratio**i for i in range(foreground)])


def patient_loss(num_classes: int = 3) -> torch.nn.Module:
    """Class-weighted soft Dice (foreground classes, pooled over the given slices) + class-weighted CE;
    labels one-hot [slices, C, H, W]. MONAI applies the weights to both terms (background dropped from Dice)."""
    return DiceCELoss(softmax=True, batch=True, include_background=False, weight=class_weights(num_classes))
