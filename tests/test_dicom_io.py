import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from common.dicom_io import load_site_series, read_dicom, read_series, voxel_to_patient
from tests.conftest import CLASSES
from tests.dicom_factory import blob_volume, write_seg, write_series


def _headers(folder):
    return [(p, read_dicom(p, stop_before_pixels=True)) for p in sorted(folder.iterdir())]


@pytest.mark.parametrize("tilt,descending", [(0.0, False), (25.0, True), (-40.0, False), (180.0, True)])
def test_slices_ordered_along_normal_not_by_name_or_instance_number(tmp_path, tilt, descending):
    image, _ = blob_volume()
    write_series(tmp_path / "s", image, tilt_deg=tilt, descending=descending, slope=2.0, intercept=-1000.0)
    series = read_series(_headers(tmp_path / "s"))
    # slice k was written with mean 100*k (+50, + noise): the order along the normal is recovered
    means = series.volume.reshape(len(image), -1)[:, :20].mean(axis=1)
    assert np.all(np.diff(means) > 50)
    np.testing.assert_allclose(series.volume, image, atol=1.0)  # rescale slope/intercept applied
    assert series.spacing == pytest.approx((4.0, 1.5, 1.5))


def test_seg_lands_on_the_right_slice(tmp_path):
    image, mask = blob_volume()
    datasets = write_series(tmp_path / "site" / "flat", image, tilt_deg=15.0, descending=True)
    write_seg(tmp_path / "site" / "labels" / "seg.dcm", datasets, mask, ["Organ", "Lesion"])
    [labelled], report = load_site_series(tmp_path / "site", CLASSES)
    np.testing.assert_array_equal(labelled.mask, mask)
    assert np.argwhere(labelled.mask == 2)[:, 0].tolist() == [3] * 9  # the lesion only on slice 3
    assert "DICOM-SEG" in labelled.label_source and not report.skipped


def test_nifti_mask_from_manifest_is_resampled_onto_the_series(tmp_path):
    image, mask = blob_volume()
    write_series(tmp_path / "site" / "img", image, tilt_deg=20.0)
    series = read_series(_headers(tmp_path / "site" / "img"))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(mask, lps_to_ras @ voxel_to_patient(series)), tmp_path / "site" / "mask.nii.gz")
    with open(tmp_path / "site" / "masks.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["series_instance_uid", "mask"], [series.uid, "mask.nii.gz"]])
    [labelled], _ = load_site_series(tmp_path / "site", CLASSES)
    np.testing.assert_array_equal(labelled.mask, mask)
    assert labelled.label_source.startswith("NIfTI")


def test_bad_files_are_named_and_good_series_still_load(tmp_path):
    image, mask = blob_volume()
    datasets = write_series(tmp_path / "site" / "good", image)
    write_seg(tmp_path / "site" / "good-seg.dcm", datasets, mask, ["Organ", "Lesion"])
    (tmp_path / "site" / "readme.bin").write_bytes(b"not dicom at all")
    shutil.copy(get_testdata_file("rtplan.dcm"), tmp_path / "site" / "plan.dcm")
    write_series(tmp_path / "site" / "unlabelled", image, patient="P2")
    labelled, report = load_site_series(tmp_path / "site", CLASSES)
    assert len(labelled) == 1
    reasons = {s["path"].split("/")[-1] if "/" in s["path"] else s["path"]: s["reason"] for s in report.skipped}
    assert "not a readable DICOM" in reasons["readme.bin"]
    assert "not a cross-sectional image" in reasons["plan.dcm"]
    assert any("no label" in s["reason"] for s in report.skipped)
    assert "1 labelled series used" in report.format()


def test_site_without_usable_labels_fails_with_a_clear_message(tmp_path):
    image, _ = blob_volume()
    write_series(tmp_path / "site", image)
    with pytest.raises(ValueError, match="no usable labelled series"):
        load_site_series(tmp_path / "site", CLASSES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_site_series(tmp_path / "missing", CLASSES)


def test_generated_site_reads_back_with_labels(tiny_site):
    labelled, report = load_site_series(tiny_site, CLASSES)
    assert len(labelled) >= 4 and not report.skipped
    for ls in labelled:
        assert ls.mask.shape == ls.series.volume.shape
        organ_hu = ls.series.volume[ls.mask == 1].mean()
        assert 60 < organ_hu < 150  # the organ is where the SEG says it is (≈105 HU, per-site calibration)
