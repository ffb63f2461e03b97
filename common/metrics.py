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


def class_metrics(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> dict[str, np.ndarray]:
    """Dice, IoU and HD95 (mm) for each foreground class of one label volume.

    `pred` and `truth` are integer label arrays of the same shape; `spacing` is per axis, in mm.
    A class absent from the truth gives NaN (undefined), not 0 or 1, so it does not bias averages.
    Each class is scored on the box around its voxels in either volume (one voxel of margin): the
    same numbers as on the whole series, in the memory of the structure, not of the series (MONAI's
    one-hot and distance maps of a whole 512 x 512 x 300 CT would take ~4.5 GB).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"need one spacing per axis: {pred.ndim} axes, {len(spacing)} spacings")
    scores = {name: np.full(num_classes - 1, np.nan) for name in ("dice", "iou", "hd95")}
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        if not t.any():
            continue
        box = _box(p | t)
        p, t = (torch.as_tensor(m[box])[None, None] for m in (p, t))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on an empty prediction; NaN already says it
            scores["dice"][c - 1] = float(compute_dice(p, t, ignore_empty=True))
            scores["iou"][c - 1] = float(compute_iou(p, t, ignore_empty=True))
            hd95 = float(compute_hausdorff_distance(p, t, percentile=95, spacing=list(spacing)))
        scores["hd95"][c - 1] = hd95 if np.isfinite(hd95) else np.nan
    return scores


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the mask's voxels, one voxel wider on every side where the volume allows."""
    return tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in np.nonzero(mask))


def foreground_dice(per_class_dice: np.ndarray) -> float:
    """The headline number: mean Dice over foreground classes that are present."""
    values = np.asarray(per_class_dice, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
