"""Site series -> preprocessed 2D training slices and 3D validation volumes, split by patient.

Preprocessing is modality-aware (CT: a fixed HU window, so calibrated scanners agree; MR and others:
per-volume percentiles, since their intensities have no absolute scale) and resamples every slice to
one in-plane size. The split is by patient: slices of one patient never sit on both sides.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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

from common.dicom_io import LabelledSeries, LoadReport, Series, load_site_series

CT_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window, HU


@dataclass
class Volume:
    """One validation series, preprocessed: slices are the model's batch axis."""

    patient_id: str
    image: np.ndarray  # [slices, 1, S, S] float32
    mask: np.ndarray  # [slices, S, S] uint8
    spacing: tuple[float, float, float]  # mm, after in-plane resampling


@dataclass
class SiteData:
    folder: str
    train_images: np.ndarray  # [N, 1, S, S] float32
    train_masks: np.ndarray  # [N, 1, S, S] uint8
    validation: list[Volume]
    train_patients: list[str]
    fingerprint: str  # identifies the training data, keys the privacy ledger
    report: LoadReport


def normalise(volume: np.ndarray, modality: str) -> np.ndarray:
    if modality == "CT":
        scale = ScaleIntensityRange(a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)
    else:
        scale = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(volume), dtype=np.float32)


def prepare_image(series: Series, size: int) -> np.ndarray:
    """What the model sees of a series, in training and in prediction alike: windowed/normalised,
    each slice resampled to size x size. [slices, 1, size, size] float32."""
    image = Resize((size, size), mode="bilinear", anti_aliasing=True)(normalise(series.volume, series.modality))
    return np.asarray(image, dtype=np.float32)[:, None]


def preprocess(ls: LabelledSeries, size: int) -> Volume:
    """The image as the model sees it, and the mask resampled with it (nearest neighbour)."""
    s = ls.series
    mask = Resize((size, size), mode="nearest")(ls.mask.astype(np.float32))
    rows, cols = s.volume.shape[1:]
    spacing = (s.spacing[0], s.spacing[1] * rows / size, s.spacing[2] * cols / size)
    return Volume(s.patient_id, prepare_image(s, size), np.asarray(mask).astype(np.uint8), spacing)


def split_patients(patients: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic patient-level split; every site with 2+ patients keeps at least one for validation."""
    unique = sorted(set(patients))
    rng = np.random.default_rng(seed)
    shuffled = [unique[i] for i in rng.permutation(len(unique))]
    n_val = 0 if len(unique) < 2 else min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


@functools.lru_cache(maxsize=8)
def load_site(folder: str, class_names: tuple[str, ...], size: int, val_fraction: float, seed: int) -> SiteData:
    """Load once per process: a ClientApp is re-created every round, its site data need not be."""
    labelled, report = load_site_series(Path(folder), class_names)
    train_ids, val_ids = split_patients([ls.series.patient_id for ls in labelled], val_fraction, seed)
    volumes = {id(ls): preprocess(ls, size) for ls in labelled}
    train = [volumes[id(ls)] for ls in labelled if ls.series.patient_id in train_ids]
    digest = hashlib.sha256()
    for ls in sorted(labelled, key=lambda x: x.series.uid):
        if ls.series.patient_id in train_ids:
            digest.update("\n".join(ls.series.sop_uids).encode())
    return SiteData(
        folder=folder,
        train_images=np.concatenate([v.image for v in train]),
        train_masks=np.concatenate([v.mask for v in train])[:, None],
        validation=[volumes[id(ls)] for ls in labelled if ls.series.patient_id in val_ids],
        train_patients=train_ids,
        fingerprint=digest.hexdigest()[:16],
        report=report,
    )


class SliceDataset(torch.utils.data.Dataset):
    """Training slices with MONAI's dictionary augmentations (geometry applied to image and mask)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, augment: bool, seed: int = 0) -> None:
        self.images, self.masks = images, masks
        self.augment = Compose([
            RandAffined(keys=("image", "mask"), prob=0.5, rotate_range=0.2, scale_range=0.1, mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        ]).set_random_state(seed) if augment else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = {"image": self.images[index], "mask": self.masks[index].astype(np.float32)}
        if self.augment is not None:
            item = self.augment(item)
        image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
        mask = torch.as_tensor(np.asarray(item["mask"])).round().long()
        return image, mask
