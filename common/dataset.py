"""Site series -> preprocessed 2D training slices and 3D validation volumes, split by patient.

Preprocessing (`Preprocessing`: one object, from the run config, so that training, validation, the
report and prediction prepare images identically) is modality-aware — CT: the run's fixed HU window
(`ct-window`, abdominal soft tissue by default), so calibrated scanners agree; MR and others: each
volume's own 1st-99th percentiles, since their intensities have no absolute scale — and resamples
every slice to one in-plane size; a validation volume keeps its series' own labels and spacing too,
where it is scored. Each patient is processed from its own volume alone (patient-level
DP needs that). The split is by patient and chosen by the site (a keyed hash of the PatientID), never
by the server: slices of one patient never sit on both sides, and an added patient moves no other.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)

from common.config import RUN_DEFAULTS, parse_ct_window
from common.dicom_io import LabelledSeries, LoadReport, Series, load_site_series


@dataclass(frozen=True)
class Preprocessing:
    """How a series becomes what the model sees. Made from the run config (`from_config`), the same
    one in training and prediction. Hashable: it keys the site's cache of loaded data."""

    image_size: int
    ct_window: tuple[float, float]  # HU mapped to [0, 1]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Preprocessing:
        """From a run config (as sent to a site, or saved in a checkpoint). One without `ct-window` is
        from before the option, when every CT was windowed at its default. A bad value is a ValueError."""
        return cls(int(config["image-size"]), parse_ct_window(config.get("ct-window", RUN_DEFAULTS["ct-window"])))


@dataclass
class Volume:
    """One validation series: the image as the model sees it (slices are its batch axis), and the labels
    and spacing of the series' own pixel grid, where validation scores the model, as prediction writes."""

    patient_id: str
    image: np.ndarray  # [slices, 1, S, S] float32
    mask: np.ndarray  # [slices, rows, cols] uint8, the series' own grid
    spacing: tuple[float, float, float]  # (slice, row, col) mm, the series' own


@dataclass
class Patient:
    """One training patient: the unit of privacy. All its series' slices, preprocessed."""

    patient_id: str
    images: np.ndarray  # [slices, 1, S, S] float32
    masks: np.ndarray  # [slices, 1, S, S] uint8


@dataclass
class SiteData:
    folder: str
    train: list[Patient]
    validation: list[Volume]
    report: LoadReport | None

    @property
    def train_slices(self) -> int:
        return sum(len(p.images) for p in self.train)


def normalise(volume: np.ndarray, modality: str, ct_window: tuple[float, float]) -> np.ndarray:
    """Intensities in [0, 1]: CT through `ct_window` (HU), anything else by its own percentiles."""
    if modality == "CT":
        scale = ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
    else:
        scale = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(volume), dtype=np.float32)


def prepare_image(series: Series, preprocessing: Preprocessing) -> np.ndarray:
    """What the model sees of a series, in training and in prediction alike: windowed/normalised,
    each slice resampled to S x S (the image size). [slices, 1, S, S] float32."""
    size = preprocessing.image_size
    image = Resize((size, size), mode="bilinear", anti_aliasing=True)(normalise(series.volume, series.modality, preprocessing.ct_window))
    return np.asarray(image, dtype=np.float32)[:, None]


def training_slices(ls: LabelledSeries, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The image as the model sees it and the mask resampled with it (nearest neighbour), each
    [slices, 1, S, S]: what training learns from."""
    size = preprocessing.image_size
    mask = Resize((size, size), mode="nearest")(ls.mask.astype(np.float32))
    return prepare_image(ls.series, preprocessing), np.asarray(mask).astype(np.uint8)[:, None]


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


@functools.lru_cache(maxsize=8)
def load_site(folder: str, class_names: tuple[str, ...], preprocessing: Preprocessing, val_fraction: float,
              split_key: bytes = b"") -> SiteData:
    """Load once per process (the site guard keeps it warm)."""
    labelled, report = load_site_series(Path(folder), class_names)
    train_ids, val_ids = split_patients([ls.series.patient_id for ls in labelled], val_fraction, split_key)
    train: list[Patient] = []
    for pid in train_ids:
        images, masks = zip(*(training_slices(ls, preprocessing) for ls in labelled if ls.series.patient_id == pid))
        train.append(Patient(pid, np.concatenate(images), np.concatenate(masks)))
    validation = [validation_volume(ls, preprocessing) for ls in labelled if ls.series.patient_id in val_ids]
    return SiteData(folder=folder, train=train, validation=validation, report=report)


def augmentation(seed: int) -> Compose:
    """MONAI dictionary augmentations for one training slice (geometry applied to image and mask):
    a function of that slice alone, so it is part of its patient's own processing."""
    return Compose([
        RandAffined(keys=("image", "mask"), prob=0.5, rotate_range=0.2, scale_range=0.1, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        RandGaussianNoised(keys="image", std=0.02, prob=0.3),
    ]).set_random_state(seed)
