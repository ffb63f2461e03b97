"""Test series written the way other DICOM tools write them: MR, implicit VR, flat folders,
shuffled numeric file names, arbitrary InstanceNumbers, a rescale slope, any orientation."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from simulations.mr_slice import mr_slice


def write_series(folder: Path, volume: np.ndarray, *, patient: str = "P1", spacing=(4.0, 1.5, 1.5),
                 tilt_deg: float = 0.0, descending: bool = False, slope: float = 1.0, intercept: float = 0.0,
                 modality: str = "MR", seed: int = 0, photometric: str = "MONOCHROME2",
                 transfer_syntax: str | None = None) -> list[pydicom.Dataset]:
    """`volume` is [slices, rows, cols] in modality units, slice 0 lowest along the normal.
    Returns the datasets in ascending-normal order (what a correct reader must reconstruct);
    `transfer_syntax` compresses the files on disk with pydicom's own encoders."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.deg2rad(tilt_deg)
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(row_dir, col_dir)
    uids = {k: generate_uid() for k in ("study", "series", "frame")}
    n = len(volume)
    names = rng.permutation(n) + 1
    numbers = rng.permutation(n) + 1
    datasets = []
    for k in range(n):
        ds = mr_slice(np.rint((volume[k] - intercept) / slope), patient, uids, generate_uid(), int(numbers[k]),
                      orientation=np.concatenate([row_dir, col_dir]), position=np.array([-20.0, -30.0, 5.0]) + k * spacing[0] * normal,
                      spacing=spacing, transfer_syntax=ImplicitVRLittleEndian, PatientName=f"Test^{patient}", Modality=modality,
                      SeriesNumber=7, Manufacturer="OtherVendor", PhotometricInterpretation=photometric,
                      RescaleSlope=slope, RescaleIntercept=intercept)
        datasets.append(ds)
    for k in (range(n - 1, -1, -1) if descending else range(n)):
        on_disk = datasets[k]
        if transfer_syntax:
            on_disk = copy.deepcopy(on_disk)
            on_disk.compress(transfer_syntax, generate_instance_uid=False)
        on_disk.save_as(folder / f"{names[k]}", enforce_file_format=False)
    return datasets


def write_seg(path: Path, datasets: list[pydicom.Dataset], mask: np.ndarray, labels: list[str], codings: list | None = None) -> None:
    """A SEG as a third-party tool might write it: segments named freely, source order shuffled, coded
    as `codings` says per label ((category, type) Codes or highdicom CodedConcepts; default Organ).
    An all-zero mask gives an empty first segment, as an annotation saved before drawing would."""
    codings = codings or [(codes.SCT.Organ, codes.SCT.Organ)] * len(labels)
    order = np.random.default_rng(1).permutation(len(datasets))
    present = [i for i in range(1, len(labels) + 1) if (mask == i).any()] or [1]
    seg = hd.seg.Segmentation(
        source_images=[datasets[i] for i in order],
        pixel_array=np.stack([(mask[order] == i) for i in present], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=j + 1, segment_label=labels[i - 1], segmented_property_category=codings[i - 1][0],
            segmented_property_type=codings[i - 1][1], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
            for j, i in enumerate(present)],
        series_instance_uid=generate_uid(), series_number=99, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="ThirdParty", manufacturer_model_name="Annotator", software_versions="2.0", device_serial_number="1",
        omit_empty_frames=bool(mask.any()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


def blob_volume(shape=(6, 24, 24), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image whose slice k has mean value 100 * k, and a mask with an organ and a lesion."""
    rng = np.random.default_rng(seed)
    n, r, c = shape
    image = np.stack([np.full((r, c), 100.0 * k) for k in range(n)]) + rng.normal(0, 5, shape).clip(-10, 10) + 50
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:5, 6:18, 6:18] = 1
    mask[3, 10:13, 10:13] = 2
    image[mask == 1] += 300
    return image, mask


def rewrite(path: Path, **attributes) -> None:
    """Set header attributes of a file in place (values as a hostile or broken exporter writes them)."""
    ds = pydicom.dcmread(path, force=True)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=False)


def write_float_pixels(path: Path, values: np.ndarray) -> None:
    """Replace a slice's integer pixel data with 32-bit Float Pixel Data holding `values`."""
    ds = pydicom.dcmread(path, force=True)
    for keyword in ("PixelData", "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, keyword)
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.astype("<f4").tobytes()
    ds.save_as(path, enforce_file_format=False)
