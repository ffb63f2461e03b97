"""Site series -> preprocessed 2D training slices and 3D validation volumes, split by patient.

Preprocessing (`Preprocessing`: one object, from the run config, so that training, validation, the
report and prediction prepare images identically) is modality-aware — CT: the run's fixed HU window
(`ct-window`, abdominal soft tissue by default), so calibrated scanners agree; MR and others: each
volume's own z-score, since their intensities have no absolute scale — and resamples every slice to
the run's in-plane pixel spacing (`spacing`), so a structure is as many pixels wide whatever the
scanner's field of view; the model then sees patches of `image-size` (crops in training, a sliding
window in prediction). A validation volume keeps its series' own labels and spacing, where it is
scored. Each patient is processed from its own volume alone (patient-level DP needs that). The split
is by patient and chosen by the site (a keyed hash of the PatientID), never by the server: slices of
one patient never sit on both sides, and an added patient moves no other.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)

from common.config import IMAGE_SIZES, MR_INTENSITY, RUN_DEFAULTS, parse_ct_window, parse_spacing
from common.dicom_io import LabelledSeries, LoadReport, Series, load_site_series
from common.errors import FedsegError


MAX_GRID = 2048  # pixels a side of a resampled slice (a float32 slice of 16 MB)
MAX_GROWTH = 4  # times a series' own pixels predict lets its prepared image take, at most ...
MIN_BUDGET_PIXELS = 2**26  # ... or this many (256 MB of float32), so a small or coarse series may be upsampled


class PreprocessingError(FedsegError, ValueError):
    """A series the run's preprocessing would make too large to hold (a ValueError, as a bad value is)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a series becomes what the model sees. Made from the run config (`from_config`), the same
    one in training and prediction. Hashable: it keys the site's cache of loaded data."""

    image_size: int  # the patch side in pixels
    ct_window: tuple[float, float]  # HU mapped to [0, 1]
    spacing: float  # mm per pixel at the model; 0: each slice resampled whole to image_size
    mr_intensity: str = "z-score"  # MR_INTENSITY

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Preprocessing:
        """From a run config (as sent to a site, or saved in a checkpoint). One without `ct-window` is
        from before the option, when every CT was windowed at its default; one without `spacing`, when
        every slice was resampled whole to the image size; one without `mr-intensity`, when MR was scaled
        by its percentiles. A bad value is a ValueError."""
        size, mr = int(config["image-size"]), config.get("mr-intensity", "percentiles")
        if not IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1] or mr not in MR_INTENSITY:
            raise ValueError(f"image-size must be {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} px and mr-intensity one of {MR_INTENSITY}, "
                             f"got {config['image-size']!r} and {mr!r}")
        return cls(size, parse_ct_window(config.get("ct-window", RUN_DEFAULTS["ct-window"])), parse_spacing(config.get("spacing", 0.0)), mr)

    def grid(self, series: Series) -> tuple[int, int]:
        """(rows, cols) of the series' slices at the model: at `spacing`, or the image size. Past MAX_GRID
        pixels a side, a PreprocessingError."""
        if not self.spacing:
            return self.image_size, self.image_size  # IMAGE_SIZES bounds it
        rows, cols = series.volume.shape[1:]
        grid = tuple(max(1, round(n * mm / self.spacing)) for n, mm in zip((rows, cols), series.spacing[1:]))
        if max(grid) > MAX_GRID:
            raise PreprocessingError(f"series {series.uid} ({rows}x{cols} at {series.spacing[1]:g}x{series.spacing[2]:g} mm) would be "
                                     f"{grid[0]}x{grid[1]} pixels at {self.spacing:g} mm; at most {MAX_GRID} a side")
        return grid


def check_growth(series: Series, preprocessing: Preprocessing) -> None:
    """A PreprocessingError, before anything is resampled, when the series prepared would take more
    than MAX_GROWTH times its own pixels and more than MIN_BUDGET_PIXELS: what `fedseg predict` checks of a
    checkpoint's preprocessing, so a global model cannot make it hold many times a series in memory.
    (A site guard refuses a fine spacing by its policy instead: a refusal that depended on the data
    would tell a coordinator about it.)"""
    prepared = len(series.volume) * math.prod(preprocessing.grid(series))
    if prepared > max(MAX_GROWTH * series.volume.size, MIN_BUDGET_PIXELS):
        raise PreprocessingError(f"series {series.uid} of {series.volume.size} pixels would take {prepared} at {preprocessing.spacing:g} mm "
                                 f"spacing: more than {MAX_GROWTH}x its own (or {MIN_BUDGET_PIXELS})")


@dataclass
class Volume:
    """One validation series: the image as the model sees it (slices are its batch axis), and the labels
    and spacing of the series' own pixel grid, where validation scores the model, as prediction writes."""

    patient_id: str
    image: np.ndarray  # [slices, 1, H, W] float32, at the model's spacing
    mask: np.ndarray  # [slices, rows, cols] uint8, the series' own grid
    spacing: tuple[float, float, float]  # (slice, row, col) mm, the series' own


@dataclass
class Patient:
    """One training patient: the unit of privacy. All its series' slices, preprocessed (each series
    has its own grid at the model's spacing, so slices are listed one by one)."""

    patient_id: str
    images: list[np.ndarray]  # per slice [1, H, W] float32
    masks: list[np.ndarray]  # per slice [H, W] uint8


@dataclass
class SiteData:
    folder: str
    train: list[Patient]
    validation: list[Volume]
    report: LoadReport | None
    preprocessing: Preprocessing

    @property
    def train_slices(self) -> int:
        return sum(len(p.images) for p in self.train)


def normalise(volume: np.ndarray, modality: str, preprocessing: Preprocessing) -> np.ndarray:
    """CT through the run's HU window to [0, 1]; anything else by the volume's own statistics: z-scored
    (nnU-Net's rule for MR), or its 1st-99th percentiles to [0, 1] (models from before). Never another
    patient's statistic."""
    if modality == "CT":
        low, high = preprocessing.ct_window
        scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    elif preprocessing.mr_intensity == "z-score":
        scale = NormalizeIntensity()
    else:
        scale = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(np.asarray(volume, dtype=np.float32)), dtype=np.float32)  # no copy of a float32 volume


def prepare_image(series: Series, preprocessing: Preprocessing) -> np.ndarray:
    """What the model sees of a series, in training and in prediction alike: windowed/normalised,
    each slice resampled to the model's grid (`Preprocessing.grid`). [slices, 1, H, W] float32."""
    image = Resize(preprocessing.grid(series), mode="bilinear", anti_aliasing=True)(normalise(series.volume, series.modality, preprocessing))
    return np.asarray(image, dtype=np.float32)[:, None]


def training_slices(ls: LabelledSeries, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The image as the model sees it, [slices, 1, H, W], and the mask resampled with it (nearest
    neighbour), [slices, H, W]: what training learns from."""
    mask = Resize(preprocessing.grid(ls.series), mode="nearest")(ls.mask.astype(np.float32))
    return prepare_image(ls.series, preprocessing), np.asarray(mask).astype(np.uint8)


def validation_volume(ls: LabelledSeries, preprocessing: Preprocessing) -> Volume:
    """The image as the model sees it; the labels and spacing as the series has them."""
    s = ls.series
    return Volume(s.patient_id, prepare_image(s, preprocessing), np.asarray(ls.mask, dtype=np.uint8), s.spacing)


def split_patients(patients: Sequence[str], val_fraction: float, key: bytes) -> tuple[list[str], list[str]]:
    """Validation patients by a keyed hash of the PatientID: the site's key, not the server's seed,
    decides, and the choice is stable when patients are added. Every site with 2+ patients keeps at
    least one for validation and one for training."""
    unique = sorted(set(patients))
    bucket = {p: int.from_bytes(hmac.new(key, p.encode(), hashlib.sha256).digest()[:8], "big") / 2**64 for p in unique}
    val = [p for p in unique if bucket[p] < val_fraction]
    if len(unique) >= 2 and not val:
        val = [min(unique, key=bucket.__getitem__)]
    if len(val) == len(unique) and len(unique) >= 2:
        val.remove(max(val, key=bucket.__getitem__))
    return sorted(set(unique) - set(val)), sorted(val)


@functools.lru_cache(maxsize=2)  # a run needs one; each kept copy is the site's data at some spacing, in memory
def load_site(folder: str, class_names: tuple[str, ...], preprocessing: Preprocessing, val_fraction: float,
              split_key: bytes = b"") -> SiteData:
    """Load once per process (the site guard keeps it warm)."""
    labelled, report = load_site_series(Path(folder), class_names)
    train_ids, val_ids = split_patients([ls.series.patient_id for ls in labelled], val_fraction, split_key)
    train: list[Patient] = []
    for pid in train_ids:
        images, masks = zip(*(training_slices(ls, preprocessing) for ls in labelled if ls.series.patient_id == pid))
        train.append(Patient(pid, [s for series in images for s in series], [m for series in masks for m in series]))
    validation = [validation_volume(ls, preprocessing) for ls in labelled if ls.series.patient_id in val_ids]
    return SiteData(folder=folder, train=train, validation=validation, report=report, preprocessing=preprocessing)


def augmentation(seed: int) -> Compose:
    """MONAI dictionary augmentations for one training slice (geometry applied to image and mask):
    a function of that slice alone, so it is part of its patient's own processing."""
    return Compose([
        RandAffined(keys=("image", "mask"), prob=0.5, rotate_range=0.2, scale_range=0.1, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandGaussianNoised(keys="image", std=0.02, prob=0.3),
    ]).set_random_state(seed)
