"""Dice + cross-entropy for one patient's slices.

Under patient-level DP the loss is a function of one patient alone: its Dice is pooled over that
patient's slices (`batch=True` inside a per-patient call), never over other patients.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss


def patient_loss() -> torch.nn.Module:
    """Soft Dice (pooled over the given slices) + CE; labels one-hot [slices, C, H, W]."""
    return DiceCELoss(softmax=True, batch=True, include_background=False)
