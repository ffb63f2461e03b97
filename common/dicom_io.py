"""DICOM on disk -> image series and label masks, with a report of everything used or skipped.

A site folder may be nested any way a PACS export or a viewer wrote it; files are found by content,
grouped by SeriesInstanceUID and ordered along the slice normal (file names and InstanceNumber are
not trusted). Labels are DICOM-SEG objects matched to their series through their references, or NIfTI
masks listed in a `masks.csv` manifest (columns `series_instance_uid,mask`, paths relative to it).

Real archives hold broken and foreign files next to good ones: every file or series that cannot be
used is named in the load report with the reason, and the rest still loads.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, SegmentationStorage

MASK_MANIFEST = "masks.csv"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient space (LPS) -> NIfTI world space (RAS)


@dataclass
class Series:
    """One image series in patient space: slices ordered along the normal, values in modality units."""

    uid: str
    patient_id: str
    modality: str
    sop_uids: list[str]
    volume: np.ndarray  # [slices, rows, cols], float32 (HU for CT)
    spacing: tuple[float, float, float]  # (slice, row, col) in mm
    origin: np.ndarray  # ImagePositionPatient of the first slice
    orientation: np.ndarray  # 6 direction cosines (row direction, column direction)
    normal: np.ndarray
    paths: list[Path] = field(default_factory=list)  # the slice files, in slice order
    notes: list[str] = field(default_factory=list)


@dataclass
class LabelledSeries:
    series: Series
    mask: np.ndarray  # [slices, rows, cols] class indices, uint8
    label_source: str


@dataclass
class LoadReport:
    """What a site's folder gave: the series used and every file or series skipped, with why."""

    folder: str
    used: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, what: str | Path, reason: str) -> None:
        self.skipped.append({"path": str(what), "reason": reason})

    def format(self) -> str:
        lines = [f"Load report for {self.folder}: {len(self.used)} labelled series used, {len(self.skipped)} skipped"]
        for u in self.used:
            notes = "".join(f"; {n}" for n in u.get("notes", []))
            lines.append(f"  used     patient={u['patient_id']} series={u['series_uid']} slices={u['slices']} label={u['label_source']}{notes}")
        for s in self.skipped:
            lines.append(f"  skipped  {s['path']}: {s['reason']}")
        return "\n".join(lines)


def read_dicom(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """Read a DICOM file, also one without the 128-byte preamble and file meta header (older
    archives and some exporters write these); anything without an SOP class is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    if "SOPClassUID" not in ds:
        raise InvalidDicomError("no DICOM preamble and no SOP Class UID")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _problem(err: Exception) -> str:
    """An exception as one short report line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _not_an_image(ds: pydicom.Dataset) -> str | None:
    """Why this object is not a greyscale cross-sectional image we can train on, or None."""
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    kind = f"{sop_class.name or sop_class} (Modality {ds.get('Modality', '?')})"
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "Rows" not in ds:
        return f"not a cross-sectional image: {kind}"
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in ("MONOCHROME1", "MONOCHROME2"):
        return f"colour image ({ds.PhotometricInterpretation}), {kind}: segmentation needs greyscale CT/MR"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return f"multi-frame/enhanced object ({ds.NumberOfFrames} frames), {kind}: not supported; export the series as single-frame images"
    return None


def _scan_headers(folder: Path, report: LoadReport) -> tuple[dict[str, list[tuple[Path, pydicom.Dataset]]], list[tuple[Path, pydicom.Dataset]]]:
    """Read every file's header once; split images (by series) from SEGs, name everything else."""
    images: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    segs: list[tuple[Path, pydicom.Dataset]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == MASK_MANIFEST or path.suffix in {".nii", ".gz", ".json", ".csv", ".txt", ".md"}:
            continue
        try:
            ds = read_dicom(path, stop_before_pixels=True)  # pixels are read per series, not all at once
            reason = None if str(ds.get("SOPClassUID", "")) == SegmentationStorage else _not_an_image(ds)
            series_uid = str(ds.SeriesInstanceUID)
        except Exception as err:  # any file may be broken in any way; it is named, never fatal
            report.skip(path, f"not a readable DICOM file ({_problem(err)})")
            continue
        if reason:
            report.skip(path, reason)
        elif str(ds.SOPClassUID) == SegmentationStorage:
            segs.append((path, ds))
        else:
            images[series_uid].append((path, ds))
    return images, segs


def order_slices(headers: Sequence[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice order along the normal of the image plane, the positions along it, and the normal."""
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.dot(np.asarray(h.ImagePositionPatient, dtype=float), normal) for h in headers])
    order = np.argsort(positions, kind="stable")
    return order, positions[order], normal


def read_pixels(path: Path) -> np.ndarray:
    """One slice in modality units (HU for CT); names the decoder to install when none is present.

    MONOCHROME1 only says how to display: CT keeps its HU, other modalities are inverted so that
    bright means high signal, as on a MONOCHROME2 image and in every viewer."""
    ds = read_dicom(path)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed and not get_decoder(syntax).is_available:
        missing = "; ".join(get_decoder(syntax).missing_dependencies)
        raise ValueError(f"{path.name}: pixel data is {syntax.name}, and no installed decoder reads it (install one of: {missing})")
    try:
        stored = ds.pixel_array
    except Exception as err:
        raise ValueError(f"{path.name}: pixel data unreadable ({_problem(err)})") from err
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" and ds.get("Modality") != "CT":
        # The same inversion for every slice: within the stored bit range, not each slice's own range.
        stored = (2 ** int(ds.BitsStored) - 1 - stored.astype(np.int64)) if int(ds.PixelRepresentation) == 0 else -stored.astype(np.int64)
    return apply_modality_lut(stored, ds).astype(np.float32)


def read_series(files: Sequence[tuple[Path, pydicom.Dataset]]) -> Series:
    """Assemble one series; raises ValueError with the reason when its geometry is unusable."""
    headers = [h for _, h in files]
    first = headers[0]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for h in headers[1:]:
        if not np.allclose(np.asarray(h.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise ValueError("slices have different orientations")
        if (h.Rows, h.Columns) != (first.Rows, first.Columns):
            raise ValueError("slices have different sizes")
        if not np.allclose(np.asarray(h.PixelSpacing, dtype=float), np.asarray(first.PixelSpacing, dtype=float), rtol=1e-3):
            raise ValueError("slices have different pixel spacings")
    order, positions, normal = order_slices(headers)
    gaps = np.diff(positions)
    if len(gaps) and np.min(gaps) < 1e-3:
        raise ValueError("two or more slices share a position")
    if len(gaps) and np.ptp(gaps) > 0.1 * np.median(gaps) + 1e-3:
        raise ValueError("slice spacing is not uniform")
    slice_spacing = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness", 1.0) or 1.0)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    slices = [read_pixels(files[idx][0]) for idx in order]
    notes = ["MONOCHROME1, inverted to MONOCHROME2"] if first.get("PhotometricInterpretation") == "MONOCHROME1" and first.get("Modality") != "CT" else []
    return Series(
        uid=str(first.SeriesInstanceUID),
        patient_id=str(first.get("PatientID", "") or first.SeriesInstanceUID),
        modality=str(first.get("Modality", "OT")),
        sop_uids=[str(headers[i].SOPInstanceUID) for i in order],
        volume=np.stack(slices),
        spacing=(slice_spacing, row_spacing, col_spacing),
        origin=np.asarray(headers[order[0]].ImagePositionPatient, dtype=float),
        orientation=orientation,
        normal=normal,
        paths=[files[i][0] for i in order],
        notes=notes,
    )


def _segment_classes(seg: hd.seg.Segmentation, class_names: Sequence[str]) -> tuple[dict[int, int], str]:
    """Map SEG segment numbers to our class indices, by label name, else by segment number."""
    lookup = {name.lower(): i for i, name in enumerate(class_names) if i > 0}
    by_name = {}
    numbers = list(seg.segment_numbers)
    for n in numbers:
        label = str(seg.get_segment_description(n).segment_label).strip().lower()
        if label in lookup:
            by_name[n] = lookup[label]
    if by_name:
        return by_name, "by segment label"
    return {n: n for n in numbers if 0 < n < len(class_names)}, "by segment number (no label matched the classes)"


def read_seg_mask(seg_path: Path, series: Series, class_names: Sequence[str]) -> tuple[np.ndarray, str]:
    """The SEG's segments as one class-index volume aligned slice by slice with `series`."""
    seg = hd.seg.segread(seg_path)
    mapping, how = _segment_classes(seg, class_names)
    if not mapping:
        raise ValueError("no segment maps to a configured class")
    numbers = sorted(mapping)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=series.sop_uids,
        segment_numbers=numbers,
        combine_segments=False,
        assert_missing_frames_are_empty=True,
    )
    mask = np.zeros(series.volume.shape, dtype=np.uint8)
    for index in np.argsort([mapping[n] for n in numbers], kind="stable"):  # higher classes win overlaps
        mask[pixels[..., index] > 0] = mapping[numbers[index]]
    return mask, f"DICOM-SEG {seg_path.name} ({how})"


def voxel_to_patient(series: Series) -> np.ndarray:
    """4x4 affine from (slice, row, col) indices to patient LPS millimetres."""
    affine = np.eye(4)
    affine[:3, 0] = series.normal * series.spacing[0]
    affine[:3, 1] = series.orientation[3:] * series.spacing[1]
    affine[:3, 2] = series.orientation[:3] * series.spacing[2]
    affine[:3, 3] = series.origin
    return affine


def read_nifti_mask(path: Path, series: Series) -> np.ndarray:
    """Resample a NIfTI label image onto the series grid (nearest neighbour, through world space)."""
    image = nib.load(str(path))
    labels = np.asarray(image.dataobj)
    to_nifti = np.linalg.inv(image.affine) @ LPS_TO_RAS @ voxel_to_patient(series)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in series.volume.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ijk = np.rint(grid @ to_nifti[:3, :3].T + to_nifti[:3, 3]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(labels.shape[:3])), axis=1)
    values = np.zeros(len(grid), dtype=np.uint8)
    values[inside] = labels[ijk[inside, 0], ijk[inside, 1], ijk[inside, 2]]
    if not inside.any():
        raise ValueError("the NIfTI mask does not overlap the series")
    return values.reshape(series.volume.shape)


def _manifest(folder: Path, report: LoadReport) -> dict[str, Path]:
    masks = {}
    for manifest in folder.rglob(MASK_MANIFEST):
        with manifest.open(newline="") as fh:
            for row in csv.DictReader(fh):
                uid, rel = (row.get("series_instance_uid") or "").strip(), (row.get("mask") or "").strip()
                path = (manifest.parent / rel).resolve()
                if not uid or not path.is_file():
                    report.skip(manifest, f"row {row} names no series or a missing mask file")
                    continue
                masks[uid] = path
    return masks


def load_series(folder: Path, report: LoadReport) -> tuple[dict[str, Series], list[tuple[Path, pydicom.Dataset]]]:
    """Every usable image series under `folder` (by SeriesInstanceUID) and the SEG headers found."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    images, segs = _scan_headers(folder, report)
    series_by_uid: dict[str, Series] = {}
    for uid, files in images.items():
        try:
            series_by_uid[uid] = read_series(files)
        except Exception as err:
            report.skip(f"series {uid} ({len(files)} files under {files[0][0].parent})", str(err) if isinstance(err, ValueError) else _problem(err))
    return series_by_uid, segs


def load_site_series(folder: str | Path, class_names: Sequence[str]) -> tuple[list[LabelledSeries], LoadReport]:
    """Every labelled series under `folder`, with a report; raises if none is usable."""
    folder = Path(folder)
    report = LoadReport(folder=str(folder))
    series_by_uid, segs = load_series(folder, report)
    labelled: dict[str, LabelledSeries] = {}
    for path, ds in segs:
        refs = ds.get("ReferencedSeriesSequence", [])
        ref_uid = str(refs[0].SeriesInstanceUID) if refs else ""
        if ref_uid not in series_by_uid:
            report.skip(path, f"DICOM-SEG references series {ref_uid or '(none)'}, which is not in the folder or not usable")
        elif ref_uid in labelled:
            report.skip(path, f"a second DICOM-SEG for series {ref_uid}; using {labelled[ref_uid].label_source}")
        else:
            try:
                mask, source = read_seg_mask(path, series_by_uid[ref_uid], class_names)
            except Exception as err:
                report.skip(path, f"DICOM-SEG could not be aligned with its series: {_problem(err)}")
                continue
            if mask.any():
                labelled[ref_uid] = LabelledSeries(series_by_uid[ref_uid], mask, source)
            else:
                report.skip(path, "DICOM-SEG mask is empty (no voxel of any class): an unfinished annotation?")
    for uid, path in _manifest(folder, report).items():
        if uid in labelled or uid not in series_by_uid:
            report.skip(path, "NIfTI mask for a series that is missing or already labelled")
            continue
        try:
            labelled[uid] = LabelledSeries(series_by_uid[uid], read_nifti_mask(path, series_by_uid[uid]), f"NIfTI {path.name}")
        except (ValueError, OSError) as err:
            report.skip(path, f"NIfTI mask unusable: {err}")
    for uid, series in series_by_uid.items():
        if uid not in labelled:
            report.skip(f"series {uid} (patient {series.patient_id})", "no label (no DICOM-SEG or NIfTI mask refers to it)")
    result = sorted(labelled.values(), key=lambda ls: (ls.series.patient_id, ls.series.uid))
    for ls in result:
        report.used.append({"patient_id": ls.series.patient_id, "series_uid": ls.series.uid, "slices": int(ls.series.volume.shape[0]),
                            "label_source": ls.label_source, "notes": ls.series.notes})
    if not result:
        raise ValueError(f"site folder {folder} has no usable labelled series.\n{report.format()}")
    return result, report
