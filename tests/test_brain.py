"""The real-scan federation: MNI152 grey/white matter written as MR DICOM + DICOM-SEG per site,
loadable by a site like any hospital export, with the tissues where the template has them."""

import json

import numpy as np

from common.config import run_config
from common.dataset import Preprocessing, load_site
from simulations.brain import CLASS_NAMES, build_brain_federation


def test_brain_sites_load_as_labelled_mr_series_with_both_tissues(tmp_path):
    root = build_brain_federation(tmp_path, num_sites=1, seed=0, size="tiny")
    meta = json.loads((root / "federation.json").read_text())
    assert meta["classes"] == ["grey-matter", "white-matter"] and [s["site"] for s in meta["sites"]] == ["brain-01"]
    site = load_site(str(root / "brain-01"), CLASS_NAMES, Preprocessing.from_config(run_config({"image-size": 32})), 0.25)
    assert not site.report.skipped and len(site.report.used) == 3  # every patient's series, with its SEG
    labels = np.concatenate([m.ravel() for p in site.train for m in p.masks])
    fractions = [(labels == c).mean() for c in (1, 2)]
    assert all(0.05 < f < 0.6 for f in fractions)  # both tissues present, neither fills the head
    assert {name: set(c) for name, c in site.report.class_codes.items()} == {  # what the tissues are, in SNOMED CT
        "grey-matter": {("SCT", "85756007", "SCT", "389081007")}, "white-matter": {("SCT", "85756007", "SCT", "389080008")}}
    assert build_brain_federation(tmp_path, num_sites=1, seed=0, size="tiny") == root  # generated once, then cached
