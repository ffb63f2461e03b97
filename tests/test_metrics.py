import math

import numpy as np
import pytest

from common.metrics import class_metrics, foreground_dice


def test_known_answer_dice_iou_hd95_with_spacing():
    truth = np.zeros((4, 10, 10), dtype=int)
    truth[1:3, 2:6, 2:6] = 1  # 32 voxels
    pred = np.zeros_like(truth)
    pred[1:3, 2:6, 2:4] = 1  # 16 voxels, all inside the truth
    m = class_metrics(pred, truth, num_classes=3, spacing=(2.0, 1.0, 1.0))
    assert m["dice"][0] == pytest.approx(2 * 16 / (16 + 32))
    assert m["iou"][0] == pytest.approx(16 / 32)
    # the truth's far columns (x = 4, 5) are 2 voxels of 1 mm from the prediction
    assert m["hd95"][0] == pytest.approx(2.0)
    assert math.isnan(m["dice"][1])  # class 2 absent from the truth: undefined, not 0 or 1


def test_hd95_uses_physical_spacing():
    truth = np.zeros((6, 8, 8), dtype=int)
    truth[1:5, 2:6, 2:6] = 1
    pred = np.zeros_like(truth)
    pred[1:4, 2:6, 2:6] = 1  # one slice short along axis 0
    hd_thin = class_metrics(pred, truth, 2, (1.0, 1.0, 1.0))["hd95"][0]
    hd_thick = class_metrics(pred, truth, 2, (5.0, 1.0, 1.0))["hd95"][0]
    assert hd_thin == pytest.approx(1.0)
    assert hd_thick == pytest.approx(5.0)


def test_perfect_and_empty_predictions():
    truth = np.zeros((2, 6, 6), dtype=int)
    truth[0, 1:4, 1:4] = 1
    truth[1, 2:3, 2:3] = 2
    perfect = class_metrics(truth, truth, 3, (1, 1, 1))
    assert perfect["dice"].tolist() == [1.0, 1.0]
    assert perfect["hd95"].tolist() == [0.0, 0.0]
    empty = class_metrics(np.zeros_like(truth), truth, 3, (1, 1, 1))
    assert empty["dice"].tolist() == [0.0, 0.0]


def test_headline_dice_is_foreground_only_and_skips_undefined_classes():
    assert foreground_dice(np.array([0.8, np.nan])) == pytest.approx(0.8)
    assert foreground_dice(np.array([0.8, 0.4])) == pytest.approx(0.6)
    assert math.isnan(foreground_dice(np.array([np.nan, np.nan])))
