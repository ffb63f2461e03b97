"""DICOM on disk -> image series and label masks, with a report of everything used or skipped.

A site folder is walked by `site_files` and each file's header read within bounds by `read_header`
(common/dicom_bounds.py); here the files become series. They are grouped by SeriesInstanceUID and
ordered along the slice normal (file names and InstanceNumber are not trusted), and a series whose
files disagree on the patient, study or frame of reference is refused: a file planted with another
patient's identity never joins a series. Labels are DICOM-SEG objects matched to their series through
their references (and the patient, study and frame of reference they share), or NIfTI masks listed
in a `masks.csv` manifest (columns `series_instance_uid,mask`, paths relative to it, inside the site).

Every file or series that cannot be used is named in the load report with the reason, and the rest
still loads. Pixels are decoded only for the series a caller uses, one file and one object at a time
(MAX_IMAGE_PIXELS, MAX_SEG_PIXELS); prediction decodes one series at a time (`image_series`, then
`decode_series`), training only the labelled ones (`load_site_series`).
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import highdicom as hd
import nibabel as nib
import numpy as np
from pydicom.pixels import apply_modality_lut, get_decoder

from common.class_codes import Pair, describe, pair_of
from common.dicom_bounds import (
    MAX_IMAGE_PIXELS,
    MAX_SEG_PIXELS,
    Header,
    RefusedFile,
    check_finite,
    check_pixel_claims,
    read_dicom,
    read_header,
)
from common.site_files import site_files

MASK_MANIFEST = "masks.csv"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient space (LPS) -> NIfTI world space (RAS)
IDENTITY = {"PatientID": "patient_id", "StudyInstanceUID": "study_uid", "FrameOfReferenceUID": "frame_uid"}  # keyword: Header field
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
    paths: list[Path] = field(default_factory=list)  # the slice files, in slice order
    notes: list[str] = field(default_factory=list)


@dataclass
class LabelledSeries:
    series: Series
    mask: np.ndarray  # [slices, rows, cols] class indices, uint8
    label_source: str
    codes: dict[str, set[Pair]] = field(default_factory=dict)  # class name → its segments' codings (a SEG's; NIfTI has none)


@dataclass
class LoadReport:
    """What a site's folder gave: the series used and every file or series skipped, with why."""

    folder: str
    used: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    class_codes: dict[str, Counter[Pair]] = field(default_factory=dict)  # class name → how many used SEGs code it so (any segment)

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
        for name, counts in self.class_codes.items():
            lines += [f"  coded    {name}: {describe(pair)} in {n} DICOM-SEG(s)" for pair, n in counts.most_common()]
        return "\n".join(lines)


@dataclass
class _Scan:
    """A site folder's headers: image files by series, SEG files, and mask manifests."""

    images: dict[str, SeriesFiles] = field(default_factory=lambda: defaultdict(list))
    segs: list[tuple[Path, Header]] = field(default_factory=list)
    manifests: list[Path] = field(default_factory=list)


def _problem(err: Exception) -> str:
    """An exception as one short report line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _scan_headers(folder: Path, report: LoadReport) -> _Scan:
    """Read every file's header once (a few tags, bounded) and keep its `Header`; split images (by
    series) from SEGs and mask manifests, and name everything else. A series whose files disagree on
    IDENTITY is refused here, before a label is matched to it. No pixel data is read here."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    scan = _Scan()
    for path in site_files(folder, report):
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
    for uid, files in list(scan.images.items()):
        differ = _identity_differences(files[0][1], [h for _, h in files[1:]])
        if differ:
            del scan.images[uid]
            report.skip(_series_label(files), f"its files disagree on {', '.join(differ)}: one series is one patient's, in one "
                                              "study and frame of reference (a file of another patient or scan planted in it?); not used")
    return scan


def _identity_differences(reference: Header, others: Sequence[Header]) -> list[str]:
    """The IDENTITY attributes on which any of `others` differs from `reference`: names only, the
    values identify patients and may not be logged."""
    return [keyword for keyword, name in IDENTITY.items() if any(getattr(h, name) != getattr(reference, name) for h in others)]


def order_slices(headers: Sequence[Header]) -> tuple[np.ndarray, np.ndarray]:
    """Slice order along the normal of the image plane (row x column direction), and the positions along it."""
    orientation = np.asarray(headers[0].orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.dot(np.asarray(h.position, dtype=float), normal) for h in headers])
    order = np.argsort(positions, kind="stable")
    return order, positions[order]


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
    order, positions = order_slices(headers)
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
        paths=[files[i][0] for i in order],
        notes=notes,
    )


def _segment_classes(seg: hd.seg.Segmentation, class_names: Sequence[str], by_number: bool) -> tuple[dict[int, int], str]:
    """Map SEG segment numbers to our class indices by label name; with `by_number` (a site where no
    SEG's labels name a class), a SEG whose labels match none is taken by segment number."""
    lookup = {name.lower(): i for i, name in enumerate(class_names) if i > 0}
    by_name = {}
    numbers = list(seg.segment_numbers)
    for n in numbers:
        label = str(seg.get_segment_description(n).segment_label).strip().lower()
        if label in lookup:
            by_name[n] = lookup[label]
    if by_name or not by_number:
        return by_name, "by segment label"
    return {n: n for n in numbers if 0 < n < len(class_names)}, "by segment number (no label at the site matched the classes)"


def read_seg_mask(seg_path: Path, series: Series, class_names: Sequence[str],
                  by_number: bool = False) -> tuple[np.ndarray, str, dict[str, set[Pair]]]:
    """The SEG's segments as one class-index volume aligned slice by slice with `series`, and the
    codings (segmented property category and type) of the segments each class was read from: all of
    them, so a second segment of a class cannot hide its code."""
    ds = read_dicom(seg_path)
    check_pixel_claims(ds, Path(seg_path).stat().st_size, MAX_SEG_PIXELS)
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    mapping, how = _segment_classes(seg, class_names, by_number)
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
    codes: dict[str, set[Pair]] = {}
    for n in numbers:
        codes.setdefault(class_names[mapping[n]], set()).add(pair_of(seg.get_segment_description(n)))
    return mask, f"DICOM-SEG {Path(seg_path).name} ({how})", codes


def voxel_to_patient(series: Series) -> np.ndarray:
    """4x4 affine from (slice, row, col) indices to patient LPS millimetres (DICOM's equation
    C.7.6.2.1-1, by highdicom). Slices run along row x column direction, as `order_slices` sorts them:
    with rows going down (D) and columns right (R), highdicom calls that index system left-handed."""
    return hd.spatial.create_affine_matrix_from_attributes(
        series.origin, series.orientation, series.spacing[1:], series.spacing[0],
        index_convention="DR", slices_first=True, handedness="LEFT_HANDED")


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


def _series_label(files: SeriesFiles) -> str:
    """A series as the report names it: its UID, file count and where its files live."""
    return f"series {files[0][1].series_uid} ({len(files)} files in {_location([p for p, _ in files])})"


def decode_series(files: SeriesFiles, report: LoadReport) -> Series | None:
    """One scanned series with its pixels, or None when it cannot be used (named in the report)."""
    try:
        return read_series(files)
    except Exception as err:
        report.skip(_series_label(files), str(err) if isinstance(err, ValueError) else _problem(err))
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
        differ = _identity_differences(scan.images[ref_uid][0][1], [seg])  # the series' files agree: the first speaks for all
        if differ:
            report.skip(path, f"foreign DICOM-SEG: its {', '.join(differ)} differ from the series it references "
                              "(another patient's or study's label); not used")
        else:
            candidates[ref_uid].append(path)
    return candidates


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
    """Each series' first SEG that aligns with it and is not empty; the others are named. Segments
    are matched to classes by label; only at a site where no SEG's labels name a class are they taken
    by segment number. Per SEG, that guess would read another structure (an organ segment where only
    the lesion is asked for) as one of ours."""
    for by_number in (False, True):
        attempt = LoadReport(folder=report.folder)
        labelled = _read_segs(candidates, series_by_uid, class_names, attempt, by_number)
        if labelled:
            break
    report.skipped.extend(attempt.skipped)
    return labelled


def _read_segs(candidates: dict[str, list[Path]], series_by_uid: dict[str, Series], class_names: Sequence[str],
               report: LoadReport, by_number: bool) -> dict[str, LabelledSeries]:
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
                mask, source, codes = read_seg_mask(path, series_by_uid[uid], class_names, by_number)
            except Exception as err:
                report.skip(path, f"DICOM-SEG could not be aligned with its series: {_problem(err)}")
                continue
            if mask.any():
                labelled[uid] = LabelledSeries(series_by_uid[uid], mask, source, codes)
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
        for name, pairs in ls.codes.items():
            report.class_codes.setdefault(name, Counter()).update(pairs)
        report.used.append({"patient_id": ls.series.patient_id, "series_uid": ls.series.uid, "slices": int(ls.series.volume.shape[0]),
                            "label_source": ls.label_source, "location": _location(ls.series.paths), "notes": ls.series.notes})
    if not result:
        raise ValueError(f"site folder {folder} has no usable labelled series.\n{report.format()}")
    return result, report
