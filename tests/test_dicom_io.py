import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLossless, RLELossless, generate_uid

from common.dicom_bounds import read_dicom, read_header
from common.dicom_io import LoadReport, decode_series, image_series, load_site_series, read_pixels, read_series, voxel_to_patient
from tests.conftest import CLASSES
from tests.dicom_factory import blob_volume, write_seg, write_series


def _headers(folder):
    return [(p, read_header(p)) for p in sorted(folder.iterdir())]


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


@pytest.mark.parametrize("tilt,descending", [(0.0, False), (30.0, True), (-100.0, False)])
def test_voxel_to_patient_follows_each_files_own_position_and_pixel_spacing(tmp_path, tilt, descending):
    # DICOM's equation C.7.6.2.1-1 on each file's own attributes: pixel (r, c) of slice k lies at its
    # ImagePositionPatient + r x row spacing along the column cosines + c x column spacing along the row cosines.
    image, _ = blob_volume()
    datasets = write_series(tmp_path / "s", image, spacing=(3.0, 1.2, 0.7), tilt_deg=tilt, descending=descending)
    affine = voxel_to_patient(read_series(_headers(tmp_path / "s")))
    rows, cols = image.shape[1:]
    for k, ds in enumerate(datasets):  # ascending along the normal, as the series' slices are
        row_cosines, col_cosines = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
        for r, c in [(0, 0), (rows - 1, 0), (0, cols - 1), (5, 7)]:
            expected = np.array(ds.ImagePositionPatient) + r * ds.PixelSpacing[0] * col_cosines + c * ds.PixelSpacing[1] * row_cosines
            np.testing.assert_allclose((affine @ [k, r, c, 1])[:3], expected, atol=1e-6)


def test_nifti_mask_from_manifest_is_resampled_onto_the_series(tmp_path):
    image, mask = blob_volume()
    write_series(tmp_path / "site" / "img", image, tilt_deg=20.0)
    series = read_series(_headers(tmp_path / "site" / "img"))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(mask, lps_to_ras @ voxel_to_patient(series)), tmp_path / "site" / "mask.nii.gz")
    with open(tmp_path / "site" / "masks.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["series_instance_uid", "mask"], [series.uid, "mask.nii.gz"]])
    [labelled], report = load_site_series(tmp_path / "site", CLASSES)
    np.testing.assert_array_equal(labelled.mask, mask)
    assert labelled.label_source.startswith("NIfTI")
    assert labelled.codes == {} and report.class_codes == {}  # NIfTI labels say nothing of what a class is


def test_a_nifti_mask_stored_in_another_axis_order_lands_on_the_series_voxels(tmp_path):
    # The NIfTI's affine from the files' own attributes (not from our code): its axes are (column
    # reversed, row, slice), in RAS millimetres, as another tool may write them.
    image, mask = blob_volume()
    datasets = write_series(tmp_path / "site" / "img", image, spacing=(3.0, 1.2, 0.7), tilt_deg=25.0)
    first, second = (np.array(ds.ImagePositionPatient, dtype=float) for ds in datasets[:2])
    row_cosines, col_cosines = (np.array(datasets[0].ImageOrientationPatient[i:i + 3], dtype=float) for i in (0, 3))
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    cols = image.shape[2]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = -col_spacing * row_cosines, row_spacing * col_cosines, second - first
    lps[:3, 3] = first + (cols - 1) * col_spacing * row_cosines
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0)[::-1].copy(), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), tmp_path / "site" / "mask.nii.gz")
    with open(tmp_path / "site" / "masks.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["series_instance_uid", "mask"], [datasets[0].SeriesInstanceUID, "mask.nii.gz"]])
    [labelled], _ = load_site_series(tmp_path / "site", CLASSES)
    np.testing.assert_array_equal(labelled.mask, mask)


# pydicom's own test files, copied verbatim into a site folder: what a PACS export drags along.
PYDICOM_BAD = {
    "rtplan.dcm": "not a cross-sectional image: RT Plan Storage",
    "ExplVR_LitEndNoMeta.dcm": "not a cross-sectional image: RT Ion Plan Storage",  # no preamble, no meta
    "rtstruct.dcm": "not a cross-sectional image: RT Structure Set Storage",
    "reportsi.dcm": "not a cross-sectional image: Basic Text SR Storage",
    "waveform_ecg.dcm": "not a cross-sectional image: 12-lead ECG Waveform Storage",
    "rtdose.dcm": "multi-frame/enhanced object (15 frames)",
    "examples_rgb_color.dcm": "not a cross-sectional image: Ultrasound Image Storage",
    "rtplan_truncated.dcm": "not a cross-sectional image: RT Plan Storage",
}


def _labelled(folder, patient, seed, **series_options):
    image, mask = blob_volume(seed=seed)
    datasets = write_series(folder / patient, image, patient=patient, seed=seed, **series_options)
    write_seg(folder / f"{patient}-seg.dcm", datasets, mask, ["Organ", "Lesion"])
    return image, mask, datasets


def test_a_corpus_of_bad_dicom_loads_with_every_bad_file_named_and_every_good_series_used(tmp_path):
    site = tmp_path / "site"
    good_image, good_mask, _ = _labelled(site, "good", 0)
    mono1_image, _, _ = _labelled(site, "mono1", 1, photometric="MONOCHROME1")
    rle_image, _, _ = _labelled(site, "rle", 2, transfer_syntax=RLELossless)
    for name in PYDICOM_BAD:
        shutil.copy(get_testdata_file(name, download=False), site / name)
    shutil.copy(get_testdata_file("MR_truncated.dcm", download=False), site / "MR_truncated.dcm")  # pixel data cut short
    (site / "readme.bin").write_bytes(b"not dicom at all")
    _, _, cut = _labelled(site, "cut", 3)
    one = next((site / "cut").iterdir())
    one.write_bytes(one.read_bytes()[:-100])  # a copy interrupted mid-file: the series is unusable, and says which file
    _, _, spacing = _labelled(site, "spacing", 4)
    odd = read_dicom(next((site / "spacing").iterdir()))
    odd.PixelSpacing = [0.7, 0.7]
    odd.save_as(next((site / "spacing").iterdir()), enforce_file_format=False)
    _labelled(site, "gap", 5)
    sorted((site / "gap").iterdir())[2].unlink()  # a missing slice
    image, mask = blob_volume(seed=6)
    orphan = write_series(tmp_path / "elsewhere", image, patient="orphan")
    write_seg(site / "orphan-seg.dcm", orphan, mask, ["Organ", "Lesion"])  # its images are not at this site
    empty = write_series(site / "empty", image, patient="empty")
    write_seg(site / "empty-seg.dcm", empty, np.zeros_like(mask), ["Organ", "Lesion"])
    jpeg = read_dicom(next((site / "good").iterdir()))
    jpeg.SeriesInstanceUID = jpeg.SOPInstanceUID = generate_uid()
    jpeg.PixelData = encapsulate([b"\xff\xd8 lossless JPEG this machine cannot decode \xff\xd9"])
    jpeg["PixelData"].VR, jpeg["PixelData"].is_undefined_length = "OB", True
    jpeg.file_meta.TransferSyntaxUID = JPEGLossless
    jpeg.save_as(site / "jpeg-lossless.dcm", enforce_file_format=True)
    write_series(site / "unlabelled", image, patient="unlabelled")

    labelled, report = load_site_series(site, CLASSES)

    used = {ls.series.patient_id: ls for ls in labelled}
    assert set(used) == {"good", "mono1", "rle"}
    np.testing.assert_allclose(used["good"].series.volume, good_image, atol=0.5)
    np.testing.assert_array_equal(used["good"].mask, good_mask)
    np.testing.assert_allclose(used["rle"].series.volume, rle_image, atol=0.5)  # decoded by pydicom's RLE decoder
    np.testing.assert_allclose(used["mono1"].series.volume, 65535 - np.rint(mono1_image), atol=0.5)  # 16 bits stored
    assert used["mono1"].series.notes == ["MONOCHROME1, inverted to MONOCHROME2"]

    reasons = {s["path"]: s["reason"] for s in report.skipped}
    def reason(fragment: str) -> str:
        hits = [r for p, r in reasons.items() if fragment in p]
        assert len(hits) == 1, (fragment, reasons)
        return hits[0]
    for name, expected in PYDICOM_BAD.items():
        assert expected in reason(f"/{name}"), (name, reason(f"/{name}"))
    assert "not a readable DICOM" in reason("readme.bin")
    assert f"{one.name}: pixel data unreadable" in reason(f"series {cut[0].SeriesInstanceUID}")
    assert "different pixel spacings" in reason(f"series {spacing[0].SeriesInstanceUID}")
    assert "slice spacing is not uniform" in reason(f"series {read_dicom(next((site / 'gap').iterdir())).SeriesInstanceUID}")
    assert "which is not in the folder" in reason("orphan-seg.dcm")
    assert "mask is empty" in reason("empty-seg.dcm")
    assert "no label" in reason("patient unlabelled")
    assert "3 labelled series used" in report.format()
    # a training load does not decode unlabelled series; prediction decodes every series and names those it cannot
    assert "no label" in reason(f"series {jpeg.SeriesInstanceUID}")
    predict_report = LoadReport(str(site))
    for files in image_series(site, predict_report):  # as `fedseg predict` does, one series at a time
        decode_series(files, predict_report)
    reasons = {s["path"]: s["reason"] for s in predict_report.skipped}
    assert any("MR_truncated.dcm: pixel data unreadable" in r for r in reasons.values()), reasons
    assert "JPEG Lossless" in reason(f"series {jpeg.SeriesInstanceUID}") and "pylibjpeg" in reason(f"series {jpeg.SeriesInstanceUID}")


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"])
def test_compressed_and_big_endian_images_decode_to_the_same_values(name):
    reference = read_pixels(get_testdata_file("MR_small.dcm", download=False))
    np.testing.assert_array_equal(read_pixels(get_testdata_file(name, download=False)), reference)


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


def test_segments_are_read_by_number_only_where_no_seg_at_the_site_names_a_class(tmp_path):
    # A run asking for the lesion alone: one patient's SEG has an organ and a lesion, another's only an
    # organ. Taking that organ segment by its number (1) would label an organ "lesion".
    image, mask = blob_volume()
    both = write_series(tmp_path / "site" / "P1", image, patient="P1")
    write_seg(tmp_path / "site" / "P1" / "seg.dcm", both, mask, ["Organ", "Lesion"])
    organ_only = write_series(tmp_path / "site" / "P2", image, patient="P2")
    write_seg(tmp_path / "site" / "P2" / "seg.dcm", organ_only, (mask == 1).astype(np.uint8), ["Organ"])
    labelled, report = load_site_series(tmp_path / "site", ("background", "lesion"))
    assert [ls.series.patient_id for ls in labelled] == ["P1"]
    np.testing.assert_array_equal(labelled[0].mask, (mask == 2).astype(np.uint8))
    assert any("no segment maps to a configured class" in s["reason"] for s in report.skipped)
    # At a site whose SEGs name no class at all, segment numbers are the documented guess.
    unnamed = write_series(tmp_path / "other" / "P3", image, patient="P3")
    write_seg(tmp_path / "other" / "P3" / "seg.dcm", unnamed, mask, ["Segment_1", "Segment_2"])
    [guessed], _ = load_site_series(tmp_path / "other", CLASSES)
    np.testing.assert_array_equal(guessed.mask, mask)
    assert "by segment number" in guessed.label_source
