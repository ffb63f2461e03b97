"""What a class is, in codes: read at a site from real DICOM-SEGs (highdicom), released only as
segmentation property codes of pydicom's dictionary when every SEG agrees and enough do, agreed on by a
strict majority of sites, kept in the run's checkpoint, written into the SEGs a model predicts."""

import logging
from collections import Counter
from types import SimpleNamespace

import highdicom as hd
import pytest
import torch
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import client.predict
import common.class_codes
from client.guard import open_guard
from client.predict import predict_folder
from client.site_state import SiteState
from common.class_codes import CATEGORIES, GENERIC, TYPES, coding, consensus, releasable, stored, vocabulary
from common.config import run_config
from common.dataset import Preprocessing, SiteData
from common.dicom_io import load_site_series
from common.model import build_model, load_global_model
from common.parameters import to_arrays
from server.run_record import RunHistory, RunRecord
from tests.dicom_factory import blob_volume, write_seg, write_series

CLASSES = ("background", "liver", "lesion")
LIVER = (codes.SCT.AnatomicalStructure, codes.SCT.Liver)  # CID 7150 has no "Organ" category
LESION = (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)
NEOPLASM = (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm)
# In pydicom's dictionary, but a diagnosis, not a segmentation property type (CID 7151): never released.
HIV = (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.HIVPositive)
# A dictionary code whose meaning (67 characters) highdicom's SEG writer refuses; a file may still carry its value.
LONG = Code("111421", "DCM", "Personal history of breast cancer with breast conservation therapy")
LONG_IN_A_FILE = (codes.SCT.MorphologicallyAbnormalStructure, hd.sr.CodedConcept(LONG.value, LONG.scheme_designator, "x"))
# A hospital's own words: a local scheme, a long code, and free text that must never leave the site.
LOCAL = (hd.sr.CodedConcept("X1", "99WARD7", "Mrs Example's scan"), hd.sr.CodedConcept("X" * 10_000, "99WARD7", "ward 7 lesion"))
# A hostile file's codes: a terminal escape and a forged log line.
HOSTILE = (hd.sr.CodedConcept("X1\x1b[2J", "99WARD7", "x"), hd.sr.CodedConcept("1", "99\nINFO forged line", "x"))


def pair(coded) -> tuple[str, str, str, str]:
    """A coding as a site releases it."""
    return (coded[0].scheme_designator, coded[0].value, coded[1].scheme_designator, coded[1].value)


def _site(folder, codings_per_patient):
    """One labelled series per patient, its SEG's segments "Liver" and "Lesion" coded as given; a third
    coding is a second "Lesion" segment in the same SEG."""
    for index, codings in enumerate(codings_per_patient):
        image, mask = blob_volume(seed=index)
        mask[4, 2:5, 2:5] = 3
        datasets = write_series(folder / f"P{index}", image, patient=f"P{index}", seed=index)
        write_seg(folder / f"P{index}-seg.dcm", datasets, mask, ["Liver", "Lesion", "Lesion"][:len(codings)], codings)
    return folder


def _released(tmp_path, codings_per_patient, caplog, example_count_bin: int):
    """What a site's guard releases of these SEGs' codes, and what the site's log says."""
    site = _site(tmp_path / "site", codings_per_patient)
    _, report = load_site_series(site, CLASSES)
    guard, _ = open_guard(SiteState(tmp_path / "state"), "north", site, {"epsilon_budget": 8.0, "example_count_bin": example_count_bin})
    with caplog.at_level(logging.WARNING, logger="client.guard"):
        released = guard.class_codes(SiteData(str(site), [], [], report, Preprocessing.from_config(run_config())))
    return released, caplog.text, report


def test_a_site_releases_a_class_s_codes_only_when_every_seg_codes_it_so_and_enough_do(tmp_path):
    site = _site(tmp_path / "site", [[LIVER, LESION]] * 3)
    labelled, report = load_site_series(site, CLASSES)
    assert [ls.codes for ls in labelled] == [{"liver": {pair(LIVER)}, "lesion": {pair(LESION)}}] * 3
    assert report.class_codes == {"liver": Counter({pair(LIVER): 3}), "lesion": Counter({pair(LESION): 3})}
    assert releasable(report.class_codes, 3) == ({"liver": ("SCT", "91723000", "SCT", "10200004"),
                                                  "lesion": ("SCT", "49755003", "SCT", "52988006")}, {})
    released, withheld = releasable(report.class_codes, 4)
    assert released == {} and withheld["lesion"].endswith("in 3 DICOM-SEG(s), fewer than 4")
    assert ("coded    lesion: Morphologically Abnormal Structure / Lesion (SCT 49755003 / SCT 52988006) in 3 DICOM-SEG(s)"
            in report.format())  # the site's console


@pytest.mark.parametrize("count, released", [(9, {}), (10, {"lesion": pair(LESION)})])
def test_fewer_segs_than_the_count_bin_release_nothing(count, released):
    assert releasable({"lesion": Counter({pair(LESION): count})}, 10)[0] == released


@pytest.mark.parametrize("hostile", [[LIVER, HIV], [LIVER, NEOPLASM], [LIVER, LESION, HIV]],
                         ids=["diagnosis", "another-type", "second-segment"])
def test_one_seg_cannot_choose_a_class_s_code_it_can_only_withhold_it(tmp_path, caplog, hostile):
    """The attack: one patient's SEG codes the lesion as that patient's diagnosis (or just differently,
    or in a second segment of the same label). Before, the most common pair, ties broken by string order,
    let one file choose; now nothing is released for the class."""
    released, log, _ = _released(tmp_path, [[LIVER, LESION]] * 3 + [hostile], caplog, example_count_bin=3)
    assert released == {"liver": pair(LIVER)}
    assert "class 'lesion': its codes are not released: its DICOM-SEGs code it 2 ways" in log


@pytest.mark.parametrize("coded", [HIV, LONG_IN_A_FILE, LOCAL], ids=["diagnosis", "over-long-meaning", "local"])
def test_a_code_that_is_no_segmentation_property_type_is_not_released_and_the_site_log_names_the_class(tmp_path, caplog, coded):
    released, log, _ = _released(tmp_path, [[LIVER, coded]] * 3, caplog, example_count_bin=3)
    assert released == {"liver": pair(LIVER)}  # every SEG agrees, enough of them: still not a code a SEG's type may be
    assert "class 'lesion': its codes are not released: coded" in log and "not a segmentation property category" in log
    assert "Mrs Example" not in log and "ward 7 lesion" not in log  # a file's free text is not even logged


def test_a_hostile_seg_s_codes_reach_the_site_s_log_and_console_escaped(tmp_path, caplog):
    released, log, report = _released(tmp_path, [[LIVER, HOSTILE]] * 3, caplog, example_count_bin=3)
    assert released == {"liver": pair(LIVER)}
    for text in (log, report.format()):
        assert "\x1b" not in text and "\nINFO forged" not in text
        assert "('99WARD7' 'X1\\x1b[2J' / '99\\nINFO forged line' '1')" in text


def test_the_vocabulary_is_pydicom_s_segmentation_property_groups_and_every_code_in_it_can_be_written():
    assert len(vocabulary(CATEGORIES)) == 8 and len(vocabulary(TYPES)) == 907  # pydicom 3.0: CID 7150; CID 7151 and its groups
    assert ("SCT", codes.SCT.HIVPositive.value) not in vocabulary(TYPES) and (LONG.scheme_designator, LONG.value) not in vocabulary(TYPES)
    for c in [*vocabulary(CATEGORIES).values(), *vocabulary(TYPES).values()]:  # so no checkpoint of these stops `fedseg predict`
        hd.sr.CodedConcept(c.value, c.scheme_designator, c.meaning)


def test_a_concept_with_a_meaning_over_64_characters_is_no_code_even_in_a_group(monkeypatch):
    groups = SimpleNamespace(cid7150=codes.cid7150, cid7151=SimpleNamespace(concepts={"Long": LONG, "Lesion": codes.SCT.Lesion}))
    monkeypatch.setattr(common.class_codes, "codes", groups)  # a pydicom release that lists one
    vocabulary.cache_clear()
    try:
        assert coding(pair((codes.SCT.MorphologicallyAbnormalStructure, LONG))) is None
        assert coding(pair(LESION)) == LESION
    finally:
        vocabulary.cache_clear()


@pytest.mark.parametrize("sites, agreed", [
    ([{"lesion": pair(LESION)}, {"lesion": pair(HIV)}], {}),  # 1 to 1: neither of two sites chooses
    ([{"lesion": pair(LESION)}, {"lesion": pair(NEOPLASM)}, {}], {}),  # a site without codes does not count
    ([{"lesion": pair(LESION)}, {"lesion": pair(LESION)}, {"lesion": pair(NEOPLASM)}], {"lesion": pair(LESION)}),
])
def test_the_run_takes_a_class_s_codes_only_from_a_strict_majority_of_the_sites_that_sent_them(sites, agreed):
    assert consensus(sites) == (agreed, ["lesion"])


def _checkpoint_with_codes(run_dir):
    """A run's record as the server keeps it after two sites released their codes, and its checkpoint."""
    config = run_config({"image-size": 32, "classes": "liver,lesion", "run-dir": str(run_dir)})
    record = RunRecord(run_dir, config)
    record.site_codes = {"a": {"liver": pair(LIVER), "lesion": pair(LESION)}, "b": {"liver": pair(LIVER)}}
    assert record.agree_on_codes() == []
    torch.manual_seed(0)
    record.save_checkpoint(1, to_arrays(build_model(3)), {})
    return record


def test_the_class_codes_survive_the_checkpoint_the_history_and_a_resume(tmp_path):
    record = _checkpoint_with_codes(tmp_path)
    expected = {"liver": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]},
                "lesion": {"category": ["SCT", "49755003", "Morphologically Abnormal Structure"], "type": ["SCT", "52988006", "Lesion"]}}
    assert record.class_codes == expected
    assert torch.load(tmp_path / "global_model.pt", weights_only=True)["class_codes"] == expected
    assert RunHistory.read(tmp_path).class_codes == expected
    model = load_global_model(tmp_path)
    assert model.class_codes == {"liver": LIVER, "lesion": LESION}
    assert [c.meaning for c in model.class_codes["lesion"]] == ["Morphologically Abnormal Structure", "Lesion"]
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
        "liver": (("SCT", "91723000", "Anatomical Structure"), ("SCT", "10200004", "Liver")),
        "lesion": (("SCT", "49755003", "Morphologically Abnormal Structure"), ("SCT", "52988006", "Lesion"))}


@pytest.mark.parametrize("class_codes", [
    None,  # a checkpoint from before class codes
    {},  # a run whose sites released none (NIfTI labels)
    {"organ": {"category": ["99WARD7", "X1", "ours"], "type": ["SCT", "10200004", "Liver"]}},  # not the dictionary's: dropped
    {"lesion": {"category": ["SCT", "49755003", "x"], "type": ["SCT", "165816005", "HIV Positive"]}},  # no segmentation type
    # an older run's code whose meaning highdicom refuses (over 64 characters): `fedseg predict` crashed on it
    {"lesion": {"category": ["SCT", "49755003", "x"], "type": ["DCM", "111421", "x"]}},
    "garbage",
])
def test_without_codes_from_training_a_predicted_seg_is_coded_generically_never_from_the_class_name(tmp_path, monkeypatch, caplog,
                                                                                                       class_codes):
    state = {"state_dict": build_model(3).state_dict(), "round": 2, "config": run_config({"image-size": 32, "classes": "organ,lesion"})}
    if class_codes is not None:
        state["class_codes"] = class_codes
    torch.save(state, tmp_path / "global_model.pt")
    generic = tuple((c.scheme_designator, c.value, c.meaning) for c in GENERIC)
    assert generic == (("SCT", "91723000", "Anatomical Structure"),) * 2
    with caplog.at_level(logging.WARNING, logger="common.class_codes"):
        assert _predicted_segments(tmp_path, tmp_path / "global_model.pt", monkeypatch) == {"organ": generic, "lesion": generic}
    assert ("the checkpoint's codes are no segmentation property" in caplog.text) == (isinstance(class_codes, dict) and bool(class_codes))


def test_stored_codes_take_their_meaning_from_the_dictionary_only():
    assert stored({"bone": ("SCT", "85756007", "SCT", "3138006"), "x": ("SCT", "85756007", "99WARD7", "X2"),
                   "old": ("SCT", "85756007", "SCT", "272673000")}) == {  # SCT Bone: in the dictionary, not in CID 7151
        "bone": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "3138006", "Bone"]}}
