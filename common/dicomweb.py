"""PACS in and out over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) with dicomweb-client.

Pulled images land in a folder at the site (its PACS cache) and go through the normal site loader;
nothing pulled ever leaves the site. Already-cached instances are not fetched again."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from dicomweb_client.api import DICOMwebClient


def is_dicomweb(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _client(url: str) -> DICOMwebClient:
    return DICOMwebClient(url=url.rstrip("/"))


def _safe(uid: str) -> str:
    return re.sub(r"[^0-9.]", "_", uid)


def pull(url: str, folder: Path, study: str | None = None, progress: Callable[[str], None] = print) -> Path:
    """Every series of `study` (or of the whole server) into `folder`/<study>/<series>/<sop>.dcm."""
    client = _client(url)
    try:
        found = client.search_for_series(search_filters={"StudyInstanceUID": study} if study else None)
    except Exception as err:  # requests' connection and HTTP errors: say which server and why
        raise ConnectionError(f"DICOMweb server {url} did not answer a series search: {err}") from err
    fetched = cached = 0
    for n, item in enumerate(found, start=1):
        series = pydicom.Dataset.from_json(item)
        target = folder / _safe(series.StudyInstanceUID) / _safe(series.SeriesInstanceUID)
        have = {p.stem for p in target.glob("*.dcm")}
        expected = int(series.get("NumberOfSeriesRelatedInstances", 0) or 0)
        if expected and len(have) >= expected:
            cached += len(have)
            continue
        target.mkdir(parents=True, exist_ok=True)
        for ds in client.retrieve_series(series.StudyInstanceUID, series.SeriesInstanceUID):
            if _safe(ds.SOPInstanceUID) not in have:
                ds.save_as(target / f"{_safe(ds.SOPInstanceUID)}.dcm", enforce_file_format=True)
                fetched += 1
        progress(f"  [{n}/{len(found)}] series {series.SeriesInstanceUID} ({series.get('Modality', '?')}) from {url}")
    progress(f"{len(found)} series from {url}: {fetched} instances fetched, {cached} already in {folder}")
    return folder


def push(url: str, paths: Sequence[Path]) -> int:
    """Store DICOM files (e.g. the SEGs a prediction wrote) on the server; returns how many."""
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        _client(url).store_instances(datasets)
    except Exception as err:
        raise ConnectionError(f"DICOMweb server {url} refused to store {len(datasets)} instances: {err}") from err
    return len(datasets)
