"""Clinical interoperability with real tools: `fedseg predict` output checked by dciodvfy (Debian's
dicom3tools) and read back; a real Orthanc with its DICOMweb plugin on loopback as the hospital PACS:
upload a study, pull it, train a site on it, predict, store the SEG, find it in Orthanc. The commands
that start no daemon run in this process (no interpreter start-up); the simulation runs as its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from common.config import run_config
from common.dataset import Preprocessing
from common.dicom_io import LoadReport, decode_series, image_series, read_nifti_mask, read_seg_mask
from common.dicomweb import push
from common.inference import segment_series
from common.model import build_model, load_global_model
from common.processes import free_port
from tests.conftest import CLASSES

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.slow  # real processes: not in the fast lane
FEDSEG = [sys.executable, "-m", "common.cli"]


def _tool(name: str) -> str:
    """A Debian tool the README's setup installs; CI must have it, a developer's machine may not."""
    found = shutil.which(name)
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run installs orthanc, orthanc-dicomweb and dicom3tools")
        pytest.skip(f"{name} not installed (apt-get install orthanc orthanc-dicomweb dicom3tools)")
    return found


def _succeeded(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _fedseg(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return _succeeded(subprocess.run([*FEDSEG, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": str(REPO), "FEDSEG_CACHE": str(cwd / "cache")}))


def _checkpoint(path: Path, seed: int = 3) -> Path:
    """Untrained weights whose masks hold all three classes: enough to test geometry and encoding."""
    torch.manual_seed(seed)
    torch.save({"state_dict": build_model(3).state_dict(), "round": 0, "config": run_config({"image-size": 32})}, path)
    return path


def test_predicted_seg_passes_dciodvfy_references_its_series_and_reads_back_as_the_same_mask(tmp_path, tiny_site, fedseg_here):
    dciodvfy = _tool("dciodvfy")
    model = _checkpoint(tmp_path / "global_model.pt")
    patient = next(p for p in sorted(tiny_site.iterdir()) if p.is_dir())
    run = _succeeded(fedseg_here("predict", str(model), str(patient), "--out", str(tmp_path / "out"), "--nifti", cwd=tmp_path))
    assert "[1/1]" in run.stdout and "1 series segmented" in run.stdout

    loaded = LoadReport(str(patient))
    [files] = image_series(patient, loaded)  # as `fedseg predict` reads it
    series = decode_series(files, loaded)
    global_model = load_global_model(model)
    expected = segment_series(global_model.model, series, Preprocessing.from_config(global_model.config), torch.device("cpu"))
    assert {1, 2} <= set(np.unique(expected))  # the check below compares real segments, not empty ones
    seg_path = next((tmp_path / "out").rglob("*.seg.dcm"))
    check = subprocess.run([dciodvfy, str(seg_path)], capture_output=True, text=True, timeout=120)
    report = check.stdout + check.stderr
    assert "Segmentation" in report and not [line for line in report.splitlines() if line.startswith("Error")], report

    mask, _, _ = read_seg_mask(seg_path, series, CLASSES)
    np.testing.assert_array_equal(mask, expected)  # SEG -> same mask, slice by slice
    np.testing.assert_array_equal(read_nifti_mask(next((tmp_path / "out").rglob("*.nii.gz")), series), expected)
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    assert {str(s.SegmentLabel) for s in seg.SegmentSequence} == {"organ", "lesion"}
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert global_model.sha256[:16] in algorithm.AlgorithmVersion and algorithm.AlgorithmName == "fedseg U-Net"
    assert seg.PatientID == series.patient_id and seg.StudyInstanceUID == pydicom.dcmread(series.paths[0]).StudyInstanceUID
    png = next((tmp_path / "out").rglob("*.png")).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc with the DICOMweb plugin, on a free loopback port, stopped at the end."""
    binary = _tool("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not plugin.is_file():
        pytest.fail(f"{plugin} missing: install orthanc-dicomweb")
    port = free_port()
    config = tmp_path / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "fedseg-test-pacs", "StorageDirectory": str(tmp_path / "orthanc-db"), "IndexDirectory": str(tmp_path / "orthanc-db"),
        "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }))
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/dicom-web"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/studies", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "orthanc.log").read_text()[-2000:]
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_orthanc_round_trip_train_from_pacs_predict_and_store_the_seg(tmp_path, tiny_site, orthanc, fedseg_here):
    # The hospital's PACS holds a simulated site: images and their expert SEGs.
    files = [p for p in tiny_site.rglob("*") if p.is_file() and p.suffix in ("", ".dcm")]
    assert push(orthanc, files) == len(files)

    # The site pulls its training data from the PACS and trains (one site, one round).
    _succeeded(fedseg_here("pull", orthanc, str(tmp_path / "hospitals" / "from-pacs"), "--all", cwd=tmp_path))
    again = _succeeded(fedseg_here("pull", orthanc, str(tmp_path / "hospitals" / "from-pacs"), "--all", cwd=tmp_path))
    assert f"0 instances fetched, {len(files)} already" in again.stdout  # the cache is used, nothing fetched twice
    _fedseg("simulate", "--data-root", str(tmp_path / "hospitals"), "--rounds", "1", "--local-epochs", "1", "--image-size", "32", "--spacing", "8",
            "--batch-size", "8", "--epsilon", "30", "--out", str(tmp_path / "run"), cwd=tmp_path, timeout=600)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["rounds"][1]["sites"]["from-pacs"]["examples"] > 0

    # Predict one study straight from the PACS and store the SEG back.
    first = pydicom.dcmread(next(p for p in files if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"))
    run = _succeeded(fedseg_here("predict", str(tmp_path / "run"), orthanc, "--study", first.StudyInstanceUID,
                                 "--out", str(tmp_path / "pred"), "--store", orthanc, cwd=tmp_path))
    assert "stored 1 DICOM-SEG" in run.stdout

    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(orthanc)
    segs = [pydicom.Dataset.from_json(s) for s in client.search_for_series(
        search_filters={"StudyInstanceUID": first.StudyInstanceUID, "Modality": "SEG"})]
    ours = [s for s in segs if s.SeriesInstanceUID != _expert_seg_series(files, first.StudyInstanceUID)]
    assert len(ours) == 1, [s.SeriesInstanceUID for s in segs]
    stored = client.retrieve_series(first.StudyInstanceUID, ours[0].SeriesInstanceUID)[0]
    local = pydicom.dcmread(next((tmp_path / "pred").rglob("*.seg.dcm")))
    assert stored.SOPInstanceUID == local.SOPInstanceUID and stored.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    np.testing.assert_array_equal(stored.pixel_array, local.pixel_array)


def _expert_seg_series(files: list[Path], study: str) -> str:
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Modality == "SEG" and ds.StudyInstanceUID == study:
            return str(ds.SeriesInstanceUID)
    return ""
