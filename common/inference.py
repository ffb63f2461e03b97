"""A global model applied to a whole series: the training preprocessing, then the mask back on the
series' own pixel grid, so a SEG or NIfTI written from it overlays the source images exactly."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.dataset import prepare_image
from common.dicom_io import Series


@torch.no_grad()
def segment_series(model: torch.nn.Module, series: Series, image_size: int, device: torch.device, batch: int = 32) -> np.ndarray:
    """Class indices, [slices, rows, cols] uint8, aligned with `series.volume`. Class scores are
    upsampled before the argmax, so boundaries are smooth at the original resolution."""
    model.eval().to(device)
    image = torch.as_tensor(prepare_image(series, image_size))
    rows, cols = series.volume.shape[1:]
    masks = []
    for chunk in image.split(batch):
        logits = model(chunk.to(device))
        logits = F.interpolate(logits, size=(rows, cols), mode="bilinear", align_corners=False)
        masks.append(logits.argmax(dim=1).to(torch.uint8).cpu())
    return torch.cat(masks).numpy()
