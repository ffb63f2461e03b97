"""The run configuration: one set of defaults for the ServerApp, `fedseg simulate` and the CLI.

`pyproject.toml`'s `[tool.flwr.app.config]` mirrors `RUN_DEFAULTS` (a test keeps them equal), so a
`flwr run` deployment and a local simulation start from the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RUN_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 12,
    "local-epochs": 2,
    "batch-size": 16,
    "learning-rate": 0.05,
    "momentum": 0.9,
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "server-learning-rate": 0.01,
    "min-sites": 2,
    "fraction-train": 1.0,
    "target-epsilon": 8.0,
    "noise-multiplier": 0.0,
    "max-grad-norm": 1.0,
    "delta": 1e-5,
    "image-size": 64,
    "classes": "organ,lesion",
    "val-fraction": 0.25,
    "seed": 0,
    "round-timeout": 3600.0,
    "round-retries": 2,
    "max-update-norm-ratio": 10.0,
    "trim-fraction": 0.2,
    "byzantine-sites": 0,
    "run-dir": "",
    "resume": False,
}

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
# What a resumed run may change; everything else comes from the interrupted run's own record.
RESUMABLE = ("num-server-rounds", "round-timeout", "round-retries", "min-sites", "run-dir", "resume")


@dataclass(frozen=True)
class TrainSettings:
    """What a site needs from the run config to train one round (sent by the server each round)."""

    server_round: int
    num_rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    proximal_mu: float
    target_epsilon: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    seed: int

    @property
    def private(self) -> bool:
        """DP is off only when the run asks for ε = ∞ and no explicit noise."""
        return self.noise_multiplier > 0 or math.isfinite(self.target_epsilon)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainSettings:
        return cls(
            server_round=int(config.get("server-round", 1)),
            num_rounds=int(config["num-server-rounds"]),
            local_epochs=int(config["local-epochs"]),
            batch_size=int(config["batch-size"]),
            learning_rate=float(config["learning-rate"]),
            momentum=float(config["momentum"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            target_epsilon=float(config["target-epsilon"]),
            noise_multiplier=float(config["noise-multiplier"]),
            max_grad_norm=float(config["max-grad-norm"]),
            delta=float(config["delta"]),
            seed=int(config["seed"]),
        )


def run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overlaid with the given values; unknown keys are a mistake, not a silent no-op."""
    merged = dict(RUN_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in RUN_DEFAULTS:
            raise KeyError(f"unknown run config key {key!r}; known keys: {sorted(RUN_DEFAULTS)}")
        kind = type(RUN_DEFAULTS[key])
        if kind is bool and isinstance(value, str):  # bool("false") is True
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            value = value.lower() == "true"
        merged[key] = kind(value)
    if merged["strategy"] not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {merged['strategy']!r}")
    return merged


def class_names(config: Mapping[str, Any]) -> list[str]:
    """Foreground class names; index 0 is always background."""
    return ["background"] + [c.strip() for c in str(config["classes"]).split(",") if c.strip()]
