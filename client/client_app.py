"""The site's Flower ClientApp: DP-SGD training and validation on the hospital's own data.

Only model parameter arrays and scalar metrics (plus the site's name and a status line) leave the
site. Site settings come from the SuperNode's node config (`site-name`, `data-dir`, `ledger-dir`,
`epsilon-budget`); in a simulation, from the partition a virtual SuperNode is given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy_ledger import PrivacyLedger
from client.training import BudgetExhausted, evaluate, train_round
from common.config import TrainSettings, class_names
from common.dataset import SiteData, load_site
from common.model import build_model, pick_device
from common.parameters import load_arrays, to_arrays

log = logging.getLogger("fedseg.site")
_reported: set[str] = set()


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
    data = load_site(site.data_dir, tuple(class_names(config)), int(config["image-size"]), float(config["val-fraction"]), int(config["seed"]))
    if site.data_dir not in _reported:  # the load report stays at the site, in its log
        _reported.add(site.data_dir)
        log.info("%s", data.report.format())
    return data


def _reply(msg: Message, site: SiteConfig, status: str, metrics: dict[str, float], arrays: ArrayRecord | None = None, reason: str = "") -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name, "status": status, "reason": reason})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def build_client_app(site_for: Any = SiteConfig.from_node_config) -> ClientApp:
    """A ClientApp whose site settings come from `site_for(context.node_config)`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = site_for(context.node_config)
        config = msg.content["config"]
        settings = TrainSettings.from_config(config)
        data = site_data(site, config)
        ledger = PrivacyLedger(site.ledger_dir, data.fingerprint, site.name)
        model = build_model(len(class_names(config)))
        load_arrays(model, msg.content["arrays"])
        metrics = {"num-examples": 0, "train-loss": math.nan, "epsilon": ledger.epsilon(settings.delta), "steps": 0, "noise-multiplier": 0.0}
        try:
            result = train_round(model, data, settings, ledger, site.epsilon_budget, pick_device(), str(context.run_id))
        except BudgetExhausted as refusal:
            log.warning("%s: %s", site.name, refusal)
            return _reply(msg, site, "budget_exhausted", metrics, reason=str(refusal))
        metrics.update({"num-examples": len(data.train_images), "train-loss": result.train_loss, "epsilon": result.epsilon,
                        "steps": result.steps, "noise-multiplier": result.noise_multiplier})
        return _reply(msg, site, "ok", metrics, arrays=to_arrays(model))

    @app.evaluate()
    def validate(msg: Message, context: Context) -> Message:
        site = site_for(context.node_config)
        config = msg.content["config"]
        data = site_data(site, config)
        model = build_model(len(class_names(config)))
        load_arrays(model, msg.content["arrays"])
        metrics = evaluate(model, data, len(class_names(config)), pick_device())
        ledger = PrivacyLedger(site.ledger_dir, data.fingerprint, site.name)
        metrics.update({"num-examples": sum(len(v.image) for v in data.validation), "epsilon": ledger.epsilon(float(config["delta"]))})
        return _reply(msg, site, "ok", metrics)

    return app


def simulated_sites(site_dirs: Sequence[str], ledger_dir: str, epsilon_budget: float):
    """Map a simulation's virtual SuperNode (partition-id) to one site folder."""
    def site_for(node_config: Mapping[str, Any]) -> SiteConfig:
        folder = site_dirs[int(node_config["partition-id"])]
        return SiteConfig(Path(folder).name, folder, ledger_dir, epsilon_budget)
    return site_for


app = build_client_app()
