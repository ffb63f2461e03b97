"""A federation from a real scan: the MNI152 (ICBM 2009a) T1 template and its grey/white-matter maps,
shipped inside the nilearn package (no download), written per site as MR DICOM series + DICOM-SEG
with each site's own scanner: matrix, pixel spacing, slice thickness, slab, intensity scale, bias
field and noise. "Patients" are the template under small random rotations, scalings and shifts.
The files go through the normal site loader, exactly as a hospital's export would."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy.ndimage import map_coordinates

from common.seg_writer import write_seg
from simulations.mr_slice import mr_slice

log = logging.getLogger(__name__)

BRAIN_VERSION = 2  # 2: its SEGs code grey and white matter (Tissue / Gray matter, White matter); also reseeds the data
CLASS_NAMES = ("background", "grey-matter", "white-matter")
CLASS_CODES = {"grey-matter": (codes.SCT.Tissue, codes.SCT.GrayMatter), "white-matter": (codes.SCT.Tissue, codes.SCT.WhiteMatter)}
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
SIZES = {"default": (6, 10), "tiny": (3, 8)}  # (patients per site, slices per series)


@dataclass(frozen=True)
class MRProfile:
    site: str
    matrix: int
    pixel_spacing: float
    slice_thickness: float
    slab_centre_mm: float  # z (RAS) of the slab's centre
    intensity_scale: float
    bias_strength: float
    noise: float


def template_folder() -> Path:
    """nilearn's data folder, found without importing nilearn (which would import scikit-learn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MNI152 template ships with nilearn: pip install nilearn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def profiles(num_sites: int, seed: int) -> list[MRProfile]:
    out = []
    for i in range(num_sites):
        rng = np.random.default_rng([seed, i, BRAIN_VERSION, 7])
        matrix = int(rng.choice([48, 56, 64]))
        out.append(MRProfile(site=f"brain-{i + 1:02d}", matrix=matrix, pixel_spacing=round(float(rng.uniform(200, 230)) / matrix, 3),
                             slice_thickness=float(rng.choice([4.0, 5.0, 6.0])), slab_centre_mm=round(float(rng.uniform(5, 25)), 1),
                             intensity_scale=round(float(rng.uniform(2.0, 8.0)), 2), bias_strength=round(float(rng.uniform(0.0, 0.3)), 2),
                             noise=round(float(rng.uniform(0.01, 0.05)), 3)))
    return out


def _sample(volume: np.ndarray, inverse_affine: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    ijk = points @ inverse_affine[:3, :3].T + inverse_affine[:3, 3]
    return map_coordinates(volume, ijk.T, order=order, mode="constant", cval=0.0)


def write_patient(profile: MRProfile, index: int, slices: int, out: Path, seed: int, template: dict[str, nib.Nifti1Image]) -> None:
    rng = np.random.default_rng([seed, BRAIN_VERSION, int(profile.site[-2:]), index])
    angle = np.deg2rad(rng.uniform(-8, 8))
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-6, 6, size=3)
    # The series' grid in patient LPS mm: axial slices, row direction +x (L), column direction +y (P).
    n, spacing, thick = profile.matrix, profile.pixel_spacing, profile.slice_thickness
    half = (n - 1) / 2 * spacing
    zs = profile.slab_centre_mm + (np.arange(slices) - (slices - 1) / 2) * thick
    cols, rows = np.meshgrid(np.arange(n) * spacing - half, np.arange(n) * spacing - half)
    grid_lps = np.stack([np.broadcast_to(cols, (slices, n, n)), np.broadcast_to(rows, (slices, n, n)),
                         np.broadcast_to(zs[:, None, None], (slices, n, n))], axis=-1).reshape(-1, 3)
    # Where each voxel of the patient falls in the template (RAS): the patient is the template moved.
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) / scale
    ras = (grid_lps * np.array([-1.0, -1.0, 1.0]) - shift) @ rotation.T
    t1, gm, wm = (_sample(np.asarray(template[k].dataobj, dtype=np.float32), np.linalg.inv(template[k].affine), ras, order=1)
                  .reshape(slices, n, n) for k in ("t1", "gm", "wm"))
    labels = np.where((wm >= 128) & (wm >= gm), 2, np.where(gm >= 128, 1, 0)).astype(np.uint8)
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    bias = 1 + profile.bias_strength * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
    signal = (t1 / 255.0) * bias[None] + rng.normal(0, profile.noise, t1.shape)
    stored = np.clip(np.rint(signal * 1000 * profile.intensity_scale), 0, 65535).astype(np.uint16)

    patient = f"{profile.site}-P{index + 1:03d}"
    uids = {k: generate_uid(entropy_srcs=[str(seed), patient, k, str(BRAIN_VERSION)]) for k in ("study", "series", "frame")}
    folder = out / patient / "MR"
    folder.mkdir(parents=True)
    datasets = []
    for k in range(slices):
        ds = mr_slice(stored[k], patient, uids, generate_uid(entropy_srcs=[uids["series"], str(k)]), k + 1,
                      orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], position=[-half, -half, float(zs[k])], spacing=(thick, spacing, spacing),
                      PatientName=f"Template^{patient}", SeriesNumber=3, Manufacturer=f"Template {profile.site}",
                      ManufacturerModelName="MNI152 2009a", ScanningSequence="GR", SequenceVariant="SP", ScanOptions="",
                      MRAcquisitionType="3D", ImageType=["DERIVED", "SECONDARY", "AXIAL"])
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    write_seg(datasets, labels, CLASS_NAMES, out / patient / "SEG" / "tissues.dcm", uid_entropy=[str(seed), patient, "seg"],
              codings=CLASS_CODES)


def build_brain_federation(cache_root: str | Path, num_sites: int = 3, seed: int = 0, size: str = "default") -> Path:
    """The federation's root folder (one subfolder per site), generated once and cached."""
    root = Path(cache_root) / f"brain-v{BRAIN_VERSION}-{size}-{num_sites}sites-seed{seed}"
    if (root / "federation.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    folder = template_folder()
    template = {k: nib.load(str(folder / TEMPLATE.format(k))) for k in ("t1", "gm", "wm")}
    patients, slices = SIZES[size]
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        sites = profiles(num_sites, seed)
        for profile in sites:
            log.info("generating %s from the MNI152 template: %d patients, %dx%dx%d @ %.2fx%s mm", profile.site, patients,
                     profile.matrix, profile.matrix, slices, profile.pixel_spacing, profile.slice_thickness)
            for index in range(patients):
                write_patient(profile, index, slices, tmp / profile.site, seed, template)
        (tmp / "federation.json").write_text(json.dumps({"source": "MNI152 ICBM 2009a (nilearn)", "version": BRAIN_VERSION,
                                                         "classes": CLASS_NAMES[1:], "sites": [asdict(p) for p in sites]}, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
