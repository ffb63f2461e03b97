"""Hostile files at a site (issue 13, item 3): each is refused or neutralised with a named reason in
the load report, the scan goes on, the honest series next to it still loads, and memory stays
bounded. Every file here is a real DICOM/NIfTI file written with pydicom, highdicom or nibabel."""

import copy
import csv
import gc
import logging
import tracemalloc
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

import client.predict as predict
import common.dicom_io as dicom_io
from common.config import run_config
from common.dicom_bounds import Header, read_header
from common.dicom_io import LoadReport, image_series, load_site_series, voxel_to_patient
from common.model import GlobalModel, build_model, load_global_model
from simulations.scan_bench import SLICES, scan_in_child, write_deflate_bomb, write_hostile_site, write_honest_site, write_rle_claiming
from tests.conftest import CLASSES
from tests.dicom_factory import blob_volume, rewrite, write_float_pixels, write_seg, write_series

LABELS = ["Organ", "Lesion"]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MEMORY_BOUND_MIB = 64  # peak RSS growth of a scan of the bench's hostile folder, after a warm-up load
HEADER_BOUND_BYTES = 2048  # what the scan keeps per file (a parsed pydicom header took about 18 KB)


def _labelled(folder: Path, patient: str, seed: int = 0) -> tuple[np.ndarray, list]:
    """A series and its SEG, written under `folder`."""
    image, mask = blob_volume(seed=seed)
    datasets = write_series(folder / patient, image, patient=patient, seed=seed)
    write_seg(folder / f"{patient}-seg.dcm", datasets, mask, LABELS)
    return image, datasets


def _stranger(datasets: list) -> list:
    """Copies of a series' slices as another series (so a hostile file never joins an honest series)."""
    series_uid = generate_uid()
    copies = [copy.deepcopy(ds) for ds in datasets]
    for ds in copies:
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return copies


def _load(site: Path) -> tuple[dict, LoadReport]:
    labelled, report = load_site_series(site, CLASSES)
    return {ls.series.patient_id: ls for ls in labelled}, report


def _reason(report: LoadReport, fragment: str) -> str:
    hits = [s["reason"] for s in report.skipped if fragment in s["path"]]
    assert len(hits) == 1, (fragment, report.format())
    return hits[0]


def _honest_loads(used: dict, image: np.ndarray) -> None:
    assert "honest" in used, used
    np.testing.assert_allclose(used["honest"].series.volume, image, atol=0.5)


def _untrained_model(path: Path) -> GlobalModel:
    """A checkpoint `fedseg predict` accepts: untrained weights, enough to run the prediction path."""
    torch.manual_seed(0)
    torch.save({"state_dict": build_model(3).state_dict(), "round": 0, "config": run_config({"image-size": 32})}, path)
    return load_global_model(path)


def test_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    site = tmp_path / "site"
    image, datasets = _labelled(site, "honest")
    write_deflate_bomb(site / "bomb.dcm", _stranger(datasets)[0], inflated_mib=1536)
    assert (site / "bomb.dcm").stat().st_size < 2 * 2**20  # 1.5 MiB on disk, 1.5 GiB inflated

    used, report = _load(site)

    _honest_loads(used, image)
    assert _reason(report, "bomb.dcm").startswith("deflated transfer syntax refused")


@pytest.mark.parametrize("rows,columns,reason", [
    (16000, 16000, "pixel data too large: rows x columns x frames x samples = 16000 x 16000 x 1 x 1"),
    (65535, 65535, "pixel data too large: rows x columns x frames x samples = 65535 x 65535 x 1 x 1"),
    (2048, 2048, "compression ratio too high"),  # within the pixel bound, but 8 MiB claimed from ~1 KB
])
def test_a_tiny_file_claiming_huge_dimensions_is_refused_before_decoding(tmp_path, monkeypatch, rows, columns, reason):
    site = tmp_path / "site"
    image, datasets = _labelled(site, "honest")
    claim = _stranger(datasets)
    write_rle_claiming(site / "claim" / "1.dcm", claim[0], rows, columns)
    write_seg(site / "claim-seg.dcm", claim, blob_volume()[1], LABELS)  # labelled, so a decode would be tried
    assert (site / "claim" / "1.dcm").stat().st_size < 2048
    decoded = []
    monkeypatch.setattr(dicom_io, "read_pixels", lambda path, real=dicom_io.read_pixels: decoded.append(Path(path)) or real(path))

    used, report = _load(site)

    _honest_loads(used, image)
    assert _reason(report, "claim/1.dcm").startswith(reason)
    assert site / "claim" / "1.dcm" not in decoded


@pytest.mark.parametrize("attributes,reason", [
    ({"RescaleSlope": float("nan")}, "non-finite value: RescaleSlope is nan"),
    ({"RescaleIntercept": float("inf")}, "non-finite value: RescaleIntercept is inf"),
    ({"ImagePositionPatient": [0.0, float("nan"), 0.0]}, "non-finite value: ImagePositionPatient is [0.0, nan, 0.0]"),
])
def test_non_finite_header_values_are_refused(tmp_path, attributes, reason):
    site = tmp_path / "site"
    image, _ = _labelled(site, "honest")
    _labelled(site, "nan", seed=1)
    for path in (site / "nan").iterdir():
        rewrite(path, **attributes)

    used, report = _load(site)

    _honest_loads(used, image)
    assert set(used) == {"honest"}
    for path in (site / "nan").iterdir():
        assert _reason(report, f"nan/{path.name}") == reason
    assert "not in the folder or not usable" in _reason(report, "nan-seg.dcm")


@pytest.mark.parametrize("poison", ["float NaN pixels", "slope overflowing float32"])
def test_non_finite_pixel_values_refuse_their_series(tmp_path, poison):
    site = tmp_path / "site"
    image, _ = _labelled(site, "honest")
    _, poisoned = _labelled(site, "poisoned", seed=1)
    one = sorted((site / "poisoned").iterdir())[2]
    if poison == "float NaN pixels":
        values = np.full(image.shape[1:], 100.0)
        values[3, 4] = np.nan
        write_float_pixels(one, values)
    else:
        rewrite(one, RescaleSlope=1e38)  # finite itself, but stored values of 50 and more give inf

    used, report = _load(site)

    _honest_loads(used, image)
    assert set(used) == {"honest"}
    assert f"{one.name}: non-finite pixel values" in _reason(report, f"series {poisoned[0].SeriesInstanceUID}")
    assert all(np.isfinite(ls.series.volume).all() for ls in used.values())


@pytest.mark.parametrize("foreign", [("PatientID",), ("StudyInstanceUID",), ("FrameOfReferenceUID",),
                                     ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID")])
def test_a_seg_of_another_patient_study_or_frame_is_not_a_label(tmp_path, monkeypatch, foreign):
    site = tmp_path / "site"
    image, _ = _labelled(site, "honest")
    target, mask = blob_volume(seed=2)
    datasets = write_series(site / "target", target, patient="target", seed=2)
    intruder = [copy.deepcopy(ds) for ds in datasets]  # the target's SOP and series UIDs, another identity
    values = {"PatientID": "intruder", "StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
    for ds in intruder:
        for keyword in foreign:
            setattr(ds, keyword, values[keyword])
    write_seg(site / "foreign-seg.dcm", intruder, mask, LABELS)
    decoded = []
    monkeypatch.setattr(dicom_io, "read_pixels", lambda path, real=dicom_io.read_pixels: decoded.append(Path(path)) or real(path))

    used, report = _load(site)

    _honest_loads(used, image)
    assert set(used) == {"honest"}
    reason = _reason(report, "foreign-seg.dcm")
    assert reason.startswith(f"foreign DICOM-SEG: its {', '.join(foreign)} differ") and "intruder" not in reason
    assert "no label" in _reason(report, "patient target")
    assert not [p for p in decoded if p.parent == site / "target"]  # an unlabelled series: its pixels are not read


def test_unlabelled_series_are_not_decoded_by_training_but_are_for_prediction(tmp_path, monkeypatch):
    site = tmp_path / "site"
    image, _ = _labelled(site, "honest")
    unlabelled = write_series(site / "unlabelled", blob_volume(seed=3)[0], patient="unlabelled", seed=3)
    decoded = []
    monkeypatch.setattr(dicom_io, "read_pixels", lambda path, real=dicom_io.read_pixels: decoded.append(Path(path)) or real(path))

    used, report = _load(site)

    _honest_loads(used, image)
    assert "no label" in _reason(report, "patient unlabelled")
    assert {p.parent for p in decoded} == {site / "honest"}
    results, _ = predict.predict_folder(_untrained_model(tmp_path / "model.pt"), site, tmp_path / "out", torch.device("cpu"),
                                        png=False)  # `fedseg predict` segments every series
    assert unlabelled[0].SeriesInstanceUID in {r.series_uid for r in results}
    assert {p.parent for p in decoded} == {site / "honest", site / "unlabelled"}


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID", "FrameOfReferenceUID"])
def test_a_file_planted_in_a_series_with_another_identity_refuses_the_series(tmp_path, monkeypatch, keyword):
    site = tmp_path / "site"
    image, _ = _labelled(site, "honest")
    _, target = _labelled(site, "target", seed=1)  # labelled: training would decode it
    planted = copy.deepcopy(target[-1])  # one slice more at the end of the series, from another patient or scan
    planted.SOPInstanceUID = planted.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    step = np.subtract(target[-1].ImagePositionPatient, target[-2].ImagePositionPatient)
    planted.ImagePositionPatient = list(np.add(target[-1].ImagePositionPatient, step))
    foreign = {"PatientID": "intruder", "StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}[keyword]
    setattr(planted, keyword, foreign)
    planted.save_as(site / "target" / "planted.dcm", enforce_file_format=False)
    decoded = []
    monkeypatch.setattr(dicom_io, "read_pixels", lambda path, real=dicom_io.read_pixels: decoded.append(Path(path)) or real(path))

    used, report = _load(site)

    _honest_loads(used, image)
    assert set(used) == {"honest"}
    reason = _reason(report, f"series {target[0].SeriesInstanceUID}")
    assert reason.startswith(f"its files disagree on {keyword}: one series is one patient's") and foreign not in reason
    assert "not in the folder or not usable" in _reason(report, "target-seg.dcm")
    assert not [p for p in decoded if p.parent == site / "target"]  # refused before any of its pixels is read
    predicted = image_series(site, LoadReport(str(site)))  # nor is it predicted
    assert [files[0][1].patient_id for files in predicted] == ["honest"]


def _nifti_for(series_folder: Path, mask: np.ndarray, path: Path) -> None:
    files = [(p, read_header(p)) for p in sorted(series_folder.iterdir())]
    series = dicom_io.read_series(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, LPS_TO_RAS @ voxel_to_patient(series)), path)


def test_masks_csv_paths_stay_inside_the_site_folder(tmp_path):
    site, store = tmp_path / "site", tmp_path / "store"
    image, mask = blob_volume()
    honest = write_series(site / "honest", image, patient="honest")
    target = write_series(site / "target", blob_volume(seed=4)[0], patient="target", seed=4)
    _nifti_for(site / "target", mask, tmp_path / "outside" / "mask.nii.gz")  # a real mask, outside the site
    _nifti_for(site / "honest", mask, store / "mask.nii.gz")
    (site / "linked").symlink_to(store, target_is_directory=True)  # a folder linked in: inside, as written
    with open(site / "masks.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["series_instance_uid", "mask"],
                                  [target[0].SeriesInstanceUID, "../outside/mask.nii.gz"],
                                  [target[0].SeriesInstanceUID, str(tmp_path / "outside" / "mask.nii.gz")],
                                  [target[0].SeriesInstanceUID, "linked/..\\..\\outside/mask.nii.gz"],
                                  [honest[0].SeriesInstanceUID, "linked/mask.nii.gz"]])

    used, report = _load(site)

    assert set(used) == {"honest"} and used["honest"].label_source == "NIfTI mask.nii.gz"
    np.testing.assert_array_equal(used["honest"].mask, mask)
    for line in (2, 3, 4):
        assert _reason(report, f"masks.csv line {line}").startswith("mask path outside the site folder")
    assert "no label" in _reason(report, "patient target")


def test_symlinked_patient_folders_are_followed_once_and_reported_where_they_live(tmp_path):
    site, store = tmp_path / "site", tmp_path / "pacs-mount"
    image, _ = _labelled(store / "P1", "honest")
    _labelled(store / "P2", "second", seed=5)
    site.mkdir()
    (site / "P1").symlink_to(store / "P1", target_is_directory=True)
    (site / "P2").symlink_to(store / "P2", target_is_directory=True)
    (site / "again").symlink_to(store / "P1", target_is_directory=True)  # a second link to the same patient
    (store / "P1" / "loop").symlink_to(site, target_is_directory=True)  # back into the site: a loop
    (site / "up").symlink_to(tmp_path, target_is_directory=True)  # to a folder holding the site
    (site / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")

    used, report = _load(site)

    _honest_loads(used, image)
    assert set(used) == {"honest", "second"}
    where = {u["patient_id"]: u["location"] for u in report.used}
    assert where == {"honest": str((store / "P1" / "honest").resolve()), "second": str((store / "P2" / "second").resolve())}
    assert f"in {(store / 'P1' / 'honest').resolve()}" in report.format()
    assert _reason(report, "P1/loop").startswith("symbolic link loop")
    assert _reason(report, "site/up").startswith("symbolic link loop")
    assert _reason(report, "site/again").startswith("symbolic link loop or second link")
    assert _reason(report, "gone.dcm") == "broken symbolic link"


def test_scanning_the_hostile_files_stays_within_the_memory_bound(tmp_path):
    write_honest_site(tmp_path / "warm-up", SLICES + 1)  # one labelled series
    write_hostile_site(tmp_path / "site", tmp_path / "pacs-mount")

    result = scan_in_child(tmp_path / "warm-up", tmp_path / "site")

    assert result["labelled_series_used"] == 1 and "deflated transfer syntax refused" in result["reasons"], result
    assert result["peak_rss_mib"] - result["rss_before_mib"] < MEMORY_BOUND_MIB, result


def test_the_scan_keeps_a_few_plain_values_per_file_not_the_parsed_header(tmp_path):
    site = tmp_path / "site"
    for k in range(4):
        _labelled(site, f"P{k}", seed=k)
    dicom_io._scan_headers(site, LoadReport(str(site)))  # warm-up: imports, decoders, interned strings
    gc.collect()
    tracemalloc.start()
    try:
        scan = dicom_io._scan_headers(site, LoadReport(str(site)))
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    files = [*(f for series in scan.images.values() for f in series), *scan.segs]
    assert len(files) == 4 * (len(blob_volume()[0]) + 1) and all(isinstance(h, Header) for _, h in files)
    assert kept / len(files) < HEADER_BOUND_BYTES, f"{kept / len(files):.0f} bytes kept per file"


def test_prediction_holds_one_decoded_series_at_a_time(tmp_path, monkeypatch, caplog):
    source = tmp_path / "src"
    for k in range(3):
        write_series(source / f"P{k}", blob_volume(seed=k)[0], patient=f"P{k}", seed=k)
    model = _untrained_model(tmp_path / "model.pt")
    alive = []

    def decode(files, report, real=predict.decode_series):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))  # decoded series still held when the next is decoded
        series = real(files, report)
        refs.append(weakref.ref(series))
        return series

    refs = []
    monkeypatch.setattr(predict, "decode_series", decode)
    caplog.set_level(logging.INFO, logger=predict.__name__)
    results, report = predict.predict_folder(model, source, tmp_path / "out", torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if r.name == predict.__name__]

    assert alive == [0, 0, 0] and not report.skipped
    assert [r.patient_id for r in results] == ["P0", "P1", "P2"] and all(r.seg.is_file() for r in results)
    assert [line.split(" patient ")[0] for line in lines] == ["[1/3]", "[2/3]", "[3/3]"]
