"""Flower's strategies (FedAvg, FedProx, FedAdam), wrapped to keep the per-site record a hospital
federation needs: who trained, who refused (privacy budget) and why, each site's ε and Dice, and a
checkpoint of the global model after every aggregation."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from server.run_record import RunRecord

log = logging.getLogger("fedseg.server")


def build_strategy(config: dict[str, Any]) -> Strategy:
    common = dict(
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=1.0,
        min_train_nodes=int(config["min-sites"]),
        min_evaluate_nodes=int(config["min-sites"]),
        min_available_nodes=int(config["min-sites"]),
    )
    name = config["strategy"]
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(config["proximal-mu"]))
    if name == "fedadam":
        return FedAdam(**common, eta=float(config["server-learning-rate"]), eta_l=float(config["learning-rate"]))
    return FedAvg(**common)


class FederationStrategy(Strategy):
    """Delegates the maths to a Flower strategy; records each site's reply and checkpoints rounds."""

    def __init__(self, inner: Strategy, record: RunRecord, progress=print) -> None:
        self.inner, self.record, self.progress = inner, record, progress

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.record.round(server_round)  # starts the round's clock
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _site_replies(self, server_round: int, replies: Iterable[Message], stage: str) -> Iterator[tuple[Message, str, str, str, MetricRecord]]:
        """Replies that carry content, with their site; failed ones are recorded and logged here."""
        for msg in replies:
            if msg.has_error():
                name = f"node-{msg.metadata.src_node_id}"
                self.record.site(server_round, name).update(status=f"{stage}_failed", reason=msg.error.reason)
                log.warning("round %d: %s %s failed: %s", server_round, name, stage, msg.error.reason)
                continue
            site = msg.content.config_records.get("site", ConfigRecord())
            name = str(site.get("name", f"node-{msg.metadata.src_node_id}"))
            yield msg, name, str(site.get("status", "ok")), str(site.get("reason", "")), msg.content["metrics"]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained = []
        for msg, name, status, reason, m in self._site_replies(server_round, replies, "train"):
            self.record.site(server_round, name).update(
                status=status, reason=reason, examples=int(m["num-examples"]), train_loss=float(m["train-loss"]),
                epsilon=float(m["epsilon"]), noise_multiplier=float(m["noise-multiplier"]), steps=int(m["steps"]))
            if status == "ok":
                trained.append(msg)
                self.progress(f"  round {server_round} {name}: train loss {float(m['train-loss']):.4f}, ε {float(m['epsilon']):.3f}, {int(m['num-examples'])} slices")
            else:
                self.progress(f"  round {server_round} {name}: did not train ({status}): {reason}")
        if not trained:
            log.warning("round %d: no site trained; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, trained)
        if arrays is not None:
            self.record.save_checkpoint(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = []
        for msg, name, _, _, m in self._site_replies(server_round, replies, "evaluate"):
            entry = self.record.site(server_round, name)
            entry.update(val_dice=float(m["dice"]), val_iou=float(m["iou"]), val_hd95_mm=float(m["hd95"]),
                         val_slices=int(m["num-examples"]), epsilon=float(m["epsilon"]),
                         val_dice_per_class=[float(m[k]) for k in sorted(m) if k.startswith("dice-class")])
            entry.setdefault("status", "ok")
            valid.append(msg)
        metrics = self.inner.aggregate_evaluate(server_round, valid) if valid else None
        dice = float(metrics["dice"]) if metrics is not None and "dice" in metrics else math.nan
        self.record.close_round(server_round, dice)
        sites = self.record.round(server_round)["sites"]
        detail = ", ".join(f"{n} {s.get('val_dice', math.nan):.3f}" for n, s in sorted(sites.items()))
        self.progress(f"round {server_round}: aggregated validation Dice {dice:.3f} ({detail})")
        return metrics
