"""Dice + cross-entropy, computed per sample.

`batch=False` keeps each sample's Dice independent of the others in the batch: DP-SGD clips
per-sample gradients, which is only meaningful when a sample's loss depends on that sample alone.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss


def segmentation_loss() -> torch.nn.Module:
    """Mean over the batch of per-sample (soft Dice + CE); labels are class indices [B, 1, H, W]."""
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=False, include_background=False)
