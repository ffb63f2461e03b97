"""Per-class segmentation metrics on label volumes, with physical spacing for distances.

The headline is the foreground Dice: the mean over foreground classes only. Averaging background in
would report ~0.99 for a model that segments nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot


def class_metrics(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> dict[str, np.ndarray]:
    """Dice, IoU and HD95 (mm) for each foreground class of one label volume.

    `pred` and `truth` are integer label arrays of the same shape; `spacing` is per axis, in mm.
    A class absent from the truth gives NaN (undefined), not 0 or 1, so it does not bias averages.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"need one spacing per axis: {pred.ndim} axes, {len(spacing)} spacings")
    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[None, None], num_classes)
    t = one_hot(torch.as_tensor(truth, dtype=torch.long)[None, None], num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty classes; NaN already says it
        dice = compute_dice(p, t, include_background=False, ignore_empty=True)[0].numpy()
        iou = compute_iou(p, t, include_background=False, ignore_empty=True)[0].numpy()
        hd95 = compute_hausdorff_distance(
            p, t, include_background=False, percentile=95, spacing=list(spacing)
        )[0].numpy()
    absent = ~t[0, 1:].reshape(num_classes - 1, -1).any(dim=1).numpy()
    hd95 = np.where(np.isfinite(hd95) & ~absent, hd95, np.nan)
    return {"dice": dice.astype(float), "iou": iou.astype(float), "hd95": hd95.astype(float)}


def foreground_dice(per_class_dice: np.ndarray) -> float:
    """The headline number: mean Dice over foreground classes that are present."""
    values = np.asarray(per_class_dice, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
