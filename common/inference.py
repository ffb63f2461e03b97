"""A 2D model over a volume, patch by patch on each slice (MONAI's SliceInferer: a sliding window of the
training patch's size, Gaussian-weighted where windows overlap), the same way in validation, in the run
report and in prediction: the mask is brought back on the series' own pixel grid, so a SEG or NIfTI
written from it overlays the source images exactly, and a site's validation Dice is the Dice of what
prediction writes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer

from common.dataset import Preprocessing, prepare_image
from common.dicom_io import Series

OVERLAP = 0.25  # of a window with its neighbours: nnU-Net's Gaussian weighting hides the seams at a quarter of its windows' cost at a half


@torch.inference_mode()
def slice_logits(model: torch.nn.Module, image: np.ndarray | torch.Tensor, patch: int, device: torch.device,
                 batch: int = 32) -> torch.Tensor:
    """Class scores [slices, classes, H, W], on the CPU, of a preprocessed volume [slices, 1, H, W]:
    windows of `patch` x `patch` pixels, `batch` at a time on `device`, so a long series never sits on
    the device at once. A slice smaller than a patch is padded by its edge pixels, as training pads."""
    inferer = SliceInferer(roi_size=(patch, patch), sw_batch_size=batch, overlap=OVERLAP, mode="gaussian", padding_mode="replicate",
                           spatial_dim=0, sw_device=device, device=torch.device("cpu"))
    volume = torch.as_tensor(image).movedim(0, 1)[None]  # [1, 1, slices, H, W]: the slices are MONAI's first spatial axis
    return inferer(volume, model.eval().to(device))[0].movedim(1, 0)


@torch.inference_mode()
def native_labels(model: torch.nn.Module, image: np.ndarray, grid: tuple[int, int], patch: int, device: torch.device,
                  batch: int = 32) -> np.ndarray:
    """Class indices [slices, rows, cols] uint8 on the series' own pixel grid (`grid`: rows, cols) of
    its preprocessed volume `image` [slices, 1, H, W], scored in `patch`-sized windows. Class scores are
    upsampled before the argmax, `batch` slices at a time, so boundaries are smooth at the original
    resolution and full-resolution scores are never held for the whole series."""
    logits = slice_logits(model, image, patch, device, batch)
    masks = [F.interpolate(chunk.to(device), size=grid, mode="bilinear", align_corners=False).argmax(dim=1).to(torch.uint8).cpu()
             for chunk in logits.split(batch)]
    return torch.cat(masks).numpy()


def segment_series(model: torch.nn.Module, series: Series, preprocessing: Preprocessing, device: torch.device,
                   batch: int = 32) -> np.ndarray:
    """Class indices, [slices, rows, cols] uint8, aligned with `series.volume`, of the series prepared
    as the model was trained (`preprocessing`, from its run config)."""
    rows, cols = series.volume.shape[1:]
    return native_labels(model, prepare_image(series, preprocessing), (rows, cols), preprocessing.image_size, device, batch)
