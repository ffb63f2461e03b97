"""Model weights <-> Flower ArrayRecord: the only arrays that ever leave a site."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord


def to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's state dict, on the CPU, as a Flower ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load received weights; a missing, extra or mis-shaped array is an error, never ignored."""
    state = arrays.to_torch_state_dict()
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = set(expected) - set(state), set(state) - set(expected)
        raise ValueError(f"weights do not match the model: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
