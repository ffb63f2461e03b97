"""The 2D model over a volume (MONAI's SliceInferer) against the model applied to one slice at a time."""

import numpy as np
import torch
import torch.nn.functional as F

from common.config import run_config
from common.dataset import Preprocessing, prepare_image
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
    logits = slice_logits(model, image, torch.device("cpu"), batch=4)
    assert model.batches == [4, 4, 2]  # a long series never goes to the device whole
    expected = _one_by_one(model.model, image)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    labels = native_labels(model.model, image, (16, 16), torch.device("cpu"))  # on the model's own grid: no resampling
    decided = _decided(expected).numpy()
    assert labels.shape == (10, 16, 16)
    np.testing.assert_array_equal(labels[decided], expected.argmax(dim=1).numpy()[decided])


def test_segment_series_upsamples_each_slices_scores_to_the_series_grid():
    torch.manual_seed(1)
    model = build_model(3)
    volume = np.random.default_rng(1).normal(0, 100, (5, 48, 40)).astype(np.float32)
    series = Series(uid="1.2.3", patient_id="P", modality="CT", sop_uids=[], volume=volume, spacing=(3.0, 1.0, 1.0),
                    origin=np.zeros(3), orientation=np.array([1.0, 0, 0, 0, 1, 0]))
    preprocessing = Preprocessing.from_config(run_config({"image-size": 16}))
    mask = segment_series(model, series, preprocessing, torch.device("cpu"), batch=2)
    scores = F.interpolate(_one_by_one(model, prepare_image(series, preprocessing)), size=(48, 40), mode="bilinear", align_corners=False)
    decided = _decided(scores).numpy()
    assert mask.shape == volume.shape and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask[decided], scores.argmax(dim=1).numpy()[decided])
