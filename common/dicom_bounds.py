"""Reading one DICOM file within bounds, before anything in it is trusted.

A site's files may be hostile: a header that never ends, a deflated dataset that inflates to
gigabytes, a tiny file claiming 65535² pixels, a NaN rescale slope. Each is refused here with a
`RefusedFile` naming what is wrong (sizes, attribute names, never a value that identifies a patient)
before a decoder allocates what the file claims. The scan keeps of each file only a `Header` of plain
values (about 1 KB, where the parsed pydicom elements took 18 KB: 100,000 files stay near 100 MiB).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SegmentationStorage,
)

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
