import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot

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


@pytest.mark.parametrize("seed", range(6))
def test_each_class_scored_on_its_box_gives_the_whole_volume_numbers(seed):
    # MONAI on the whole volume's one-hot (what class_metrics did before it cropped): the same numbers,
    # structures touching the volume's edges, missed and absent classes included.
    rng = np.random.default_rng(seed)
    shape, spacing = (7, 40, 36), (3.0, 0.8, 1.1)
    truth, pred = np.zeros(shape, dtype=int), np.zeros(shape, dtype=int)
    for volume in (truth, pred):
        for c in (1, 2, 3):
            if rng.random() < 0.8:
                lo = rng.integers(0, [5, 30, 26]); hi = lo + rng.integers(1, [4, 14, 14])
                volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = c
    ours = class_metrics(pred, truth, 4, spacing)
    p, t = (one_hot(torch.as_tensor(v)[None, None], 4) for v in (pred, truth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {"dice": compute_dice(p, t, include_background=False, ignore_empty=True)[0].numpy(),
                "iou": compute_iou(p, t, include_background=False, ignore_empty=True)[0].numpy(),
                "hd95": compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=list(spacing))[0].numpy()}
    absent = ~t[0, 1:].reshape(3, -1).any(dim=1).numpy()
    want["hd95"] = np.where(np.isfinite(want["hd95"]) & ~absent, want["hd95"], np.nan)
    for name in ("dice", "iou", "hd95"):
        np.testing.assert_allclose(ours[name], want[name].astype(float), rtol=1e-6, equal_nan=True, err_msg=name)
