"""What a class is, in codes: read at a site from real DICOM-SEGs (highdicom), released only as pairs
of pydicom's code dictionary, kept in the run's checkpoint, written into the SEGs a model predicts."""

import logging
from collections import Counter

import highdicom as hd
import pytest
import torch
from pydicom.sr.codedict import codes

import client.predict
from client.guard import open_guard
from client.predict import predict_folder
from client.site_state import SiteState
from common.class_codes import GENERIC, releasable, stored
from common.config import run_config
from common.dataset import SiteData
from common.dicom_io import load_site_series
from common.model import build_model, load_global_model
from common.parameters import to_arrays
from server.run_record import RunHistory, RunRecord
from tests.dicom_factory import blob_volume, write_seg, write_series

CLASSES = ("background", "liver", "bone")
LIVER = (codes.SCT.Organ, codes.SCT.Liver)
BONE = (codes.SCT.Tissue, codes.SCT.Bone)
BONE_TISSUE = (codes.SCT.Tissue, codes.SCT.BoneTissue)
# A hospital's own words: a local scheme, a long code, and free text that must never leave the site.
LOCAL = (hd.sr.CodedConcept("X1", "99WARD7", "Mrs Example's scan"), hd.sr.CodedConcept("X" * 10_000, "99WARD7", "ward 7 bone"))


def pair(coded) -> tuple[str, str, str, str]:
    """A coding as a site releases it."""
    return (coded[0].scheme_designator, coded[0].value, coded[1].scheme_designator, coded[1].value)


def _site(folder, codings_per_patient):
    """One labelled series per patient, its SEG's segments "Liver" and "Bone" coded as given."""
    for index, codings in enumerate(codings_per_patient):
        image, mask = blob_volume(seed=index)
        datasets = write_series(folder / f"P{index}", image, patient=f"P{index}", seed=index)
        write_seg(folder / f"P{index}-seg.dcm", datasets, mask, ["Liver", "Bone"], codings)
    return folder


def test_a_site_releases_per_class_the_dictionary_codes_most_of_its_segs_use(tmp_path):
    site = _site(tmp_path / "site", [[LIVER, BONE], [LIVER, BONE], [LIVER, BONE_TISSUE]])
    labelled, report = load_site_series(site, CLASSES)
    assert [ls.codes for ls in labelled] == [{"liver": pair(LIVER), "bone": pair(b)} for b in (BONE, BONE, BONE_TISSUE)]
    assert report.class_codes == {"liver": Counter({pair(LIVER): 3}), "bone": Counter({pair(BONE): 2, pair(BONE_TISSUE): 1})}
    released, unknown = releasable(report.class_codes)
    assert released == {"liver": ("SCT", "91772007", "SCT", "10200004"), "bone": ("SCT", "85756007", "SCT", "272673000")}
    assert unknown == {}
    assert "coded    bone: Tissue / Bone (SCT 85756007 / SCT 272673000) in 2 DICOM-SEG(s)" in report.format()  # the site's console


def test_a_code_the_dictionary_does_not_know_is_not_released_and_the_site_log_names_the_class(tmp_path, caplog):
    site = _site(tmp_path / "site", [[LIVER, LOCAL], [LIVER, LOCAL], [LIVER, BONE]])
    _, report = load_site_series(site, CLASSES)
    guard, _ = open_guard(SiteState(tmp_path / "state"), "north", site, {"epsilon_budget": 8.0})
    with caplog.at_level(logging.WARNING, logger="client.guard"):
        released = guard.class_codes(SiteData(str(site), [], [], report))
    assert released == {"liver": pair(LIVER)}  # bone's majority is the local code: nothing, not the minority's Bone
    assert f"class 'bone' is coded (99WARD7 X1 / 99WARD7 {'X' * 65})" in caplog.text and "not released" in caplog.text
    assert "Mrs Example" not in caplog.text and "ward 7 bone" not in caplog.text  # a file's free text is not even logged


def _checkpoint_with_codes(run_dir):
    """A run's record as the server keeps it after two sites released their codes, and its checkpoint."""
    config = run_config({"image-size": 32, "classes": "liver,bone", "run-dir": str(run_dir)})
    record = RunRecord(run_dir, config)
    record.site_codes = {"a": {"liver": pair(LIVER), "bone": pair(BONE)}, "b": {"liver": pair(LIVER)}}
    assert record.agree_on_codes() == []
    torch.manual_seed(0)
    record.save_checkpoint(1, to_arrays(build_model(3)), {})
    return record


def test_the_class_codes_survive_the_checkpoint_the_history_and_a_resume(tmp_path):
    record = _checkpoint_with_codes(tmp_path)
    expected = {"liver": {"category": ["SCT", "91772007", "Organ"], "type": ["SCT", "10200004", "Liver"]},
                "bone": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "272673000", "Bone"]}}
    assert record.class_codes == expected
    assert torch.load(tmp_path / "global_model.pt", weights_only=True)["class_codes"] == expected
    assert RunHistory.read(tmp_path).class_codes == expected
    model = load_global_model(tmp_path)
    assert model.class_codes == {"liver": LIVER, "bone": BONE}
    assert [c.meaning for c in model.class_codes["bone"]] == ["Tissue", "Bone"]
    resumed, _, _ = RunRecord.resume(tmp_path, record.config)
    assert resumed.class_codes == expected


def _predicted_segments(tmp_path, model_path, monkeypatch):
    """The segments `fedseg predict` writes with this checkpoint, as highdicom reads them back:
    label → (category, type) as (scheme, value, meaning). The mask holds both classes."""
    image, mask = blob_volume()
    write_series(tmp_path / "src" / "P1", image)
    monkeypatch.setattr(client.predict, "segment_series", lambda *args: mask)
    [result], _ = predict_folder(load_global_model(model_path), tmp_path / "src", tmp_path / "out", torch.device("cpu"), png=False)
    seg = hd.seg.segread(result.seg)
    described = [seg.get_segment_description(n) for n in seg.segment_numbers]
    return {str(d.segment_label): tuple((c.scheme_designator, c.value, c.meaning) for c in (d.segmented_property_category, d.segmented_property_type))
            for d in described}


def test_a_predicted_seg_carries_the_codes_of_the_training_segs(tmp_path, monkeypatch):
    _checkpoint_with_codes(tmp_path / "run")
    assert _predicted_segments(tmp_path, tmp_path / "run", monkeypatch) == {
        "liver": (("SCT", "91772007", "Organ"), ("SCT", "10200004", "Liver")),
        "bone": (("SCT", "85756007", "Tissue"), ("SCT", "272673000", "Bone"))}


@pytest.mark.parametrize("class_codes", [
    None,  # a checkpoint from before class codes
    {},  # a run whose sites released none (NIfTI labels)
    {"liver": {"category": ["99WARD7", "X1", "ours"], "type": ["SCT", "10200004", "Liver"]}},  # not the dictionary's: dropped
    "garbage",
])
def test_without_codes_from_training_a_predicted_seg_is_coded_generically_never_from_the_class_name(tmp_path, monkeypatch, class_codes):
    state = {"state_dict": build_model(3).state_dict(), "round": 2, "config": run_config({"image-size": 32, "classes": "organ,lesion"})}
    if class_codes is not None:
        state["class_codes"] = class_codes
    torch.save(state, tmp_path / "global_model.pt")
    generic = tuple((c.scheme_designator, c.value, c.meaning) for c in GENERIC)
    assert generic == (("SCT", "91723000", "Anatomical Structure"),) * 2
    assert _predicted_segments(tmp_path, tmp_path / "global_model.pt", monkeypatch) == {"organ": generic, "lesion": generic}


def test_stored_codes_take_their_meaning_from_the_dictionary_only():
    assert stored({"bone": ("SCT", "85756007", "SCT", "272673000"), "x": ("SCT", "85756007", "99WARD7", "X2")}) == {
        "bone": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "272673000", "Bone"]}}
