"""`fedseg predict`: a global model applied to a hospital's series, written as DICOM-SEG a viewer and a
PACS take (referencing the source series, with the algorithm and exact checkpoint named), plus
optional NIfTI and a PNG quick look. Runs at the site: images never leave it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import torch
from pydicom.sr.codedict import codes

from common.config import class_names
from common.dataset import Preprocessing, PreprocessingError, normalise
from common.dicom_bounds import read_dicom
from common.dicom_io import LPS_TO_RAS, LoadReport, Series, decode_series, image_series, voxel_to_patient
from common.inference import segment_series
from common.model import GlobalModel
from common.overlays import draw_overlays, most_labelled_slices
from common.safe_paths import UnsafePath, path_under, safe_name
from common.seg_writer import write_seg

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """What was written for one series: names and files only, not its pixels or mask, so that a
    folder of any size is predicted in the memory of one series."""

    patient_id: str
    series_uid: str
    slices: int
    seg: Path
    nifti: Path | None
    png: Path | None


def algorithm(global_model: GlobalModel) -> hd.AlgorithmIdentificationSequence:
    """Who made the mask: fedseg's version, the round and the checkpoint's SHA-256 (in the SEG)."""
    try:
        software = version("fedseg")
    except PackageNotFoundError:
        software = "unknown"
    return hd.AlgorithmIdentificationSequence(
        name="fedseg U-Net", family=codes.cid7162.ArtificialIntelligence,
        version=f"fedseg {software}, round {global_model.round}, sha256 {global_model.sha256[:16]}",
        source="federated, differentially private training (Flower, Opacus)",
        parameters={"checkpoint_sha256": global_model.sha256, "image_size": str(global_model.config["image-size"]),
                    "spacing_mm": str(Preprocessing.from_config(global_model.config).spacing)})


def write_nifti(series: Series, mask: np.ndarray, path: Path) -> Path:
    """Class indices in the series' own grid; the affine maps (slice, row, col) to RAS millimetres."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), LPS_TO_RAS @ voxel_to_patient(series)), str(path))
    return path


def write_quick_look(series: Series, mask: np.ndarray, names: list[str], path: Path, preprocessing: Preprocessing,
                     slices: int = 8) -> Path:
    image = normalise(series.volume, series.modality, preprocessing)  # as the model saw it
    panels = [(image[k], mask[k], f"slice {k + 1}/{len(mask)}") for k in most_labelled_slices(mask, slices)]
    return draw_overlays(panels, names, path, f"patient {series.patient_id} - {series.modality} series ...{series.uid[-12:]}")


def output_stem(out: Path, series: Series) -> Path:
    """OUT/<patient>/<series uid>, both cleaned: IDs and UIDs come from the files and may hold '/' or '..'."""
    return path_under(out, safe_name(series.patient_id or "unknown"), safe_name(series.uid))


def predict_series(global_model: GlobalModel, series: Series, stem: Path, device: torch.device,
                   nifti: bool, png: bool) -> tuple[Prediction, str]:
    """Segment one series and write its SEG (referencing the series' own files, read again in full)
    and the optional NIfTI and PNG at `stem`; also the classes' pixel counts, for the log line."""
    names = class_names(global_model.config)
    preprocessing = Preprocessing.from_config(global_model.config)  # as the model was trained
    mask = segment_series(global_model.model, series, preprocessing, device)
    seg = stem.with_name(f"{stem.name}.seg.dcm")
    write_seg([read_dicom(p) for p in series.paths], mask, names, seg, algorithm=algorithm(global_model), codings=global_model.class_codes)
    prediction = Prediction(series.patient_id, series.uid, len(mask), seg,
                            write_nifti(series, mask, stem.with_name(f"{stem.name}.nii.gz")) if nifti else None,
                            write_quick_look(series, mask, names, stem.with_name(f"{stem.name}.png"), preprocessing) if png else None)
    return prediction, ", ".join(f"{names[c]} {int((mask == c).sum())} px" for c in range(1, len(names)))


def predict_folder(global_model: GlobalModel, source: Path, out: Path, device: torch.device,
                   nifti: bool = False, png: bool = True) -> tuple[list[Prediction], LoadReport]:
    """Segment every image series under `source` (one study or a folder of studies), one series at a
    time: decoded, segmented, written, then dropped, so memory holds one series whatever the folder.
    Each series written is logged as [k/n], the k-th of the n series the header scan found (one that
    cannot be decoded is named in the report, and has no line)."""
    report = LoadReport(folder=str(source))
    found = image_series(source, report)
    results = []
    decoded = 0
    started = time.time()
    for done, files in enumerate(found, start=1):
        series = decode_series(files, report)
        if series is None:
            continue
        decoded += 1
        try:
            stem = output_stem(out, series)
        except UnsafePath as err:
            report.skip(f"a series of {len(series.paths)} files under {series.paths[0].parent}", str(err))
        else:
            try:
                prediction, share = predict_series(global_model, series, stem, device, nifti, png)
            except PreprocessingError as err:  # the checkpoint's spacing would blow this series up (`check_growth`)
                report.skip(f"series {series.uid}", str(err))
            else:
                results.append(prediction)
                log.info("[%d/%d] patient %s: %d slices -> %s (%s); %.1f s so far", done, len(found), series.patient_id,
                         prediction.slices, prediction.seg, share, time.time() - started)
        del series  # before the next series is decoded: one series in memory, never two
    if not decoded:
        raise ValueError(f"no usable image series under {source}\n{report.format()}")
    return results, report
