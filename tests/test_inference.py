"""The 2D model over a volume (MONAI's SliceInferer: patch-sized windows on each slice) against the
model applied to one slice at a time, the model's grid at the run's spacing, and training's patches."""

import numpy as np
import torch
import torch.nn.functional as F

import pytest

from client.training import _patch
from common.config import run_config
from common.dataset import Preprocessing, check_growth, prepare_image
from common.dicom_io import Series
from common.inference import native_labels, segment_series, slice_logits
from common.model import build_model


class _Counting(torch.nn.Module):
    """The model, noting how many slices each call is given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return self.model(x)


def _series(volume: np.ndarray, pixel_mm: float) -> Series:
    return Series(uid="1.2.3", patient_id="P", modality="CT", sop_uids=[], volume=volume, spacing=(3.0, pixel_mm, pixel_mm),
                  origin=np.zeros(3), orientation=np.array([1.0, 0, 0, 0, 1, 0]))


class _Sizes(torch.nn.Module):
    """Class scores that are a pixel's own intensity (a model that sees one pixel at a time), noting
    the shape of every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[2:]))
        return torch.cat([torch.full_like(x, 0.5), x, 1 - x], dim=1)


def _mean_model() -> torch.nn.Module:
    """Class scores from the 5x5 mean around each pixel (zero-padded at its input's border)."""
    torch.manual_seed(5)
    mean = torch.nn.Conv2d(1, 1, 5, padding=2, bias=False)
    torch.nn.init.constant_(mean.weight, 1 / 25)
    return torch.nn.Sequential(mean, torch.nn.Conv2d(1, 3, 1))


def _one_by_one(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.as_tensor(image[k:k + 1])) for k in range(len(image))])


def _decided(logits: torch.Tensor) -> torch.Tensor:
    """Pixels whose best class leads the next by more than float noise (a tie may go either way)."""
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1] > 1e-4


def test_slice_logits_are_the_model_on_each_slice_in_batches_of_at_most_batch():
    torch.manual_seed(0)
    model = _Counting(build_model(3))
    image = np.random.default_rng(0).random((10, 1, 16, 16), dtype=np.float32)
    logits = slice_logits(model, image, 16, torch.device("cpu"), batch=4)
    assert model.batches == [4, 4, 2]  # a long series never goes to the device whole
    expected = _one_by_one(model.model, image)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    labels = native_labels(model.model, image, (16, 16), 16, torch.device("cpu"))  # on the model's own grid: no resampling
    decided = _decided(expected).numpy()
    assert labels.shape == (10, 16, 16)
    np.testing.assert_array_equal(labels[decided], expected.argmax(dim=1).numpy()[decided])


def test_segment_series_upsamples_each_slices_scores_to_the_series_grid():
    torch.manual_seed(1)
    model = build_model(3)
    volume = np.random.default_rng(1).normal(0, 100, (5, 48, 40)).astype(np.float32)
    series = Series(uid="1.2.3", patient_id="P", modality="CT", sop_uids=[], volume=volume, spacing=(3.0, 1.0, 1.0),
                    origin=np.zeros(3), orientation=np.array([1.0, 0, 0, 0, 1, 0]))
    preprocessing = Preprocessing.from_config(run_config({"image-size": 16, "spacing": 0}))  # whole slices: one window each
    mask = segment_series(model, series, preprocessing, torch.device("cpu"), batch=2)
    scores = F.interpolate(_one_by_one(model, prepare_image(series, preprocessing)), size=(48, 40), mode="bilinear", align_corners=False)
    decided = _decided(scores).numpy()
    assert mask.shape == volume.shape and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask[decided], scores.argmax(dim=1).numpy()[decided])


def test_a_slice_larger_than_a_patch_is_scored_in_patch_sized_windows_that_cover_it():
    """The model only ever sees patches of the training size; where windows overlap, their scores are
    blended, so a model that scores each pixel by itself gives the same scores as on the whole slice."""
    image = np.random.default_rng(2).random((3, 1, 40, 56), dtype=np.float32)
    model = _Sizes()
    logits = slice_logits(model, image, 16, torch.device("cpu"), batch=8)
    assert logits.shape == (3, 3, 40, 56) and set(model.shapes) == {(16, 16)}
    whole = torch.cat([torch.full_like(torch.as_tensor(image), 0.5), torch.as_tensor(image), 1 - torch.as_tensor(image)], dim=1)
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-5)


def test_overlapping_windows_are_blended_with_gaussian_weights_and_edges_padded_by_replication():
    """A model that sees its neighbourhood (a 5x5 mean): inside, each window's scores differ at its
    borders (zero padding inside the model), so the blend is what MONAI's Gaussian weighting makes of
    them; at the slice's edges, what replication padding makes. Its own sliding window, computed here
    from the windows MONAI's helpers place, must agree."""
    from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size

    model = _mean_model()
    image = np.random.default_rng(4).random((1, 1, 40, 28), dtype=np.float32)
    got = slice_logits(model, image, 16, torch.device("cpu"))
    roi = get_valid_patch_size((40, 28), (16, 16))
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125)
    total, norm = torch.zeros(1, 3, 40, 28), torch.zeros(1, 1, 40, 28)
    with torch.no_grad():
        for rows, cols in dense_patch_slices((40, 28), roi, (12, 12)):
            window = torch.as_tensor(image)[..., rows, cols]
            total[..., rows, cols] += model(window) * weight
            norm[..., rows, cols] += weight
    torch.testing.assert_close(got, total / norm, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, model(torch.as_tensor(image)).detach(), atol=1e-3)  # windows, not the whole slice at once


def test_a_slice_smaller_than_a_patch_is_padded_by_its_edge_and_cropped_back():
    image = np.random.default_rng(3).random((2, 1, 10, 12), dtype=np.float32)
    model = _Sizes()
    logits = slice_logits(model, image, 16, torch.device("cpu"))
    assert logits.shape == (2, 3, 10, 12) and set(model.shapes) == {(16, 16)}
    torch.testing.assert_close(logits[:, 1], torch.as_tensor(image[:, 0]), rtol=1e-4, atol=1e-5)
    mean = _mean_model()  # at the edges, the padding shows: the slice's own edge pixels, repeated, as training pads
    replicated = torch.nn.functional.pad(torch.as_tensor(image), (2, 2, 3, 3), mode="replicate")
    with torch.no_grad():
        expected = mean(replicated)[..., 3:13, 2:14]
    torch.testing.assert_close(slice_logits(mean, image, 16, torch.device("cpu")), expected, rtol=1e-4, atol=1e-5)


def test_the_model_grid_is_the_series_at_the_runs_spacing_whatever_its_matrix():
    volume = np.zeros((2, 96, 128), np.float32)
    at_4mm = Preprocessing.from_config(run_config({"spacing": 4.0}))
    assert at_4mm.grid(_series(volume, 3.0)) == (72, 96)  # 288 x 384 mm
    assert at_4mm.grid(_series(np.zeros((2, 192, 256), np.float32), 1.5)) == (72, 96)  # the same field of view, finer matrix
    assert prepare_image(_series(volume, 3.0), at_4mm).shape == (2, 1, 72, 96)
    whole = Preprocessing.from_config(run_config({"spacing": 0, "image-size": 32}))
    assert whole.grid(_series(volume, 3.0)) == (32, 32)
    with pytest.raises(ValueError, match="at most 2048 a side"):  # refused before anything is allocated
        Preprocessing.from_config(run_config({"spacing": 0.25})).grid(_series(np.zeros((1, 1200, 1200), np.float32), 0.5))


def test_predict_upsamples_a_series_to_its_checkpoints_spacing_but_not_to_many_times_its_pixels():
    coarse = _series(np.zeros((8, 40, 40), np.float32), 9.4)  # the tiny built-in CT: 94² at 4 mm, 5.5x, within the floor
    check_growth(coarse, Preprocessing.from_config(run_config({"spacing": 4.0})))
    ct = _series(np.zeros((500, 512, 512), np.float32), 0.7)
    check_growth(ct, Preprocessing.from_config(run_config({"spacing": 0.4})))  # 3.1x its pixels: allowed
    with pytest.raises(ValueError, match="more than 4x its own"):  # a hostile checkpoint's 0.3 mm: 5.4x, ~2.8 GB more, refused
        segment_series(build_model(3), ct, Preprocessing.from_config(run_config({"spacing": 0.3})), torch.device("cpu"))


@pytest.mark.parametrize("bad", [-1, 0.1, 20.5, "nan", "inf"])
def test_a_spacing_outside_what_a_site_can_hold_is_refused_with_what_is_expected(bad):
    with pytest.raises(ValueError, match="spacing must be 0 or 0.25 to 20 mm"):
        run_config({"spacing": bad})


def test_a_training_patch_centres_the_class_it_is_drawn_for_and_pads_a_small_slice_by_its_edge():
    mask = np.zeros((60, 80), np.uint8)
    mask[50:53, 70:73] = 2  # a lesion near a corner
    image = np.arange(60 * 80, dtype=np.float32).reshape(1, 60, 80)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        patch, labels = _patch(image, mask, 32, 2, generator)
        assert patch.shape == (1, 32, 32) and labels.shape == (32, 32) and (labels == 2).sum() == 9  # inside the slice, lesion whole
        y, x = divmod(int(patch[0, 0, 0]), 80)
        np.testing.assert_array_equal(labels, mask[y:y + 32, x:x + 32])  # a window of the slice, not resampled
    anywhere = {divmod(int(_patch(image, mask, 32, 0, generator)[0][0, 0, 0]), 80) for _ in range(20)}
    assert len(anywhere) > 10 and all(0 <= y <= 28 and 0 <= x <= 48 for y, x in anywhere)
    small, small_labels = _patch(image[:, :20, :24], mask[:20, :24] + 1, 32, 0, generator)
    assert small.shape == (1, 32, 32) and small_labels.shape == (32, 32) and (small_labels == 1).all()
    assert small[0, 0, 0] == image[0, 0, 0] and small[0, -1, -1] == image[0, 19, 23]  # edge pixels repeated


def test_a_long_series_is_scored_a_batch_of_slices_at_a_time(monkeypatch):
    """The sliding window keeps the scores of all it is given: `native_labels` gives it `batch` slices
    at a time, so neither grid's scores are held for a whole long series."""
    import common.inference

    given = []
    real = common.inference.slice_logits
    monkeypatch.setattr(common.inference, "slice_logits", lambda model, image, *args, **kw: given.append(len(image)) or real(model, image, *args, **kw))
    image = np.random.default_rng(6).random((10, 1, 20, 20), dtype=np.float32)
    labels = native_labels(_Sizes(), image, (30, 30), 16, torch.device("cpu"), batch=4)
    assert given == [4, 4, 2] and labels.shape == (10, 30, 30)
