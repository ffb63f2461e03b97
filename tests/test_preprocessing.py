"""The CT window is the run's (`ct-window`): it saturates bone by default and not under a bone window,
refuses nonsense with a message, is a `fedseg run`/`simulate` flag, and prediction prepares a series
with the window its checkpoint was trained with (a checkpoint from before the option: the default)."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from client.predict import predict_series
from common.cli import build_parser
from common.config import run_config
from common.dataset import Preprocessing, prepare_image
from common.dicom_io import LoadReport, Series, decode_series, image_series, read_nifti_mask
from common.model import build_model, load_global_model
from common.parameters import to_arrays
from server.run_options import RunOptionsError, add_run_options, run_overrides
from server.run_record import RunRecord
from tests.dicom_factory import write_series

SIZE = 16
AIR, TISSUE, BONE = -1000.0, 100.0, 700.0  # HU


def _phantom() -> np.ndarray:
    """Air with a soft-tissue block (rows 2-7) and a bone block (rows 9-14), [4, SIZE, SIZE] HU."""
    volume = np.full((4, SIZE, SIZE), AIR, dtype=np.float32)
    volume[:, 2:8, 2:14], volume[:, 9:15, 2:14] = TISSUE, BONE
    return volume


def _series(volume: np.ndarray, modality: str = "CT") -> Series:
    return Series(uid="1.2.3", patient_id="P", modality=modality, sop_uids=[], volume=volume, spacing=(3.0, 1.0, 1.0),
                  origin=np.zeros(3), orientation=np.array([1.0, 0, 0, 0, 1, 0]))


def _prepared(series: Series, **config) -> np.ndarray:
    return prepare_image(series, Preprocessing.from_config(run_config({"image-size": SIZE, "spacing": 0, **config})))[:, 0]


def test_bone_saturates_under_the_default_window_and_not_under_a_bone_window():
    series = _series(_phantom())
    default = _prepared(series)
    assert default[:, 11, 8] == pytest.approx(1.0) and _prepared(_series(np.full((4, SIZE, SIZE), 240.0)))[0, 8, 8] == pytest.approx(1.0)
    bone = _prepared(series, **{"ct-window": "-200,1500"})
    assert bone[:, 11, 8] == pytest.approx((BONE + 200) / 1700) and bone[:, 4, 8] == pytest.approx((TISSUE + 200) / 1700)
    assert bone.min() == 0.0 and bone.max() < 1.0  # air clipped, nothing saturated
    # MR has no absolute scale: each volume z-scored by its own statistics, whatever the CT window
    mr = _series(_phantom() + 1000.0, modality="MR")
    np.testing.assert_array_equal(_prepared(mr), _prepared(mr, **{"ct-window": "-200,1500"}))


def test_an_mr_volume_is_z_scored_by_its_own_statistics():
    """Mean 0 and deviation 1 over the volume, so another scanner's gain and offset change nothing."""
    volume = _phantom() + 1000.0
    prepared = _prepared(_series(volume, modality="MR"))
    assert prepared.mean() == pytest.approx(0.0, abs=1e-5) and prepared.std() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(_prepared(_series(volume * 3.5 + 200.0, modality="MR")), prepared, atol=1e-5)
    # A model from before z-scoring (its config has no `mr-intensity`) is given MR as it was trained: percentiles to [0, 1].
    before = {k: v for k, v in run_config({"image-size": SIZE, "spacing": 0}).items() if k != "mr-intensity"}
    old = prepare_image(_series(volume, modality="MR"), Preprocessing.from_config(before))[:, 0]
    assert old.min() == 0.0 and old.max() == 1.0 and old.std() != pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("bad", ["240,-160", "100,100", "-160", "-160,240,400", "soft,tissue", "nan,240", "-160,inf",
                                 "-5000,240", "-160,1e9", "",
                                 "0,1e-46", "100,105"])  # below float32's resolution: NaN images; narrower than any window
def test_a_bad_window_is_refused_with_what_is_expected(bad):
    with pytest.raises(ValueError, match=r"ct-window must be 'LOW,HIGH' in HU with -2048 <= LOW, LOW \+ 10 <= HIGH <= 4096"):
        run_config({"ct-window": bad})
    with pytest.raises(RunOptionsError, match="ct-window must be"):
        run_overrides(_parsed(f"--ct-window={bad}"), None)


def _parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    return parser.parse_args(argv)


def test_the_window_is_a_run_and_simulate_flag_sent_to_the_sites():
    assert run_overrides(_parsed(), None)["ct-window"] == "-160,240"
    assert run_overrides(_parsed("--ct-window=-200,1500"), None)["ct-window"] == "-200,1500"
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("run", "simulate"):
        assert "--ct-window" in sub.choices[command].format_help(), command


def test_prediction_prepares_a_series_with_its_checkpoints_window(tmp_path):
    """A bone model's checkpoint predicts through the bone window; one written before the options
    existed through the default window and on whole slices, as it was trained."""

    class Bright(torch.nn.Module):  # class 1 wherever the prepared image is above 0.5: what the model saw
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.full_like(x, 0.5), x, torch.zeros_like(x)], dim=1)

    write_series(tmp_path / "ct", _phantom(), modality="CT", intercept=-1024.0)
    report = LoadReport(str(tmp_path / "ct"))
    [files] = image_series(tmp_path / "ct", report)
    series = decode_series(files, report)
    masks = {}
    for name, config in {"bone": run_config({"image-size": SIZE, "spacing": 0, "ct-window": "-200,1500"}),
                         "before the options": {k: v for k, v in run_config({"image-size": SIZE}).items() if k not in ("ct-window", "spacing")}}.items():
        RunRecord(tmp_path / name, config).save_checkpoint(0, to_arrays(build_model(3)), {})
        checkpoint = dataclasses.replace(load_global_model(tmp_path / name), model=Bright())
        prediction, _ = predict_series(checkpoint, series, tmp_path / name / "out" / "P", torch.device("cpu"), nifti=True, png=False)
        masks[name] = read_nifti_mask(prediction.nifti, series)
    tissue, bone = (slice(None), slice(3, 7), slice(3, 13)), (slice(None), slice(10, 14), slice(3, 13))
    assert (masks["bone"][bone] == 1).all() and (masks["bone"][tissue] == 0).all()  # bone apart from tissue
    assert (masks["before the options"][bone] == 1).all() and (masks["before the options"][tissue] == 1).all()  # both saturate alike
    # (and on the whole 16² slice, as before `spacing`: at its default 4 mm, the 1 mm blocks would blur into 4x4 pixels)


def test_predict_skips_a_series_its_checkpoints_spacing_would_blow_up_and_goes_on(tmp_path, tiny_site, monkeypatch):
    """A hostile global model asks for 0.3 mm pixels: the tiny CTs' 9.4 mm pixels would take ~1000x
    their memory. Predict names the series in its report and writes nothing for it; a sane checkpoint
    predicts the same series."""
    import common.dataset
    from client.predict import predict_folder

    monkeypatch.setattr(common.dataset, "MIN_BUDGET_PIXELS", 0)  # the series as if large: only the 4x rule
    patient = next(p for p in sorted(tiny_site.iterdir()) if p.is_dir())
    outcomes = {}
    for spacing in (0.3, 8.0):
        RunRecord(tmp_path / str(spacing), run_config({"image-size": SIZE, "spacing": spacing})).save_checkpoint(0, to_arrays(build_model(3)), {})
        results, report = predict_folder(load_global_model(tmp_path / str(spacing)), patient, tmp_path / str(spacing) / "out",
                                         torch.device("cpu"), png=False)
        outcomes[spacing] = (len(results), [s["reason"] for s in report.skipped])
    assert outcomes[0.3][0] == 0 and any("more than 4x its own" in reason for reason in outcomes[0.3][1])
    assert not list((tmp_path / "0.3" / "out").rglob("*.dcm"))
    assert outcomes[8.0] == (1, [])
