"""The site guard: the only code that reads the site's data, privacy ledger and policy.

It is installed and configured by the hospital, loads and preprocesses the data once and stays warm.
It offers two operations — train (global weights → DP-SGD weights + minimal metrics) and validate
(global weights → rounded metrics) — and checks every request against the site policy. Anything
outside the policy is refused with a fixed code (`REFUSALS`); errors leave as codes too, with the
detail in the site's own log. Every release and refusal is a line of the hash-chained ledger before
the answer leaves. A deployed site serves it over a Unix socket (`client.guard_socket`) to the
courier ClientApp, which runs as another OS user; a simulation serves it the same way, one process per
site (simulations/site_guards.py).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from client.privacy_ledger import LedgerError, PrivacyLedger
from client.site_policy import SitePolicy
from client.site_state import SiteState
from client.training import RoundPlan, evaluate, plan_round, train_round
from common.array_codec import Arrays, arrays_sha256
from common.class_codes import Pair, releasable
from common.config import TrainSettings, class_names
from common.dataset import Preprocessing, SiteData, load_site
from common.model import build_model, pick_device
from common.parameters import load_arrays, model_arrays
from common.site_reply import VALIDATE_RECEIVED

log = logging.getLogger(__name__)

REFUSALS = {
    "bad_request": "the request is malformed or names an unknown operation",
    "weights_mismatch": "the weights do not fit the model (names, shapes) or are not finite",
    "class_not_in_policy": "the run asks for a class the site policy does not list",
    "delta_above_policy": "the run asks for a larger δ than the site policy allows",
    "non_private_not_allowed": "the run asks to train without DP; the site policy does not allow it",
    "noise_below_policy": "the run's noise multiplier is below the site policy's minimum",
    "rounds_over_policy": "the run has more rounds than the site policy allows per run",
    "spacing_below_policy": "the run asks for a finer pixel spacing than the site policy allows",
    "budget_exhausted": "training would take the site past its ε budget",
    "validation_limit": "validation not allowed now (once per trained round; weights not trained here: a few a day)",
    "data_unusable": "the site's data could not be loaded for this request (detail in the site's log)",
    "internal_error": "the site failed (detail in the site's log)",
}
RUN_ID = re.compile(r"[\w.-]{1,128}")
# What a request may ask at all, whatever the policy: anything else is a malformed request (NaN, ∞
# where not meant, absurd sizes that would hang the accountant or burn budget for nothing).
RANGES = {"batch_size": (1, 10_000), "local_epochs": (1, 100), "num_rounds": (1, 10_000), "learning_rate": (1e-8, 10.0),
          "momentum": (0.0, 0.999), "proximal_mu": (0.0, 100.0), "noise_multiplier": (0.0, 50.0),
          "max_grad_norm": (1e-6, 100.0), "delta": (1e-300, 1.0), "seed": (0, 2**62)}


class Refusal(Exception):
    """A request the guard will not serve; only the code leaves the site."""

    def __init__(self, code: str) -> None:
        assert code in REFUSALS, code
        super().__init__(code)
        self.code = code


class SiteGuard:
    def __init__(self, name: str, data_dir: str | Path, policy: SitePolicy, ledger: PrivacyLedger,
                 device: torch.device | None = None) -> None:
        self.name, self.data_dir, self.policy, self.ledger = name, str(data_dir), policy, ledger
        self.device = device or pick_device()

    def load(self, classes: tuple[str, ...], preprocessing: Preprocessing) -> SiteData:
        """The site's data as the run needs it, loaded once per (classes, preprocessing) and kept warm.
        Raises ValueError/OSError with the full detail: for the site's own console and log only."""
        data = load_site(self.data_dir, classes, preprocessing, self.policy.validation_fraction, self.policy.split_key)
        if not data.train:
            raise ValueError(f"site folder {self.data_dir} has no training patients (all {len(data.validation)} validate)")
        self.policy.check_patients(len(data.train))
        return data

    def data(self, classes: tuple[str, ...], preprocessing: Preprocessing) -> SiteData:
        """`load` for a request: what went wrong stays in the site's log, only the code leaves."""
        try:
            return self.load(classes, preprocessing)
        except (OSError, ValueError) as err:
            log.error("%s: the data cannot be used for classes %s with %s: %s", self.name, classes, preprocessing, err)
            raise Refusal("data_unusable") from err

    def handle(self, header: Mapping[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        """One request → (reply header, arrays). Never raises: refusals and failures are codes.
        A train request with `validate-received` first validates the weights it brings (the previous
        round's global model), saving the round a message; that answer rides along as `validation`."""
        settings, server_round = header.get("settings"), header.get("round")
        validation = None
        if (header.get("op") == "train" and isinstance(settings, Mapping) and settings.get(VALIDATE_RECEIVED) is True
                and type(server_round) is int and server_round >= 1):
            validation, _ = self._serve({**header, "op": "validate", "round": server_round - 1}, arrays)
        reply, out = self._serve(header, arrays)
        if validation is not None:
            reply["validation"] = {k: validation[k] for k in ("status", "code", "metrics")}
        return reply, out

    def _serve(self, header: Mapping[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        op, run, server_round = header.get("op"), str(header.get("run", ""))[:128], header.get("round")
        try:
            if (op not in ("train", "validate") or type(server_round) is not int or not isinstance(header.get("settings"), Mapping)
                    or not RUN_ID.fullmatch(run)):
                raise Refusal("bad_request")
            return (self.train if op == "train" else self.validate)(run, server_round, header["settings"], arrays)
        except Refusal as refusal:
            self._refused(op, run, server_round, refusal.code)
            return {"status": "refused", "code": refusal.code, "site": self.name, "metrics": {}}, {}
        except Exception:  # noqa: BLE001 — nothing the data says may leave: the code does, the trace stays here
            log.exception("%s: %s request failed", self.name, op)
            self._refused(op, run, server_round, "internal_error")
            return {"status": "error", "code": "internal_error", "site": self.name, "metrics": {}}, {}

    def _refused(self, op: Any, run: str, server_round: Any, code: str) -> None:
        log.warning("%s: refused %s (run %s, round %s): %s — %s", self.name, op, run, server_round, code, REFUSALS[code])
        try:
            with self.ledger.locked():
                self.ledger.append("refusal", run=run, round=server_round if isinstance(server_round, int) else None,
                                   request=op if op in ("train", "validate") else None, code=code)
        except (LedgerError, OSError):
            log.exception("%s: could not record a refusal in the ledger", self.name)

    def _settings(self, server_round: int, settings: Mapping[str, Any]) -> tuple[TrainSettings, tuple[str, ...], Preprocessing]:
        try:
            train = TrainSettings.from_config({**settings, "server-round": server_round})
            classes = tuple(class_names(settings))
            preprocessing = Preprocessing.from_config(settings)  # the CT window, spacing and patch size are range-checked here
        except (KeyError, TypeError, ValueError) as err:
            raise Refusal("bad_request") from err
        in_range = all(lo <= getattr(train, name) <= hi for name, (lo, hi) in RANGES.items())
        target_ok = train.target_epsilon == math.inf or 0.05 <= train.target_epsilon <= 100
        if not in_range or not target_ok or server_round < 0 or len(classes) < 2 or len(set(classes)) != len(classes):
            raise Refusal("bad_request")
        # From the request and the policy alone: a refusal that depended on the data (how large the
        # site's images would grow) would tell the coordinator about them.
        if 0 < preprocessing.spacing < self.policy.min_spacing_mm:
            raise Refusal("spacing_below_policy")
        if not set(classes[1:]) <= set(self.policy.classes):
            raise Refusal("class_not_in_policy")
        if not 0 < train.delta <= self.policy.delta:
            raise Refusal("delta_above_policy")
        return train, classes, preprocessing

    def _model(self, classes: tuple[str, ...], arrays: Arrays) -> torch.nn.Module:
        model = build_model(len(classes))
        try:
            load_arrays(model, arrays)
        except (ValueError, RuntimeError, TypeError) as err:
            raise Refusal("weights_mismatch") from err
        return model

    def plan(self, settings: TrainSettings, num_patients: int) -> RoundPlan:
        """The round's plan, checked against the policy; spends nothing."""
        if not settings.private and not self.policy.allow_non_private:
            raise Refusal("non_private_not_allowed")
        if settings.server_round < 1 or settings.num_rounds > self.policy.max_rounds_per_run or settings.server_round > settings.num_rounds:
            raise Refusal("rounds_over_policy")
        try:
            plan = plan_round(settings, self.policy.planned_count(num_patients, settings.private), self.policy.delta)
        except ValueError as err:  # Opacus cannot reach the target ε with any σ it tries
            raise Refusal("noise_below_policy") from err
        if settings.private and not self.policy.min_noise_multiplier <= plan.noise_multiplier <= RANGES["noise_multiplier"][1]:
            raise Refusal("noise_below_policy")
        return plan

    def train(self, run: str, server_round: int, request: Mapping[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        settings, classes, preprocessing = self._settings(server_round, request)
        data = self.data(classes, preprocessing)
        # From here: the site's work on the request (model, planning, training). A first load of the data
        # for these classes and preprocessing stays outside: the coordinator could force one, and its
        # time says how many files and patients the site holds.
        started = time.perf_counter()
        model = self._model(classes, arrays)
        plan = self.plan(settings, len(data.train))
        with self.ledger.locked():
            before = self.ledger.epsilon(self.policy.delta)
            planned = self.ledger.epsilon(self.policy.delta, [plan.event])
            if planned > self.policy.epsilon_budget:
                raise Refusal("budget_exhausted")
            loss = train_round(model, data.train, settings, plan, self.policy.slices_per_patient, preprocessing.image_size, self.device)
            out = model_arrays(model)
            # The training loss stays here: it is the chosen weights' loss on the patients, outside any ε.
            metrics = {"num-examples": self.policy.planned_count(len(data.train)), "epsilon": self.policy.release(planned), "noise-multiplier": round(plan.noise_multiplier, 2),
                       "seconds": round(time.perf_counter() - started, 1)}
            codes = self.class_codes(data)
            self.ledger.append("train", run=run, round=server_round, event=list(plan.event), delta=self.policy.delta,
                               unit="patient", epsilon_before=before, epsilon_after=planned,
                               received_sha256=arrays_sha256(arrays), released_sha256=arrays_sha256(out), metrics=metrics,
                               class_codes=codes)
        log.info("%s round %d: %d %s steps over %d patients (noise multiplier %.2f), train loss %.3f (not released), "
                 "patient-level ε %.2f of budget %g",
                 self.name, server_round, plan.steps, "DP-SGD" if plan.noise_multiplier else "non-private SGD",
                 len(data.train), plan.noise_multiplier, loss, planned, self.policy.epsilon_budget)
        return {"status": "ok", "code": "", "site": self.name, "metrics": metrics, "class_codes": codes}, out

    def class_codes(self, data: SiteData) -> dict[str, Pair]:
        """What each class is, as the site's SEGs code it: per class the (category, type) pair every SEG
        the site uses codes it with, when at least `example_count_bin` of them do, as segmentation
        property codes of pydicom's dictionary, never text from the files (`common.class_codes.releasable`).
        A class that releases nothing is named, with why, in the site's log only."""
        codes, withheld = releasable(data.report.class_codes if data.report else {}, self.policy.example_count_bin)
        for name, why in withheld.items():
            log.warning("%s: class %r: its codes are not released: %s", self.name, name, why)
        return codes

    def validate(self, run: str, server_round: int, request: Mapping[str, Any], arrays: Arrays) -> tuple[dict[str, Any], Arrays]:
        settings, classes, preprocessing = self._settings(server_round, request)
        data = self.data(classes, preprocessing)
        started = time.perf_counter()  # as for training: the data's first load stays outside
        model = self._model(classes, arrays)
        if not data.validation:
            raise Refusal("data_unusable")
        with self.ledger.locked():
            trained_here = self._trained(run, server_round)
            if not self._may_validate(run, server_round):
                raise Refusal("validation_limit")
            measured = evaluate(model, data, len(classes), self.device)
            metrics = self._released(measured)
            metrics.update({"num-examples": self.policy.binned(len(data.validation)), "seconds": round(time.perf_counter() - started, 1),
                            "epsilon": self.policy.release(self.ledger.epsilon(self.policy.delta))})
            self.ledger.append("validate", run=run, round=server_round, unix=time.time(), untrained=not trained_here,
                               received_sha256=arrays_sha256(arrays), metrics=metrics)
        log.info("%s round %d: validation Dice %.3f on %d patients", self.name, server_round, measured["dice"], len(data.validation))
        return {"status": "ok", "code": "", "site": self.name, "metrics": metrics}, {}

    def _may_validate(self, run: str, server_round: int) -> bool:
        """Once per (run, round), and at most `validations_per_day` site-wide: the run name comes
        from the courier and a trained round can be made almost free in ε (high σ, tiny batch), so
        only a daily count bounds how many chosen weights the coordinator can have scored. Weights
        not trained here in that round (round 0, the first round after a resume) have a smaller
        daily cap of their own."""
        done = [e for e in self.ledger.entries if e.get("run") == run and e.get("round") == server_round and e["kind"] == "validate"]
        if len(done) >= self.policy.validations_per_round:
            return False
        day_ago = time.time() - 86_400
        today = [e for e in self.ledger.entries if e["kind"] == "validate" and e.get("unix", 0) > day_ago]
        if len(today) >= self.policy.validations_per_day:
            return False
        if self._trained(run, server_round):
            return True
        return sum(_untrained(e) for e in today) < self.policy.untrained_validations_per_day

    def _trained(self, run: str, server_round: int) -> bool:
        return any(e["kind"] == "train" and e.get("run") == run and e.get("round") == server_round for e in self.ledger.entries)

    def _released(self, measured: Mapping[str, float]) -> dict[str, float]:
        """The metrics the policy lets leave, at its precision."""
        keep = set()
        for name in self.policy.metrics:
            keep |= {k for k in measured if k.startswith("dice-class")} if name == "dice-per-class" else {name}
        return {k: self.policy.release(v) for k, v in measured.items() if k in keep}

    def spent(self) -> float:
        return self.ledger.epsilon(self.policy.delta)


def _untrained(entry: Mapping[str, Any]) -> bool:
    """A validation of weights the site did not train in that run (ledgers before the flag: round 0)."""
    return bool(entry.get("untrained", entry.get("round") == 0))


def open_guard(state: SiteState, name: str, data_dir: str | Path, create_with: Mapping[str, Any] | None = None,
               device: torch.device | None = None) -> tuple[SiteGuard, bool]:
    """The site's guard over its policy and ledger; True when they were created just now."""
    policy, ledger, created = state.open(name, create_with)
    return SiteGuard(name, data_dir, policy, ledger, device), created


def budget_line(guard: SiteGuard) -> str:
    return (f"privacy ledger {guard.ledger.path}: patient-level ε spent {guard.spent():.2f} of budget "
            f"{guard.policy.epsilon_budget:g} (δ {guard.policy.delta:g}, fixed by the site policy)")
