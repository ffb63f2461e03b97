"""The site policy: what this hospital allows, whatever a run asks for. A TOML file the site owns
(`SITE_DIR/site_policy.toml`); the site guard checks every request against it and answers anything
outside it with a fixed refusal code, never with text derived from the data."""

from __future__ import annotations

import math
import secrets
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tomli_w


class PolicyError(ValueError):
    """The policy file is missing a value, or a value is out of range."""


@dataclass(frozen=True)
class SitePolicy:
    epsilon_budget: float = 8.0  # patient-level ε, over every run this site ever joins
    delta: float = 1e-5  # fixed here, never taken from the server; 0 < δ < 1 / patients
    min_noise_multiplier: float = 0.5  # no round trains with less noise than this
    allow_non_private: bool = False  # ε = ∞ baselines only on synthetic/research data
    max_rounds_per_run: int = 100
    slices_per_patient: int = 4  # each sampled patient contributes this many of its slices
    min_spacing_mm: float = 1.0  # the finest in-plane pixel spacing a run may ask (0, whole slices, always allowed): memory grows as its inverse square
    classes: tuple[str, ...] = ("organ", "lesion")  # what runs may ask to segment
    validation_fraction: float = 0.25
    validation_key: str = ""  # secret: which patients validate (hex); made at creation
    validations_per_round: int = 1
    untrained_validations_per_day: int = 4  # of weights not trained here in that run (round 0, after a resume), all runs together
    validations_per_day: int = 48  # every validation, all runs together: rounded metrics are not noised, their number is the bound
    metrics: tuple[str, ...] = ("dice", "dice-per-class", "hd95")  # what validation may release
    precision: int = 2  # decimals of every released metric
    example_count_bin: int = 10  # training is planned on (and the count released as) a multiple of this; and the fewest SEGs that release a class's codes
    ledger_genesis: str = ""  # the hash of this site's ledger's first line: a replaced ledger is caught

    def __post_init__(self) -> None:
        checks = {
            "epsilon_budget must be > 0": self.epsilon_budget > 0,
            "delta must be in (0, 1)": 0 < self.delta < 1,
            "min_noise_multiplier must be >= 0": self.min_noise_multiplier >= 0,
            "max_rounds_per_run must be >= 1": self.max_rounds_per_run >= 1,
            "slices_per_patient must be >= 1": self.slices_per_patient >= 1,
            "min_spacing_mm must be >= 0": self.min_spacing_mm >= 0,
            "classes must name at least one class": bool(self.classes),
            "validation_fraction must be in [0, 1)": 0 <= self.validation_fraction < 1,
            "validations_per_round must be >= 1": self.validations_per_round >= 1,
            "untrained_validations_per_day must be >= 0": self.untrained_validations_per_day >= 0,
            "validations_per_day must be >= 1": self.validations_per_day >= 1,
            "precision must be 0..6": 0 <= self.precision <= 6,
            "example_count_bin must be >= 1": self.example_count_bin >= 1,
            "metrics may be dice, dice-per-class, iou, hd95": set(self.metrics) <= {"dice", "dice-per-class", "iou", "hd95"},
        }
        bad = [what for what, ok in checks.items() if not ok]
        if bad:
            raise PolicyError("site policy: " + "; ".join(bad))

    @property
    def split_key(self) -> bytes:
        return bytes.fromhex(self.validation_key)

    def check_patients(self, num_patients: int) -> None:
        """δ must be below 1 / patients, or the guarantee allows releasing one patient whole."""
        if num_patients and self.delta >= 1.0 / num_patients:
            raise PolicyError(f"site policy: delta {self.delta:g} must be below 1 / {num_patients} training patients")

    def release(self, value: float) -> float:
        return round(float(value), self.precision) if math.isfinite(value) else float(value)

    def binned(self, count: int) -> int:
        """A validation count as released: rounded up to the bin."""
        return self.example_count_bin * max(1, math.ceil(count / self.example_count_bin))

    def planned_count(self, count: int, private: bool = True) -> int:
        """The training patient count a round is planned on: rounded down to the bin, one bin at least,
        so σ, ε, the update's scale and the example count released with it (this count, private or not)
        say the bin, never the exact count. Patients are sampled at the rate planned on it, which is what
        the accountant is told; a site below one bin samples, and divides, as if it held a full bin: its
        update is smaller, not riskier. A non-private round (a baseline, when the policy allows one) is
        planned on the exact count: its un-noised update claims no privacy to keep."""
        return self.example_count_bin * max(1, count // self.example_count_bin) if private else count

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise PolicyError(f"cannot read the site policy {path}: {err}") from err
        known = {f.name for f in fields(cls)}
        if set(raw) - known:
            raise PolicyError(f"site policy {path}: unknown keys {sorted(set(raw) - known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        policy = cls(**values)
        if not policy.validation_key:
            raise PolicyError(f"site policy {path}: validation_key is missing")
        return policy

    def save(self, path: Path) -> None:
        """Written once, when the site is set up; the hospital edits it, fedseg never rewrites it."""
        if path.exists():
            raise FileExistsError(f"{path} exists: fedseg never overwrites a site policy")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        path.write_text("# fedseg site policy: what this site allows, whatever a run asks for. Review with your privacy officer.\n"
                        + tomli_w.dumps(data))
        path.chmod(0o600)


def new_policy(**values) -> SitePolicy:
    """Defaults plus the given values, with a fresh secret validation key."""
    return SitePolicy(**{"validation_key": secrets.token_hex(16), **values})
