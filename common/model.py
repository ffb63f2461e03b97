"""The shared segmenter: MONAI's 2D BasicUNet, configured so Opacus can compute per-sample gradients.

GroupNorm instead of BatchNorm (batch statistics would mix samples and break DP), no in-place
activations (they break Opacus' backward hooks), interpolation + conv instead of transposed convs.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet

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
