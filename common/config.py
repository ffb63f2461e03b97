"""The run configuration: one declaration per key, from which come the defaults (for the ServerApp,
`fedseg simulate` and the CLI), the `fedseg run`/`simulate` flags (server/run_options.py), the keys
sent to sites, the keys a resumed run may change, and a site's TrainSettings. The values a flag or
pyproject cannot check by type alone (a choice, the CT window) are checked in `run_config`.

`pyproject.toml`'s `[tool.flwr.app.config]` mirrors `RUN_DEFAULTS` (a test keeps them equal), so a
`flwr run` deployment and a local simulation start from the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints


@dataclass(frozen=True)
class Option:
    """One run-config key. Its value type is its default's type. `flag` is its `fedseg run`/`simulate`
    option (None: set in pyproject.toml or by the command itself), `help` that flag's help (argparse
    expands %(default)s), `metavar` its value's name there. `to_sites`: part of what each site is sent
    every round. `resumable`: a resumed run may change it; the rest comes from the run's own record."""

    default: Any
    help: str = ""
    flag: str | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    to_sites: bool = False
    resumable: bool = False


IMAGE_SIZES = (16, 512)  # pixels a patch side may be
MR_INTENSITY = ("z-score", "percentiles")  # how an MR volume is normalised: by its own mean and sd, or 1st-99th percentiles
SPACING_BOUNDS = (0.25, 20.0)  # mm a pixel may be at the model (besides 0): finer needs GBs for a CT, coarser loses organs
HU_BOUNDS = (-2048.0, 4096.0)  # what a CT window may span: the lung window reaches -1350 HU, bone +1500 and more
CLASS_WEIGHTS = (0.001, 1000.0)  # what a class's loss weight may be: a smaller one is 0 in a float32 loss, or near it
MIN_CT_WIDTH = 10.0  # HU: narrower than any clinical window; a width near float32's resolution gives NaN images
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")

OPTIONS: dict[str, Option] = {
    "num-server-rounds": Option(12, "federated rounds", flag="rounds", to_sites=True, resumable=True),
    "local-epochs": Option(2, "expected passes over a site's training patients per round", flag="local-epochs", to_sites=True),
    "batch-size": Option(16, "expected patients per DP-SGD step (Poisson sampling)", flag="batch-size", to_sites=True),
    "learning-rate": Option(0.05, "sites' SGD learning rate in round 1 (cosine decay to 0.1x over the run)", flag="learning-rate", to_sites=True),
    "momentum": Option(0.9, to_sites=True),
    "strategy": Option("fedavg", flag="strategy", choices=STRATEGIES),
    "proximal-mu": Option(0.01),  # FedProx sends it to sites itself
    "server-learning-rate": Option(0.01),
    "min-sites": Option(2, resumable=True),  # each command has its own --min-sites (simulate: all sites)
    "fraction-train": Option(1.0),
    "target-epsilon": Option(8.0, "target patient-level ε for the whole run, per site; 'inf' turns DP off (baseline)",
                             flag="epsilon", to_sites=True),
    "noise-multiplier": Option(0.0, "fixed DP-SGD noise multiplier instead of calibrating to --epsilon",
                               flag="noise-multiplier", to_sites=True),
    "max-grad-norm": Option(1.0, "DP-SGD clipping norm of one patient's gradient", flag="max-grad-norm", to_sites=True),
    "delta": Option(1e-5, "δ the run asks for; a deployed site uses its own policy's", flag="delta", to_sites=True),
    # The model works at one physical pixel size, whatever each scanner's field of view: a structure is
    # as many pixels wide at every site, and a large series is covered by patches, not shrunk.
    "spacing": Option(4.0, "in-plane pixel spacing in mm the model works at: each slice is resampled to it (0: each slice "
                      "is resampled whole to --image-size, whatever its field of view; default %(default)s)",
                      flag="spacing", metavar="MM", to_sites=True),
    # MR has no absolute intensity scale: each volume is normalised by its own statistics. Recorded so a
    # model trained before z-scoring (its 1st-99th percentiles: a config without the key) is prepared as it was.
    "mr-intensity": Option("z-score", choices=MR_INTENSITY, to_sites=True),
    "image-size": Option(64, "side in pixels of the patches the model trains on (crops of the resampled slices) and slides "
                         "over a slice in prediction (default %(default)s)", flag="image-size", to_sites=True),
    # Chosen by the coordinator for the task (the default: abdominal soft tissue; bone: -200,1500), the
    # same for every patient and independent of the data: it costs no privacy.
    "ct-window": Option("-160,240", "CT intensity window in HU, mapped to [0, 1] (MR: each volume z-scored by its own statistics); "
                        "a negative LOW needs '=': --ct-window=-200,1500 (default %(default)s)",
                        flag="ct-window", metavar="LOW,HIGH", to_sites=True),
    # The loss weight of each class is the task's, chosen by the coordinator: the same for every patient
    # and independent of the data, it costs no privacy. Unweighted, the small lesion was never learned;
    # weighted, grey matter was lost to white matter (README).
    "classes": Option("organ:1,lesion:10", "foreground classes, matched to SEG segment labels, each with an optional "
                      "loss weight NAME:WEIGHT (1 when not given, as background's; default %(default)s)",
                      flag="classes", metavar="NAME[:WEIGHT],...", to_sites=True),
    "val-fraction": Option(0.25, to_sites=True),
    "seed": Option(0, "initialisation and augmentation (never DP noise or sampling: those are seeded by the OS)", flag="seed", to_sites=True),
    "round-timeout": Option(3600.0, "seconds to wait for sites' replies (and for enough sites to be online) per round",
                            flag="round-timeout", resumable=True),
    "round-retries": Option(2, "times a round is retried when fewer than --min-sites usable updates came back",
                            flag="round-retries", resumable=True),
    "max-update-norm-ratio": Option(10.0, "reject an update whose norm exceeds this many times the other sites' median (0: off)",
                                    flag="max-update-norm-ratio"),
    "trim-fraction": Option(0.2, "fedtrimmedavg: fraction cut at each end", flag="trim-fraction"),
    "byzantine-sites": Option(0, "krum, fedmedian, fedtrimmedavg: sites assumed malicious (at least 1 is always assumed)",
                              flag="byzantine-sites"),
    "run-dir": Option("", resumable=True),
    "resume": Option(False, resumable=True),
}

RUN_DEFAULTS: dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}
SITE_KEYS = tuple(key for key, option in OPTIONS.items() if option.to_sites)
RESUMABLE = tuple(key for key, option in OPTIONS.items() if option.resumable)


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What a site needs from the run config to train one round (sent by the server each round). Each
    field reads the key of its name with dashes (or its `key` metadata), cast to the field's type."""

    server_round: int
    num_rounds: int = field(metadata={"key": "num-server-rounds"})
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    proximal_mu: float = 0.0  # only FedProx sends it
    target_epsilon: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    seed: int
    classes: str  # with their loss weights (`class_weights`)

    @property
    def class_weights(self) -> list[float]:
        """The loss weight of each class, background first (a malformed `classes` is a ValueError)."""
        return class_weights({"classes": self.classes})

    @property
    def private(self) -> bool:
        """DP is off only when the run asks for ε = ∞ and no explicit noise."""
        return self.noise_multiplier > 0 or math.isfinite(self.target_epsilon)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainSettings:
        """The settings in `config`; a missing key without a default is a TypeError, a bad value a ValueError."""
        types = get_type_hints(cls)
        keys = {f.name: f.metadata.get("key", f.name.replace("_", "-")) for f in fields(cls)}
        return cls(**{name: types[name](config[key]) for name, key in keys.items() if key in config})


def run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overlaid with the given values; unknown keys are a mistake, not a silent no-op."""
    merged = dict(RUN_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in OPTIONS:
            raise KeyError(f"unknown run config key {key!r}; known keys: {sorted(OPTIONS)}")
        kind = type(OPTIONS[key].default)
        if kind is bool and isinstance(value, str):  # bool("false") is True
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            value = value.lower() == "true"
        merged[key] = kind(value)
    for key, option in OPTIONS.items():
        if option.choices and merged[key] not in option.choices:
            raise ValueError(f"{key} must be one of {option.choices}, got {merged[key]!r}")
    parse_ct_window(merged["ct-window"])
    parse_spacing(merged["spacing"])
    # Written out with every weight, so a run's record says what it trained with: a weightless list
    # in a history is a run from before per-class weights (server/run_record.py resumes it as it ran).
    merged["classes"] = ",".join(f"{name}:{weight:.12g}" for name, weight in class_spec(merged))
    return merged


def parse_ct_window(text: str) -> tuple[float, float]:
    """'LOW,HIGH' in HU -> (LOW, HIGH); anything else (not two finite numbers, narrower than
    MIN_CT_WIDTH, outside HU_BOUNDS) is a ValueError that says what is expected."""
    try:
        low, high = (float(part) for part in str(text).split(","))
    except ValueError:
        low = high = math.nan
    if not (HU_BOUNDS[0] <= low < high <= HU_BOUNDS[1] and high - low >= MIN_CT_WIDTH):  # False for NaN
        raise ValueError(f"ct-window must be 'LOW,HIGH' in HU with {HU_BOUNDS[0]:g} <= LOW, LOW + {MIN_CT_WIDTH:g} <= HIGH "
                         f"<= {HU_BOUNDS[1]:g}, got {text!r}")
    return low, high


def parse_spacing(value: Any) -> float:
    """The model's in-plane pixel spacing in mm: 0 (each slice resampled whole to the image size) or
    within SPACING_BOUNDS; anything else is a ValueError that says what is expected."""
    try:
        spacing = float(value)
    except (TypeError, ValueError):
        spacing = math.nan
    if not (spacing == 0 or SPACING_BOUNDS[0] <= spacing <= SPACING_BOUNDS[1]):  # False for NaN
        raise ValueError(f"spacing must be 0 or {SPACING_BOUNDS[0]:g} to {SPACING_BOUNDS[1]:g} mm, got {value!r}")
    return spacing


def class_spec(config: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(name, loss weight) of each foreground class of `config["classes"]`, a string 'NAME[:WEIGHT],...'
    (weight 1 when not given). Anything else — no class, an empty or repeated name, a weight outside
    CLASS_WEIGHTS — is a ValueError that says what is expected."""
    text = config["classes"]
    spec = []
    for part in (p for p in str(text).split(",") if p.strip()):
        name, given, number = (s.strip() for s in part.partition(":"))
        try:
            weight = float(number) if given else 1.0
        except ValueError:
            weight = math.nan
        spec.append((name, weight))
    names = [name for name, _ in spec]
    low, high = CLASS_WEIGHTS
    if (not isinstance(text, str) or not spec or not all(names) or len(set(names)) != len(names)
            or not all(low <= weight <= high for _, weight in spec)):  # False for NaN
        raise ValueError(f"classes must be 'NAME[:WEIGHT],...': at least one, each name once, {low:g} <= WEIGHT <= {high:g}; got {text!r}")
    return spec


def class_names(config: Mapping[str, Any]) -> list[str]:
    """Foreground class names; index 0 is always background."""
    return ["background"] + [name for name, _ in class_spec(config)]


def class_weights(config: Mapping[str, Any]) -> list[float]:
    """Each class's loss weight, background (1) first."""
    return [1.0] + [weight for _, weight in class_spec(config)]
