"""DICOM on disk -> image series and label masks, with a report of everything used or skipped.

A site folder may be nested any way a PACS export or a viewer wrote it, with patient folders linked
in (PACS and XNAT mounts do): symbolic links to folders are followed, each real folder once. Files
are found by content, grouped by SeriesInstanceUID and ordered along the slice normal (file names
and InstanceNumber are not trusted). Labels are DICOM-SEG objects matched to their series through
their references (and the patient, study and frame of reference they share), or NIfTI masks listed
in a `masks.csv` manifest (columns `series_instance_uid,mask`, paths relative to it, inside the site).

Real archives hold broken and foreign files next to good ones, and a file may be hostile: every file
or series that cannot be used is named in the load report with the reason, and the rest still loads.
A file is bounded before it is decoded (header size, pixel count, bits, compression ratio; deflated
files refused), values that are not finite are refused, and pixels are decoded only for the series
a caller uses. Memory: the scan reads the HEADER_TAGS of each file and keeps only a `Header` of
plain values (about 1 KB a file, where the parsed pydicom elements took 18 KB: 100,000 files stay
near 100 MiB, not 2 GB), then reads one file at a time (at most MAX_FILE_BYTES), again in full when
its series is decoded, and decodes one object at a time (MAX_IMAGE_PIXELS, MAX_SEG_PIXELS).
Prediction decodes one series at a time (`image_series`, then `decode_series`).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SegmentationStorage,
)

MASK_MANIFEST = "masks.csv"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient space (LPS) -> NIfTI world space (RAS)

MAX_HEADER_BYTES = 8 * 2**20  # everything before the pixel data lies in a file's first 8 MiB
MAX_IMAGE_PIXELS = 4096 * 4096  # one slice: rows x columns x frames x samples
MAX_SEG_PIXELS = 2**28  # one label object, frames x rows x columns, decoded one byte each (e.g. 1000 frames of 512²)
MAX_BITS = 64  # bits allocated per sample (64: double float pixel data)
MAX_COMPRESSION_RATIO = 1000  # stored pixel bytes per byte of file: a 1 KB file never decodes to more than 1 MB
MAX_FILE_BYTES = MAX_HEADER_BYTES + MAX_SEG_PIXELS  # larger than any slice or (8-bit) label the bounds above admit
HEADER_TAGS = (  # what the scan reads of each file, not the whole header
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID",
    "Modality", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
    "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "ReferencedSeriesSequence",
)
FINITE_TAGS = ("RescaleSlope", "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")
SEG_MUST_MATCH = {"PatientID": "patient_id", "StudyInstanceUID": "study_uid", "FrameOfReferenceUID": "frame_uid"}  # keyword: Header field


class RefusedFile(ValueError):
    """A file or value the site will not decode or use. The message names what is wrong (sizes,
    attribute names), never a patient identifier or UID read from the file: it may be logged anywhere."""


@dataclass(frozen=True, slots=True)
class Header:
    """The values of one file's header that the loader uses after the scan, as plain Python values:
    a parsed pydicom header takes about 18 KB, this about 1 KB, and a site may hold 100,000 files.
    Geometry is empty for a SEG; `referenced_series` is a SEG's only."""

    sop_class: str
    sop_uid: str
    series_uid: str
    study_uid: str
    frame_uid: str
    patient_id: str
    modality: str
    photometric: str
    rows: int = 0
    columns: int = 0
    position: tuple[float, ...] = ()
    orientation: tuple[float, ...] = ()
    pixel_spacing: tuple[float, ...] = ()
    slice_thickness: float = 1.0
    referenced_series: str = ""

    @property
    def is_seg(self) -> bool:
        return self.sop_class == SegmentationStorage


SeriesFiles = list[tuple[Path, Header]]  # one series' files in path order, as the scan found them


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
            lines.append(f"  used     patient={u['patient_id']} series={u['series_uid']} slices={u['slices']} label={u['label_source']}"
                         f" in {u['location']}{notes}")
        for s in self.skipped:
            lines.append(f"  skipped  {s['path']}: {s['reason']}")
        return "\n".join(lines)


@dataclass
class _Scan:
    """A site folder's headers: image files by series, SEG files, and mask manifests."""

    images: dict[str, SeriesFiles] = field(default_factory=lambda: defaultdict(list))
    segs: list[tuple[Path, Header]] = field(default_factory=list)
    manifests: list[Path] = field(default_factory=list)


class _Window(io.BufferedReader):
    """A file that may not be read past its first `limit` bytes: pydicom parses through it, so a
    header that never ends, or a huge element, is refused before it is read into memory."""

    def __init__(self, path: Path, limit: int, what: str) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.limit, self.what, self.size = limit, what, os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        remaining = max(self.size - self.tell(), 0)  # a length past the end is a short read, not an allocation
        size = remaining if size is None or size < 0 else min(size, remaining)
        if size and self.tell() + size > self.limit:
            raise RefusedFile(f"{self.what} too large: more than {self.limit / 2**20:.0f} MiB to read")
        return super().read(size)


def _transfer_syntax(fp: io.BufferedReader) -> str:
    """The file meta's transfer syntax, read before the dataset (pydicom inflates a deflated
    dataset whole as soon as it parses it); the file is left at its start."""
    read_preamble(fp, force=True)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag.group != 2)
    fp.seek(0)
    return str(meta.get("TransferSyntaxUID", ""))


def read_dicom(path: str | Path, stop_before_pixels: bool = False, specific_tags: Sequence[str] | None = None) -> pydicom.Dataset:
    """Read a DICOM file, also one without the 128-byte preamble and file meta header (older
    archives and some exporters write these); anything without an SOP class is not DICOM.
    Bounded: no file over MAX_FILE_BYTES, no header over MAX_HEADER_BYTES, no deflated dataset."""
    size = Path(path).stat().st_size
    if size > MAX_FILE_BYTES:
        raise RefusedFile(f"file too large: {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB any slice or label may take")
    limit, what = (MAX_HEADER_BYTES, "header") if stop_before_pixels else (MAX_FILE_BYTES, "file")
    with _Window(Path(path), limit, what) as fp:
        if _transfer_syntax(fp) == DeflatedExplicitVRLittleEndian:
            raise RefusedFile("deflated transfer syntax refused: it is inflated whole in memory (a decompression bomb "
                              "can take gigabytes); re-export the file uncompressed or with a lossless image compression")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags)
        except InvalidDicomError:
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags, force=True)
    if "SOPClassUID" not in ds:
        raise InvalidDicomError("no DICOM preamble and no SOP Class UID")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def check_pixel_claims(ds: pydicom.Dataset, file_size: int, max_pixels: int) -> None:
    """Refuse what a header claims before a decoder allocates it: rows x columns x frames x samples,
    the bits per sample, and the compression ratio (claimed pixel bytes per byte of file)."""
    counts = [int(ds.get(keyword) or default) for keyword, default in
              (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1))]
    bits = int(ds.get("BitsAllocated") or 0)
    shape = " x ".join(map(str, counts))
    if min(counts) < 1 or not 1 <= bits <= MAX_BITS:
        raise RefusedFile(f"pixel description invalid: rows x columns x frames x samples = {shape}, {bits} bits allocated")
    pixels = int(np.prod(counts, dtype=np.int64))
    if pixels > max_pixels:
        raise RefusedFile(f"pixel data too large: rows x columns x frames x samples = {shape} = {pixels / 2**20:.0f} Mi pixels, "
                          f"over the {max_pixels / 2**20:.0f} Mi pixel limit")
    stored = pixels * bits // 8
    if stored > MAX_COMPRESSION_RATIO * file_size:
        raise RefusedFile(f"compression ratio too high: {stored / 2**20:.1f} MiB of pixel data claimed by a {file_size / 1024:.1f} KB file "
                          f"({stored // max(file_size, 1)}:1, limit {MAX_COMPRESSION_RATIO}:1)")


def check_finite(ds: pydicom.Dataset) -> None:
    """Refuse a rescale or geometry value that is not a finite number: a NaN slope makes every
    voxel NaN, and one NaN slice turns every training update NaN while ε is still spent."""
    for keyword in FINITE_TAGS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            finite = bool(np.all(np.isfinite(np.asarray(value, dtype=float))))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise RefusedFile(f"non-finite value: {keyword} is {value}")


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


def _text(ds: pydicom.Dataset, keyword: str, default: str = "") -> str:
    """An attribute as a string shared by every file that holds the same value (a series' UIDs,
    patient and modality repeat in each of its files)."""
    return sys.intern(str(ds.get(keyword) or default))


def _floats(ds: pydicom.Dataset, keyword: str) -> tuple[float, ...]:
    """A numeric attribute as a tuple of floats, empty when absent."""
    value = ds.get(keyword)
    return () if value is None or value == "" else tuple(float(v) for v in np.atleast_1d(np.asarray(value, dtype=float)))


def _header(ds: pydicom.Dataset, is_seg: bool) -> Header:
    """The plain values the loader keeps of a checked header; the SOP Instance and Series UIDs are
    required (a file without them cannot be placed in a series or referenced by a label)."""
    common = dict(sop_class=_text(ds, "SOPClassUID"), sop_uid=str(ds.SOPInstanceUID), series_uid=sys.intern(str(ds.SeriesInstanceUID)),
                  study_uid=_text(ds, "StudyInstanceUID"), frame_uid=_text(ds, "FrameOfReferenceUID"), patient_id=_text(ds, "PatientID"),
                  modality=_text(ds, "Modality", "OT"), photometric=_text(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if is_seg:
        refs = ds.get("ReferencedSeriesSequence") or []
        return Header(**common, referenced_series=_text(refs[0], "SeriesInstanceUID") if refs else "")
    return Header(**common, rows=int(ds.Rows), columns=int(ds.Columns), position=_floats(ds, "ImagePositionPatient"),
                  orientation=_floats(ds, "ImageOrientationPatient"), pixel_spacing=_floats(ds, "PixelSpacing"),
                  slice_thickness=float(ds.get("SliceThickness") or 1.0))


def read_header(path: str | Path) -> Header:
    """What the loader needs of one file, read within bounds and checked before any pixel is
    decoded (pixel claims, finite values); raises RefusedFile naming why a file is not used,
    also when it is no greyscale cross-sectional image (an RT plan, a report, a colour image)."""
    ds = read_dicom(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    is_seg = str(ds.get("SOPClassUID", "")) == SegmentationStorage
    reason = None if is_seg else _not_an_image(ds)
    if reason:
        raise RefusedFile(reason)
    check_pixel_claims(ds, Path(path).stat().st_size, MAX_SEG_PIXELS if is_seg else MAX_IMAGE_PIXELS)
    check_finite(ds)
    return _header(ds, is_seg)


def _files(folder: Path, report: LoadReport) -> list[Path]:
    """Every file under `folder`, following symbolic links to folders (PACS and XNAT mounts link
    patient folders in), each real folder and file once. A link back up the tree, or a second link
    to a folder already scanned, is named in the report and not followed."""
    site = os.path.realpath(folder)
    seen_dirs: dict[str, str] = {}
    seen_files: set[str] = set()
    files = []
    for here, dirs, names in os.walk(folder, followlinks=True, onerror=lambda err: report.skip(err.filename, f"folder unreadable ({_problem(err)})")):
        real = os.path.realpath(here)
        if real != site and site.startswith(real.rstrip(os.sep) + os.sep):
            report.skip(here, f"symbolic link loop: links to {real}, which holds the site folder; not followed")
            dirs.clear()
            continue
        if real in seen_dirs:
            report.skip(here, f"symbolic link loop or second link: {real} is already scanned as {seen_dirs[real]}; not scanned again")
            dirs.clear()
            continue
        seen_dirs[real] = here
        dirs.sort()
        for name in names:
            path = os.path.join(here, name)
            linked = os.path.islink(path)
            real_file = os.path.realpath(path) if linked else os.path.join(real, name)
            if linked and not os.path.exists(real_file):
                report.skip(path, "broken symbolic link")
            elif real_file in seen_files:
                report.skip(path, f"symbolic link to a file already scanned ({real_file}); not read twice")
            else:
                seen_files.add(real_file)
                files.append(Path(path))
    return sorted(files)


def _scan_headers(folder: Path, report: LoadReport) -> _Scan:
    """Read every file's header once (a few tags, bounded) and keep its `Header`; split images (by
    series) from SEGs and mask manifests, and name everything else. No pixel data is read here."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    scan = _Scan()
    for path in _files(folder, report):
        if path.name == MASK_MANIFEST:
            scan.manifests.append(path)
            continue
        if path.suffix in {".nii", ".gz", ".json", ".csv", ".txt", ".md"}:
            continue
        try:
            header = read_header(path)
        except RefusedFile as err:
            report.skip(path, str(err))
            continue
        except Exception as err:  # any file may be broken in any way; it is named, never fatal
            report.skip(path, f"not a readable DICOM file ({_problem(err)})")
            continue
        if header.is_seg:
            scan.segs.append((path, header))
        else:
            scan.images[header.series_uid].append((path, header))
    return scan


def order_slices(headers: Sequence[Header]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice order along the normal of the image plane, the positions along it, and the normal."""
    orientation = np.asarray(headers[0].orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.dot(np.asarray(h.position, dtype=float), normal) for h in headers])
    order = np.argsort(positions, kind="stable")
    return order, positions[order], normal


def read_pixels(path: str | Path) -> np.ndarray:
    """One slice in modality units (HU for CT); names the decoder to install when none is present.
    Refuses a slice whose header claims too much, and one with values that are not finite.

    MONOCHROME1 only says how to display: CT keeps its HU, other modalities are inverted so that
    bright means high signal, as on a MONOCHROME2 image and in every viewer."""
    path = Path(path)
    ds = read_dicom(path)
    check_pixel_claims(ds, path.stat().st_size, MAX_IMAGE_PIXELS)
    check_finite(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed and not get_decoder(syntax).is_available:
        missing = "; ".join(get_decoder(syntax).missing_dependencies)
        raise ValueError(f"pixel data is {syntax.name}, and no installed decoder reads it (install one of: {missing})")
    try:
        stored = ds.pixel_array
    except Exception as err:
        raise ValueError(f"pixel data unreadable ({_problem(err)})") from err
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" and ds.get("Modality") != "CT":
        # The same inversion for every slice: within the stored bit range, not each slice's own range.
        stored = (2 ** int(ds.BitsStored) - 1 - stored.astype(np.int64)) if int(ds.PixelRepresentation) == 0 else -stored.astype(np.int64)
    values = apply_modality_lut(stored, ds).astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise RefusedFile(f"non-finite pixel values: {bad} of {values.size} are NaN or infinite after rescale")
    return values


def _slice_pixels(path: Path) -> np.ndarray:
    """`read_pixels`, its refusal naming the file (the series' report line names the series)."""
    try:
        return read_pixels(path)
    except ValueError as err:
        raise ValueError(f"{Path(path).name}: {err}") from err


def _check_geometry(headers: Sequence[Header]) -> None:
    """Refuse a series whose slices do not share one grid: orientation, size and pixel spacing."""
    first = headers[0]
    if any(len(h.pixel_spacing) != 2 for h in headers):
        raise ValueError("a slice has no PixelSpacing (row and column spacing)")
    for h in headers[1:]:
        if not np.allclose(np.asarray(h.orientation, dtype=float), np.asarray(first.orientation, dtype=float), atol=1e-4):
            raise ValueError("slices have different orientations")
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise ValueError("slices have different sizes")
        if not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise ValueError("slices have different pixel spacings")


def read_series(files: Sequence[tuple[Path, Header]]) -> Series:
    """Assemble one series from its scanned headers, reading each slice's pixels (and full header)
    again; raises ValueError with the reason when its geometry or pixels are unusable."""
    headers = [h for _, h in files]
    first = headers[0]
    _check_geometry(headers)
    order, positions, normal = order_slices(headers)
    gaps = np.diff(positions)
    if len(gaps) and np.min(gaps) < 1e-3:
        raise ValueError("two or more slices share a position")
    if len(gaps) and np.ptp(gaps) > 0.1 * np.median(gaps) + 1e-3:
        raise ValueError("slice spacing is not uniform")
    slice_spacing = float(np.median(gaps)) if len(gaps) else first.slice_thickness
    row_spacing, col_spacing = first.pixel_spacing
    slices = [_slice_pixels(files[idx][0]) for idx in order]
    notes = ["MONOCHROME1, inverted to MONOCHROME2"] if first.photometric == "MONOCHROME1" and first.modality != "CT" else []
    return Series(
        uid=first.series_uid,
        patient_id=first.patient_id or first.series_uid,
        modality=first.modality,
        sop_uids=[headers[i].sop_uid for i in order],
        volume=np.stack(slices),
        spacing=(slice_spacing, row_spacing, col_spacing),
        origin=np.asarray(headers[order[0]].position, dtype=float),
        orientation=np.asarray(first.orientation, dtype=float),
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
    ds = read_dicom(seg_path)
    check_pixel_claims(ds, Path(seg_path).stat().st_size, MAX_SEG_PIXELS)
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
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
    return mask, f"DICOM-SEG {Path(seg_path).name} ({how})"


def voxel_to_patient(series: Series) -> np.ndarray:
    """4x4 affine from (slice, row, col) indices to patient LPS millimetres."""
    affine = np.eye(4)
    affine[:3, 0] = series.normal * series.spacing[0]
    affine[:3, 1] = series.orientation[3:] * series.spacing[1]
    affine[:3, 2] = series.orientation[:3] * series.spacing[2]
    affine[:3, 3] = series.origin
    return affine


def _nifti_labels(path: Path) -> nib.spatialimages.SpatialImage:
    """A NIfTI label image, its size checked from the header before its voxels are read (gzip
    itself cannot inflate more than about 1000:1, so the voxel bound also bounds the work)."""
    image = nib.load(str(path))
    nbytes = int(np.prod(image.shape, dtype=np.int64)) * image.get_data_dtype().itemsize
    if nbytes > MAX_SEG_PIXELS:
        raise RefusedFile(f"NIfTI mask too large: {' x '.join(map(str, image.shape))} voxels, {nbytes / 2**20:.0f} MiB, "
                          f"over the {MAX_SEG_PIXELS / 2**20:.0f} MiB limit")
    return image


def read_nifti_mask(path: Path, series: Series) -> np.ndarray:
    """Resample a NIfTI label image onto the series grid (nearest neighbour, through world space),
    one slice at a time so that memory stays a few bytes per voxel."""
    image = _nifti_labels(path)
    labels = np.asarray(image.dataobj)
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise RefusedFile("non-finite values in the NIfTI mask")
    to_nifti = np.linalg.inv(image.affine) @ LPS_TO_RAS @ voxel_to_patient(series)
    slices, rows, cols = series.volume.shape
    plane = np.stack([np.zeros(rows * cols), *np.divmod(np.arange(rows * cols), cols)], axis=-1)
    mask = np.zeros((slices, rows * cols), dtype=np.uint8)
    overlap = False
    for k in range(slices):
        plane[:, 0] = k
        ijk = np.rint(plane @ to_nifti[:3, :3].T + to_nifti[:3, 3]).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(labels.shape[:3])), axis=1)
        mask[k, inside] = labels[ijk[inside, 0], ijk[inside, 1], ijk[inside, 2]]
        overlap |= bool(inside.any())
    if not overlap:
        raise ValueError("the NIfTI mask does not overlap the series")
    return mask.reshape(series.volume.shape)


def _mask_path(manifest: Path, written: str) -> Path:
    """A manifest's mask path, judged as written: relative and without `..`, so it stays inside the
    site folder (symbolic links inside it are followed, as for the DICOM files)."""
    parts = PureWindowsPath(written)  # splits on / and \ alike, and sees drives
    if parts.anchor or ".." in parts.parts or PurePosixPath(written).is_absolute():
        raise RefusedFile("mask path outside the site folder: absolute or climbing out with '..' "
                          "(masks.csv paths are relative to it and stay inside the site folder)")
    return manifest.parent.joinpath(*parts.parts)


def _manifest(manifests: Sequence[Path], report: LoadReport) -> dict[str, Path]:
    """Series UID -> NIfTI mask, from every masks.csv found; rows that cannot be used are named."""
    masks = {}
    for manifest in manifests:
        with manifest.open(newline="") as fh:
            for number, row in enumerate(csv.DictReader(fh), start=2):
                uid, written = (row.get("series_instance_uid") or "").strip(), (row.get("mask") or "").strip()
                try:
                    path = _mask_path(manifest, written)
                except RefusedFile as err:
                    report.skip(f"{manifest} line {number}", str(err))
                    continue
                if not uid or not written or not path.is_file():
                    report.skip(manifest, f"row {row} names no series or a missing mask file")
                    continue
                masks[uid] = path
    return masks


def _location(paths: Sequence[Path]) -> str:
    """Where files really live: their common folder, symbolic links resolved."""
    return os.path.commonpath(sorted({os.path.realpath(p.parent) for p in paths}))


def decode_series(files: SeriesFiles, report: LoadReport) -> Series | None:
    """One scanned series with its pixels, or None when it cannot be used (named in the report)."""
    try:
        return read_series(files)
    except Exception as err:
        report.skip(f"series {files[0][1].series_uid} ({len(files)} files in {_location([p for p, _ in files])})",
                    str(err) if isinstance(err, ValueError) else _problem(err))
        return None


def _decode(images: dict[str, SeriesFiles], report: LoadReport) -> dict[str, Series]:
    """The pixels of the series asked for, one series at a time; a series that fails is named."""
    decoded = ((uid, decode_series(files, report)) for uid, files in images.items())
    return {uid: series for uid, series in decoded if series is not None}


def _seg_candidates(scan: _Scan, report: LoadReport) -> dict[str, list[Path]]:
    """The SEGs that may label each series: those that reference it from the same patient, study
    and frame of reference (a SEG carrying another patient's identity is never used as a label)."""
    candidates: dict[str, list[Path]] = defaultdict(list)
    for path, seg in scan.segs:
        ref_uid = seg.referenced_series
        if ref_uid not in scan.images:
            report.skip(path, f"DICOM-SEG references series {ref_uid or '(none)'}, which is not in the folder or not usable")
            continue
        image = scan.images[ref_uid][0][1]
        differ = [keyword for keyword, name in SEG_MUST_MATCH.items() if getattr(seg, name) != getattr(image, name)]
        if differ:
            report.skip(path, f"foreign DICOM-SEG: its {', '.join(differ)} differ from the series it references "
                              "(another patient's or study's label); not used")
        else:
            candidates[ref_uid].append(path)
    return candidates


def load_series(folder: str | Path, report: LoadReport) -> tuple[dict[str, Series], list[tuple[Path, Header]]]:
    """Every usable image series under `folder` (by SeriesInstanceUID), all decoded at once, and the
    SEG headers found. Memory grows with the folder: `image_series` + `decode_series` do not."""
    scan = _scan_headers(Path(folder), report)
    return _decode(scan.images, report), scan.segs


def image_series(folder: str | Path, report: LoadReport) -> list[SeriesFiles]:
    """The files of every image series under `folder`, headers only, in (patient, series UID) order:
    a caller decodes them one at a time (`decode_series`), so it holds one series' pixels, not the folder's."""
    return sorted(_scan_headers(Path(folder), report).images.values(), key=_patient_and_series)


def _patient_and_series(files: SeriesFiles) -> tuple[str, str]:
    """The order series are predicted in, as `Series.patient_id` and `Series.uid` would give it."""
    first = files[0][1]
    return first.patient_id or first.series_uid, first.series_uid


def _label_with_segs(candidates: dict[str, list[Path]], series_by_uid: dict[str, Series], class_names: Sequence[str],
                     report: LoadReport) -> dict[str, LabelledSeries]:
    """Each series' first SEG that aligns with it and is not empty; the others are named."""
    labelled: dict[str, LabelledSeries] = {}
    for uid, paths in candidates.items():
        for path in paths:
            if uid not in series_by_uid:
                report.skip(path, f"DICOM-SEG references series {uid}, which is not in the folder or not usable")
                continue
            if uid in labelled:
                report.skip(path, f"a second DICOM-SEG for series {uid}; using {labelled[uid].label_source}")
                continue
            try:
                mask, source = read_seg_mask(path, series_by_uid[uid], class_names)
            except Exception as err:
                report.skip(path, f"DICOM-SEG could not be aligned with its series: {_problem(err)}")
                continue
            if mask.any():
                labelled[uid] = LabelledSeries(series_by_uid[uid], mask, source)
            else:
                report.skip(path, "DICOM-SEG mask is empty (no voxel of any class): an unfinished annotation?")
    return labelled


def load_site_series(folder: str | Path, class_names: Sequence[str]) -> tuple[list[LabelledSeries], LoadReport]:
    """Every labelled series under `folder`, with a report; raises if none is usable. Only series
    with a label are decoded: the others cost a header read each, never their pixels."""
    folder = Path(folder)
    report = LoadReport(folder=str(folder))
    scan = _scan_headers(folder, report)
    candidates = _seg_candidates(scan, report)
    masks = _manifest(scan.manifests, report)
    wanted = {uid: files for uid, files in scan.images.items() if uid in candidates or uid in masks}
    series_by_uid = _decode(wanted, report)
    labelled = _label_with_segs(candidates, series_by_uid, class_names, report)
    for uid, path in masks.items():
        if uid in labelled or uid not in series_by_uid:
            report.skip(path, "NIfTI mask for a series that is missing or already labelled")
            continue
        try:
            labelled[uid] = LabelledSeries(series_by_uid[uid], read_nifti_mask(path, series_by_uid[uid]), f"NIfTI {path.name}")
        except (ValueError, OSError) as err:
            report.skip(path, f"NIfTI mask unusable: {err}")
    for uid, files in scan.images.items():
        if uid not in labelled and (uid not in wanted or uid in series_by_uid):
            patient = files[0][1].patient_id or uid
            report.skip(f"series {uid} (patient {patient})", "no label (no DICOM-SEG or NIfTI mask refers to it)")
    result = sorted(labelled.values(), key=lambda ls: (ls.series.patient_id, ls.series.uid))
    for ls in result:
        report.used.append({"patient_id": ls.series.patient_id, "series_uid": ls.series.uid, "slices": int(ls.series.volume.shape[0]),
                            "label_source": ls.label_source, "location": _location(ls.series.paths), "notes": ls.series.notes})
    if not result:
        raise ValueError(f"site folder {folder} has no usable labelled series.\n{report.format()}")
    return result, report
