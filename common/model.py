"""The shared segmenter: MONAI's 2D BasicUNet, configured so Opacus can compute per-sample gradients.

GroupNorm instead of BatchNorm (batch statistics would mix samples and break DP), no in-place
activations (they break Opacus' backward hooks), interpolation + conv instead of transposed convs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import BasicUNet

from common.class_codes import Coding, from_stored
from common.config import class_names

FEATURES = (8, 16, 32, 64, 128, 8)


def build_model(num_classes: int) -> torch.nn.Module:
    """A small U-Net: ~0.45 M parameters, fast enough for DP-SGD on a 2-core CPU."""
    return BasicUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=num_classes,
        features=FEATURES,
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=("group", {"num_groups": 4}),
        upsample="nontrainable",
        dropout=0.0,
    )


def pick_device() -> torch.device:
    """The site's GPU when it has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class GlobalModel:
    """A global-model checkpoint ready to segment: the network, its run config, what identifies it, and
    what its classes are in codes, as the sites' SEGs coded them ({} for a checkpoint
    without: older runs, NIfTI-labelled sites)."""

    model: torch.nn.Module
    config: dict[str, Any]
    round: int
    sha256: str
    path: Path
    class_codes: dict[str, Coding] = field(default_factory=dict)


def load_global_model(path: str | Path) -> GlobalModel:
    """A checkpoint written by the server (a file, or a run folder's global_model.pt); loads without
    unpickling code, and its hash names the exact weights in every output."""
    path = Path(path)
    if path.is_dir():
        path = path / "global_model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no global model checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = dict(state["config"])
    model = build_model(len(class_names(config)))
    model.load_state_dict(state["state_dict"])
    return GlobalModel(model.eval(), config, int(state["round"]), hashlib.sha256(path.read_bytes()).hexdigest(), path,
                       from_stored(state.get("class_codes")))
