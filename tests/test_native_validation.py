"""A site's validation is scored on each series' own pixel grid and spacing, as `fedseg predict`
writes it, not on the model's smaller grid: a structure that grid cannot hold still counts, HD95 is
in the series' millimetres, and the Dice a site reports is the Dice of what prediction gives it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from client.training import evaluate
from common.config import run_config
from common.dataset import Preprocessing, SiteData, load_site, training_slices, validation_volume
from common.dicom_io import LabelledSeries, Series, load_site_series
from common.inference import segment_series, slice_logits
from common.metrics import class_metrics, foreground_dice
from common.overlays import draw_overlays
from tests.conftest import CLASSES

CPU = torch.device("cpu")
PREPROCESSING = Preprocessing.from_config(run_config({"image-size": 64, "spacing": 0}))  # whole slices: one 64² model grid


class Fixed(torch.nn.Module):
    """Whatever the image: class 1 from model-grid column `start` on, background before it."""

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 3, *x.shape[2:])
        logits[:, 1], logits[:, 2] = -1.0, -10.0
        logits[:, 1, :, self.start:] = 1.0
        return logits


class Bright(torch.nn.Module):
    """Class 1 where the prepared image is above 0.5, class 2 above 0.75: on the synthetic CT, much of
    the organ and some of the lesion."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 0.5), x, x - 0.3 + (x > 0.75)], dim=1)


def _labelled(mask: np.ndarray, spacing: tuple[float, float, float]) -> LabelledSeries:
    volume = np.where(mask > 0, 200.0, -100.0).astype(np.float32)
    series = Series(uid="1.2.3", patient_id="P", modality="CT", sop_uids=[], volume=volume, spacing=spacing,
                    origin=np.zeros(3), orientation=np.array([1.0, 0, 0, 0, 1, 0]))
    return LabelledSeries(series, mask, "test")


def _validated(model: torch.nn.Module, ls: LabelledSeries) -> dict[str, float]:
    return evaluate(model, SiteData("site", [], [validation_volume(ls, PREPROCESSING)], None, PREPROCESSING), 3, CPU)


def test_a_line_the_model_grid_cannot_hold_is_scored_where_it_is():
    """A one-pixel line on an odd column of a 128² series vanishes from the 64² grid, where a model
    that calls everything class 1 would score NaN (class absent); the series' own grid gives its Dice."""
    mask = np.zeros((4, 128, 128), np.uint8)
    mask[:, :, 37] = 1
    ls = _labelled(mask, (3.0, 0.8, 0.8))
    image, model_grid_mask = training_slices(ls, PREPROCESSING)
    assert not model_grid_mask.any()  # what the old, model-grid scoring had as the truth
    on_model_grid = class_metrics(slice_logits(Fixed(), image, 64, CPU).argmax(dim=1).numpy(), model_grid_mask, 3, (3.0, 1.6, 1.6))
    assert np.isnan(on_model_grid["dice"][0])
    metrics = _validated(Fixed(), ls)
    line, everything = 4 * 128, mask.size
    assert metrics["dice-class1"] == pytest.approx(2 * line / (line + everything))  # 0.0155, on the series' pixels
    assert metrics["dice"] == metrics["dice-class1"] and np.isnan(metrics["dice-class2"])  # the lesion is absent


def test_hd95_is_in_the_series_own_millimetres():
    """The model calls class 1 from model column 40 of 64, i.e. series column 80 of 128; the truth
    starts at column 64: 16 columns of 1.3 mm apart, whatever the model grid's spacing."""
    mask = np.zeros((8, 128, 128), np.uint8)
    mask[:, :, 64:] = 1
    metrics = _validated(Fixed(start=40), _labelled(mask, (2.0, 0.7, 1.3)))
    assert metrics["dice-class1"] == pytest.approx(2 * 48 / (48 + 64))  # exactly columns 80-127 predicted
    assert metrics["hd95-class1"] == pytest.approx(16 * 1.3)
    assert metrics["hd95"] == metrics["hd95-class1"]


def test_a_sites_validation_dice_is_the_dice_of_what_predict_writes(tiny_site):
    """Each validation series of a real site folder: what `evaluate` reports equals the metrics of
    `segment_series`' mask (what `fedseg predict` writes) against the series' own labels."""
    preprocessing = Preprocessing.from_config(run_config({"image-size": 32}))
    data = load_site(str(tiny_site), CLASSES, preprocessing, 0.5)
    labelled = {ls.series.patient_id: ls for ls in load_site_series(tiny_site, CLASSES)[0]}
    model = Bright()
    assert data.validation
    for volume in data.validation:
        ls = labelled[volume.patient_id]
        assert volume.mask.shape == ls.series.volume.shape != (len(ls.mask), 32, 32) and volume.spacing == ls.series.spacing
        reported = evaluate(model, SiteData(data.folder, [], [volume], None, preprocessing), 3, CPU)
        written = class_metrics(segment_series(model, ls.series, preprocessing, CPU), ls.mask, 3, ls.series.spacing)
        assert reported["dice"] == pytest.approx(foreground_dice(written["dice"]), nan_ok=True)
        for c in (1, 2):
            for name in ("dice", "iou", "hd95"):
                assert reported[f"{name}-class{c}"] == pytest.approx(written[name][c - 1], nan_ok=True), (name, c)
        assert reported["dice-class1"] > 0.5  # a number worth comparing: the organ is found


def test_the_reports_overlays_lay_a_model_grid_image_under_a_series_grid_mask(tmp_path: Path):
    """A 32² image whose left half is bright under a 40² mask whose left half is class 1: the mask
    covers the bright half exactly (drawn on their own pixel counts, it would spill onto the dark)."""
    image = np.zeros((32, 32), np.float32)
    image[:, :16] = 1
    mask = np.zeros((40, 40), np.uint8)
    mask[:, :20] = 1
    png = imread(draw_overlays([(image, mask, "")], ["background", "organ"], tmp_path / "o.png", "", columns=1))[..., :3] * 255

    def pixels(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(png - rgb).max(axis=-1) < 25).sum())

    over_bright, over_dark = pixels((160, 212, 158)), pixels((20, 72, 18))  # organ green at alpha 0.45 over white, over black
    assert over_bright > 10_000 and over_dark < 0.01 * over_bright
