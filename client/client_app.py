"""The site's Flower ClientApp: DP-SGD training and validation on the hospital's own data.

Only model parameter arrays and scalar metrics (plus the site's name and a status line) leave the
site. Site settings come from the SuperNode's node config (`site-name`, `data-dir`, `ledger-dir`,
`epsilon-budget`); in a simulation, from the partition a virtual SuperNode is given.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy_ledger import PrivacyLedger
from client.training import BudgetExhausted, evaluate, train_round
from common.config import RUN_DEFAULTS, TrainSettings, class_names
from common.dataset import SiteData, load_site
from common.model import build_model, pick_device
from common.parameters import load_arrays, to_arrays

SITE_LOG_LEVEL = "FEDSEG_SITE_LOG_LEVEL"
log = logging.getLogger("fedseg.site")
# `fedseg site` asks for each round's line on the hospital's console (via its SuperNode); a simulation
# already prints the same numbers from the server side.
log.setLevel(os.environ.get(SITE_LOG_LEVEL, "WARNING"))


@dataclass(frozen=True)
class SiteConfig:
    name: str
    data_dir: str
    ledger_dir: str
    epsilon_budget: float

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        data_dir = str(node_config["data-dir"])
        return cls(
            name=str(node_config.get("site-name", Path(data_dir).name)),
            data_dir=data_dir,
            ledger_dir=str(node_config.get("ledger-dir", Path(data_dir) / ".fedseg")),
            epsilon_budget=float(node_config.get("epsilon-budget", math.inf)),
        )


def site_data(site: SiteConfig, config: Mapping[str, Any]) -> SiteData:
    return load_site(site.data_dir, tuple(class_names(config)), int(config["image-size"]), float(config["val-fraction"]), int(config["seed"]))


def preflight(site: SiteConfig, config: Mapping[str, Any] = RUN_DEFAULTS) -> SiteData:
    """Load and check the site's data and ledger before it joins, so a misconfigured site fails at
    start, not in round 3. Prints the load report (it stays at the site) and the budget left."""
    data = site_data(site, config)
    print(data.report.format())
    spent = PrivacyLedger(site.ledger_dir, data.fingerprint, site.name).epsilon(float(config["delta"]))
    print(f"{site.name}: {len(data.train_images)} training slices from {len(data.train_patients)} patients, "
          f"{len(data.validation)} validation series; privacy ledger {site.ledger_dir}: ε spent {spent:.2f} "
          f"of budget {site.epsilon_budget:g} (δ {config['delta']:g})", flush=True)
    return data


def _reply(msg: Message, site: SiteConfig, status: str, metrics: dict[str, float], arrays: ArrayRecord | None = None, reason: str = "") -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name, "status": status, "reason": reason})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def build_client_app(site_for: Any = SiteConfig.from_node_config, mods: list | None = None) -> ClientApp:
    """A ClientApp whose site settings come from `site_for(context.node_config)`; `mods` are Flower
    ClientApp mods (a simulation's fault injection)."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = site_for(context.node_config)
        config = msg.content["config"]
        settings = TrainSettings.from_config(config)
        data = site_data(site, config)
        ledger = PrivacyLedger(site.ledger_dir, data.fingerprint, site.name)
        model = build_model(len(class_names(config)))
        load_arrays(model, msg.content["arrays"])
        metrics = {"num-examples": 0, "train-loss": math.nan, "epsilon": ledger.epsilon(settings.delta), "steps": 0, "noise-multiplier": 0.0, "seconds": 0.0}
        try:
            with ledger.locked():
                started = time.perf_counter()
                result = train_round(model, data, settings, ledger, site.epsilon_budget, pick_device(), str(context.run_id))
                seconds = time.perf_counter() - started
        except BudgetExhausted as refusal:
            log.warning("%s: %s", site.name, refusal)
            return _reply(msg, site, "budget_exhausted", metrics, reason=str(refusal))
        metrics.update({"num-examples": len(data.train_images), "train-loss": result.train_loss, "epsilon": result.epsilon,
                        "steps": result.steps, "noise-multiplier": result.noise_multiplier,
                        "seconds": seconds})
        log.info("%s round %d: %d %s steps (noise multiplier %.2f), train loss %.3f, ε spent %.2f of budget %g",
                 site.name, settings.server_round, result.steps, "DP-SGD" if settings.private else "non-private SGD",
                 result.noise_multiplier, result.train_loss, result.epsilon, site.epsilon_budget)
        return _reply(msg, site, "ok", metrics, arrays=to_arrays(model))

    @app.evaluate()
    def validate(msg: Message, context: Context) -> Message:
        site = site_for(context.node_config)
        config = msg.content["config"]
        data = site_data(site, config)
        model = build_model(len(class_names(config)))
        load_arrays(model, msg.content["arrays"])
        started = time.perf_counter()
        metrics = evaluate(model, data, len(class_names(config)), pick_device())
        metrics["seconds"] = time.perf_counter() - started
        ledger = PrivacyLedger(site.ledger_dir, data.fingerprint, site.name)
        metrics.update({"num-examples": sum(len(v.image) for v in data.validation), "epsilon": ledger.epsilon(float(config["delta"]))})
        log.info("%s round %s: validation Dice %.3f on %d patients", site.name, config.get("server-round", "?"), metrics["dice"], len(data.validation))
        return _reply(msg, site, "ok", metrics)

    return app


def simulated_sites(site_dirs: Sequence[str], ledger_dir: str, epsilon_budget: float):
    """Map a simulation's virtual SuperNode (partition-id) to one site folder."""
    def site_for(node_config: Mapping[str, Any]) -> SiteConfig:
        folder = site_dirs[int(node_config["partition-id"])]
        return SiteConfig(Path(folder).name, folder, ledger_dir, epsilon_budget)
    return site_for


app = build_client_app()
