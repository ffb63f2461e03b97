"""The built-in federation: synthetic patients per site, written as real DICOM series + DICOM-SEG.

Each site has its own "scanner" (calibration, noise, pixel spacing, slice thickness, field of view,
slice order) and its own patient mix (count, lesion prevalence and size), so sites are non-IID.
Generation is seeded and cached: the same arguments always give the same files, written once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from common.seg_writer import write_seg
from simulations.phantom import random_anatomy, render

log = logging.getLogger(__name__)

GENERATOR_VERSION = 4
CLASS_NAMES = ("background", "organ", "lesion")
# What the synthetic classes are: the codes their training SEGs carry, so a run on them learns them.
CLASS_CODES = {"organ": (codes.SCT.AnatomicalStructure, codes.SCT.Organ), "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)}


@dataclass(frozen=True)
class ScannerProfile:
    site: str
    patients: int
    matrix: int  # rows = columns
    pixel_spacing: float  # mm
    slices: int
    slice_thickness: float  # mm
    hu_scale: float  # calibration error: measured = true * scale + offset
    hu_offset: float
    noise_hu: float
    lesion_prevalence: float
    lesion_radius_mm: tuple[float, float]
    tilt_deg: float  # gantry-like rotation of the slice plane about the x axis
    descending: bool  # slices written head-to-feet, InstanceNumber reversed


SIZES = {
    # name: (fewest patients per site, matrix choices, slices range). At least 50 by default: patient-level
    # DP at ε 8 needs that many per site to learn the small lesion (`fedseg bench`: Dice vs patients).
    "default": (50, (96, 112, 128), (6, 8)),
    "tiny": (4, (40, 48), (6, 8)),
}


def patient_range(size: str, patients: int | None = None) -> tuple[int, int]:
    """Sites' patient counts: from `patients` (or the size's default) to a fifth more, so sites differ."""
    fewest = SIZES[size][0] if patients is None else patients
    if fewest < 2:
        raise ValueError(f"a built-in site needs at least 2 patients (one trains, one validates), not {fewest}")
    return fewest, fewest + max(1, fewest // 5)


def site_profiles(num_sites: int, seed: int = 0, size: str = "default", patients: int | None = None) -> list[ScannerProfile]:
    """Deterministic, deliberately different scanners and patient mixes for `num_sites` sites."""
    _, matrices, slices = SIZES[size]
    patients_range = patient_range(size, patients)
    profiles = []
    for i in range(num_sites):
        rng = np.random.default_rng([seed, i, GENERATOR_VERSION])
        matrix = int(rng.choice(matrices))
        fov = rng.uniform(340, 420)
        radius_lo = rng.uniform(10, 15)
        profiles.append(
            ScannerProfile(
                site=f"site-{i + 1:02d}",
                patients=int(rng.integers(patients_range[0], patients_range[1] + 1)),
                matrix=matrix,
                pixel_spacing=round(fov / matrix, 3),
                slices=int(rng.integers(slices[0], slices[1] + 1)),
                slice_thickness=float(rng.choice([2.5, 3.0, 5.0]) if size == "default" else rng.choice([8.0, 10.0])),
                hu_scale=round(rng.uniform(0.9, 1.1), 3),
                hu_offset=round(rng.uniform(-25, 25), 1),
                noise_hu=round(rng.uniform(8, 25), 1),
                lesion_prevalence=round(rng.uniform(0.3, 0.9), 2),
                lesion_radius_mm=(round(radius_lo, 1), round(radius_lo + rng.uniform(5, 12), 1)),
                tilt_deg=float(rng.choice([0.0, 0.0, 12.0])),
                descending=bool(i % 2),
            )
        )
    return profiles


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def slice_dataset(profile: ScannerProfile, patient: str, k: int, pixels: np.ndarray, geometry: dict, uids: dict) -> pydicom.Dataset:
    """One CT slice of `profile`'s scanner: `pixels` stored as HU + 1024, `geometry` its orientation and positions."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(uids["series"], k)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = f"Synthetic^{patient}"
    ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids["study"]
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = f"Synthetic {profile.site}"
    ds.ManufacturerModelName = "fedseg phantom"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 2
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = (profile.slices - k) if profile.descending else (k + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [float(v) for v in geometry["orientation"]]
    ds.ImagePositionPatient = [round(float(v), 4) for v in geometry["positions"][k]]
    ds.PixelSpacing = [profile.pixel_spacing, profile.pixel_spacing]
    ds.SliceThickness = profile.slice_thickness
    ds.KVP = 120
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def write_patient(profile: ScannerProfile, index: int, out: Path, seed: int) -> None:
    """One patient of one site: a CT series (files in random-named nested folders) and its SEG."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION, int(profile.site[-2:]), index])
    patient = f"{profile.site}-P{index + 1:03d}"
    anatomy = random_anatomy(rng, profile.lesion_prevalence, profile.lesion_radius_mm)
    shape = (profile.slices, profile.matrix, profile.matrix)
    hu, labels = render(anatomy, shape, (profile.slice_thickness, profile.pixel_spacing, profile.pixel_spacing))
    measured = hu * profile.hu_scale + profile.hu_offset + rng.normal(0, profile.noise_hu, hu.shape)
    stored = np.clip(np.rint(measured + 1024), -32768, 32767)
    t = np.deg2rad(profile.tilt_deg)
    row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, np.cos(t), np.sin(t)])
    normal = np.cross(row_dir, col_dir)
    half = (profile.matrix - 1) / 2 * profile.pixel_spacing
    centre_offsets = (np.arange(profile.slices) - (profile.slices - 1) / 2) * profile.slice_thickness
    positions = [-half * row_dir - half * col_dir + z * normal for z in centre_offsets]
    geometry = {"orientation": np.concatenate([row_dir, col_dir]), "positions": positions}
    uids = {name: _uid(seed, profile.site, index, name) for name in ("study", "series", "frame")}
    series_dir = out / patient / f"study-{uids['study'][-8:]}" / "CT"
    series_dir.mkdir(parents=True)
    datasets = []
    order = range(profile.slices - 1, -1, -1) if profile.descending else range(profile.slices)
    for k in order:
        ds = slice_dataset(profile, patient, k, stored[k], geometry, uids)
        ds.save_as(series_dir / f"{_uid(uids['series'], 'file', k)[-12:]}.dcm", enforce_file_format=True)
        datasets.append((k, ds))
    datasets.sort(key=lambda kd: kd[0])
    write_seg([ds for _, ds in datasets], labels, CLASS_NAMES, out / patient / "SEG" / "labels.dcm", uid_entropy=[str(seed), patient],
              codings=CLASS_CODES)


def federation_dir(cache_root: Path, num_sites: int, seed: int, size: str, patients: int | None = None) -> Path:
    fewest, most = patient_range(size, patients)
    return cache_root / f"federation-v{GENERATOR_VERSION}-{size}-{num_sites}sites-{fewest}to{most}patients-seed{seed}"


def build_federation(cache_root: str | Path, num_sites: int = 3, seed: int = 0, size: str = "default",
                     patients: int | None = None) -> Path:
    """The federation's root folder (one subfolder per site), generating it on first use."""
    root = federation_dir(Path(cache_root), num_sites, seed, size, patients)
    if (root / "federation.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        profiles = site_profiles(num_sites, seed, size, patients)
        for profile in profiles:
            log.info(f"generating {profile.site}: {profile.patients} patients, {profile.matrix}x{profile.matrix}x{profile.slices} "
                     f"@ {profile.pixel_spacing:.2f}x{profile.slice_thickness} mm, noise {profile.noise_hu} HU, lesion prevalence {profile.lesion_prevalence}")
            for index in range(profile.patients):
                write_patient(profile, index, tmp / profile.site, seed)
        (tmp / "federation.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "patients": patient_range(size, patients),
                                                         "sites": [asdict(p) for p in profiles]}, indent=2))
        if root.exists():  # a partial folder from an interrupted run: never trusted, replaced whole
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
