"""Model weights <-> arrays: the only arrays that ever leave a site."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def model_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict on the CPU as numpy arrays, in the model's own order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's state dict, on the CPU, as a Flower ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load received weights; a missing, extra, mis-shaped or non-finite array is an error, never ignored."""
    expected = model.state_dict()
    if set(arrays) != set(expected):
        raise ValueError("weights do not match the model's names")
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(expected[name].shape) or not np.isfinite(array).all():
            raise ValueError(f"weight {name} has the wrong shape or non-finite values")
    model.load_state_dict({k: torch.as_tensor(np.ascontiguousarray(v)).to(expected[k].dtype) for k, v in arrays.items()}, strict=True)
