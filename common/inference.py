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

from common.dataset import Preprocessing, check_growth, prepare_image
from common.dicom_io import Series

OVERLAP = 0.25  # of a window with its neighbours: nnU-Net's Gaussian weighting hides the seams at a quarter of its windows' cost at a half


def slice_logits(model: torch.nn.Module, image: np.ndarray | torch.Tensor, patch: int, device: torch.device,
                 batch: int = 32) -> torch.Tensor:
    """Class scores [slices, classes, H, W], on the CPU, of a preprocessed stack of slices [slices, 1, H, W]:
    windows of `patch` x `patch` pixels, `batch` at a time on `device`. A slice smaller than a patch is
    padded by its edge pixels, as training pads. MONAI's window holds the scores of everything it is
    given: callers give it a few slices at a time (`native_labels`)."""
    inferer = SliceInferer(roi_size=(patch, patch), sw_batch_size=batch, overlap=OVERLAP, mode="gaussian", padding_mode="replicate",
                           spatial_dim=0, sw_device=device, device=torch.device("cpu"))
    model = model.eval().to(device)  # outside inference mode: the parameters stay ordinary tensors, trainable later
    with torch.inference_mode():
        volume = torch.as_tensor(image).movedim(0, 1)[None]  # [1, 1, slices, H, W]: the slices are MONAI's first spatial axis
        return inferer(volume, model)[0].movedim(1, 0)


def native_labels(model: torch.nn.Module, image: np.ndarray, grid: tuple[int, int], patch: int, device: torch.device,
                  batch: int = 32) -> np.ndarray:
    """Class indices [slices, rows, cols] uint8 on the series' own pixel grid (`grid`: rows, cols) of
    its preprocessed volume `image` [slices, 1, H, W], scored in `patch`-sized windows, `batch` slices
    at a time: class scores are upsampled before the argmax, so boundaries are smooth at the original
    resolution, and neither the model grid's nor the original grid's scores are held for the whole series."""
    masks = []
    for start in range(0, len(image), batch):
        logits = slice_logits(model, image[start:start + batch], patch, device, batch)
        with torch.inference_mode():
            masks.append(F.interpolate(logits.to(device), size=grid, mode="bilinear", align_corners=False).argmax(dim=1).to(torch.uint8).cpu())
    return torch.cat(masks).numpy()


def segment_series(model: torch.nn.Module, series: Series, preprocessing: Preprocessing, device: torch.device,
                   batch: int = 32) -> np.ndarray:
    """Class indices, [slices, rows, cols] uint8, aligned with `series.volume`, of the series prepared
    as the model was trained (`preprocessing`, from its run config). A checkpoint whose spacing would
    blow the series up in memory is a PreprocessingError (`check_growth`)."""
    check_growth(series, preprocessing)
    rows, cols = series.volume.shape[1:]
    return native_labels(model, prepare_image(series, preprocessing), (rows, cols), preprocessing.image_size, device, batch)
