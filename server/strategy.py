"""Flower's strategies, wrapped to keep the record a hospital federation needs: who trained, who
refused (privacy budget), who failed or stayed silent and why, whose update was rejected, each site's
ε and Dice, and a checkpoint of the global model (with the strategy's own state) after every round."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from common.array_codec import arrays_sha256
from common.class_codes import Pair
from common.config import class_names
from common.site_reply import VALIDATE_RECEIVED, ReplyError, SiteReply, claimed_name, pack, received_validation, weights_of
from server.run_record import RunRecord
from server.update_check import CLIP_RATIO, clip_bounds, median_of_others, screen_updates

log = logging.getLogger(__name__)

# Server-side optimiser moments of Flower's FedOpt family: what a resumed FedAdam needs back.
STRATEGY_STATE = ("m_t", "v_t")
# A site weighs at most this many times the median of the other sites' claimed counts (`capped_weights`).
WEIGHT_CAP = 2.0


class AggregatorError(ValueError):
    """A robust aggregator configured so that it could leave no site out of a round: the run does not start."""


def robust_need(config: Mapping[str, Any]) -> tuple[int, str]:
    """The fewest updates from which the configured robust aggregator leaves out f = max(1,
    byzantine-sites) sites, and its rule; (1, "") for the averaging strategies, which leave out no one."""
    f = max(1, int(config["byzantine-sites"]))
    name = config["strategy"]
    if name == "fedmedian":
        return 2 * f + 1, f"a coordinate-wise median outvotes {f} site(s) among at least 2f + 1"
    if name == "krum":
        return 2 * f + 3, f"Krum with {f} byzantine site(s) needs n > 2f + 2 sites"
    if name == "fedtrimmedavg":
        beta = float(config["trim-fraction"])
        if not 0 < beta < 0.5:
            raise AggregatorError(f"fedtrimmedavg: --trim-fraction must be in (0, 0.5), got {beta:g}")
        n = math.ceil(f / beta)
        n += int(beta * n) < f  # float rounding: int(0.2 * 5) may be 0.999... → 0
        return n, f"the trimmed mean cuts int({beta:g} × n) sites per side: {f} from at least {n}"
    return 1, ""


def check_aggregator(config: Mapping[str, Any]) -> None:
    """Refuses (AggregatorError) a robust aggregator that `min-sites` sites would leave untrimmed:
    with fewer, Flower's FedTrimmedAvg trims nothing and Krum's guarantee is void, silently."""
    needed, rule = robust_need(config)
    if int(config["min-sites"]) < needed:
        raise AggregatorError(f"{config['strategy']} leaves no site out of a round of {config['min-sites']} ({rule}): "
                              f"set --min-sites to at least {needed}")


def capped_weights(claims: Mapping[str, int], anchors: Mapping[str, int], cap: float = WEIGHT_CAP) -> dict[str, int]:
    """Each site's weight in an average: its claimed count, at most its first claim in this run
    (`anchors`: it cannot grow later, when others drop out) and at most `cap` × the median of the
    other sites' claims this round (however much it claims, it weighs at most `cap` typical sites)."""
    medians = median_of_others(claims)
    return {site: min(claim, anchors.get(site, claim), math.floor(cap * medians.get(site, claim))) for site, claim in claims.items()}


def build_strategy(config: dict[str, Any]) -> Strategy:
    """The Flower strategy named in the run config. fedseg enforces `min-sites` itself (waiting,
    retrying, never aggregating too few updates), so Flower's own sampler is told one node suffices."""
    common = dict(fraction_train=float(config["fraction-train"]), fraction_evaluate=1.0,
                  min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    name = config["strategy"]
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(config["proximal-mu"]))
    if name == "fedadam":
        return FedAdam(**common, eta=float(config["server-learning-rate"]), eta_l=float(config["learning-rate"]))
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=float(config["trim-fraction"]))
    if name == "krum":
        return Krum(**common, num_malicious_nodes=max(1, int(config["byzantine-sites"])))  # as check_aggregator assumes
    return FedAvg(**common)


def metric(m: MetricRecord, key: str) -> float:
    """A metric a site may round or leave out under its privacy policy: NaN when absent."""
    value = m.get(key, math.nan)
    return float(value) if isinstance(value, (int, float)) else math.nan


def count(m: MetricRecord, key: str) -> int:
    """A count a site may bin or leave out: 0 when absent (or not a finite number)."""
    value = metric(m, key)
    return int(value) if math.isfinite(value) else 0


def message_bytes(msg: Message) -> int:
    """What a message weighs on the wire: its serialised objects, as Flower sends them."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class FederationStrategy(Strategy):
    """Delegates the maths to a Flower strategy; around it, checks every reply against the protocol,
    screens and clips updates, caps each site's weight, records and checkpoints."""

    def __init__(self, inner: Strategy, record: RunRecord, registered: Mapping[str, str] | None = None) -> None:
        """`registered`: node id → site name, as the coordinator registered the sites' keys; replies
        are named by it. Without it (a simulation) a reply's own name is used."""
        self.inner, self.record = inner, record
        self.registered = dict(registered or {})
        record.site_nodes.update(self.registered)
        self.weight_key = str(getattr(inner, "weighted_by_key", "num-examples"))  # what Flower's averages weigh by
        # Never fewer than the robust aggregator needs to leave anyone out (`check_aggregator` refuses such a run at start).
        self.min_sites = max(int(record.config["min-sites"]), robust_need(record.config)[0])
        self.max_norm_ratio = float(record.config["max-update-norm-ratio"])
        self.classes = class_names(record.config)[1:]  # the only classes a reply may bring codes for
        self.disputed: set[str] = set()  # classes whose codes the sites disagree on, warned about once
        self.sent: dict[str, np.ndarray] = {}
        self.asked: list[Message] = []
        self.validating = False
        self.resumed_from: int | None = None  # set by the server loop on resume

    def summary(self) -> None:
        self.inner.summary()

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """As tensors, so a checkpoint loads with `torch.load(weights_only=True)` (no pickle)."""
        return {k: {n: torch.from_numpy(np.asarray(a)) for n, a in getattr(self.inner, k).items()}
                for k in STRATEGY_STATE if getattr(self.inner, k, None)}

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for key, arrays in state.items():
            setattr(self.inner, key, {n: t.numpy() for n, t in arrays.items()})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """With `validate-received` in `config`, each site first validates `arrays` (the previous
        round's global model) in the same message; `aggregate_train` then closes that round too."""
        self.record.round(server_round)  # starts the round's clock
        self.sent = {k: v.numpy() for k, v in arrays.items()}
        self.validating = bool(config.get(VALIDATE_RECEIVED, False))
        messages = self._remember(server_round, "train", self.inner.configure_train(server_round, arrays, config, grid), self.sent)
        for msg in messages:  # each message its own config: who validates differs per site
            msg.content["config"] = ConfigRecord({**dict(msg.content["config"]),
                                                  VALIDATE_RECEIVED: self.validating and self._may_ask(server_round - 1, msg.metadata.dst_node_id)})
        return messages

    def _may_ask(self, server_round: int, node: int) -> bool:
        """Whether to ask a site to validate round `server_round`'s global model: every site for weights
        no site trained in this run (round 0, the round a resume starts from); otherwise only sites
        that trained that round. Asking the others would spend their daily allowance of validations of
        weights they did not train (their guard counts those) and leave round 0 of later runs unscored."""
        if server_round == 0 or server_round == self.resumed_from:
            return True
        name = self.record.site_nodes.get(str(node))
        return bool(name and self.record.round(server_round)["sites"].get(name, {}).get("update_sha256"))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.record.round(server_round)  # round 0 has no training: its clock starts here
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._remember(server_round, "evaluate", [m for m in messages if self._may_ask(server_round, m.metadata.dst_node_id)],
                              {k: v.numpy() for k, v in arrays.items()})

    def _remember(self, server_round: int, stage: str, messages: Iterable[Message], weights: dict[str, np.ndarray]) -> list[Message]:
        """The messages, with the weights packed (one vector: see `common.site_reply`)."""
        self.asked = list(messages)  # the Grid gives each its message id when it sends them
        packed = pack(weights)
        for msg in self.asked:
            msg.content["arrays"], msg.content["layout"] = packed
        if self.asked:
            self.record.round(server_round)[f"{stage}_bytes_to_each_site"] = message_bytes(self.asked[0])
        return self.asked

    def _site_replies(self, server_round: int, replies: Iterable[Message], stage: str) -> Iterator[tuple[Message, str, SiteReply]]:
        """Replies that carry content, with their site; failed and missing ones are recorded here."""
        # An error the SuperLink writes for a dead node comes from the SuperLink, not the node: the
        # site is the one the answered message went to.
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in self.asked}
        answered = set()
        for msg in replies:
            node = destination.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            if msg.has_error():
                self._failed(server_round, node, stage, "failed", msg.error.reason)
                continue
            name = self.registered.get(str(node), f"node-{node}") if self.registered else claimed_name(msg, f"node-{node}")
            self.record.site_nodes[str(node)] = name
            try:
                reply = SiteReply.read(msg, train=stage == "train", classes=self.classes)
            except ReplyError as err:  # nothing of it is recorded but the reason
                self._failed(server_round, node, stage, "rejected", str(err))
                continue
            if stage != "validation":  # a validation inside a train reply is not a message of its own
                self.record.site(server_round, name)[f"{stage}_reply_bytes"] = message_bytes(msg)
            yield msg, name, reply
        for node in destination.values():
            if node not in answered:
                self._failed(server_round, node, stage, "no_reply", f"no {stage} reply within the round timeout ({self.record.config['round-timeout']:g} s)")

    def _failed(self, server_round: int, node: int, stage: str, what: str, reason: str) -> None:
        name = self.record.site_nodes.get(str(node), f"node-{node}")
        if what == "failed":  # Flower's error text: Ray wraps a site's exception in colour codes and a repr
            reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", reason).split())
            reason = reason.rsplit("Message: ", 1)[-1].rstrip("'>")[:300]
        status = f"{stage}_failed" if what == "failed" else what
        entry = self.record.site(server_round, name)
        if stage == "train" or entry.get("status", "ok") == "ok":  # a validation problem never hides the round's training problem
            entry.update(status=status, reason=reason)
        log.warning(f"  round {server_round} {name}: {status.replace('_', ' ')}: {reason}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregates the usable updates (schema-checked, screened, clipped, weight-capped), or returns
        (None, None) when fewer than `min_sites` are. Closes the previous round first when the sites
        validated its global model in these replies."""
        replies = list(replies)
        if self.validating:
            requests = {m.metadata.message_id: m for m in self.asked}
            self.aggregate_evaluate(server_round - 1, [received_validation(r, requests[r.metadata.reply_to_message_id])
                                                       for r in replies if r.metadata.reply_to_message_id in requests],
                                    stage="validation")
        trained: dict[str, Message] = {}
        codes: dict[str, dict[str, Pair]] = {}
        for msg, name, reply in self._site_replies(server_round, replies, "train"):
            status, reason, m = reply.status, reply.reason, reply.metrics
            codes[name] = reply.class_codes
            entry = self.record.site(server_round, name)
            entry.update(status=status, reason=reason, examples=count(m, self.weight_key), train_loss=metric(m, "train-loss"),
                         epsilon=metric(m, "epsilon"), noise_multiplier=metric(m, "noise-multiplier"), steps=count(m, "steps"),
                         train_seconds=metric(m, "seconds"))
            if status != "ok":
                log.warning(f"  round {server_round} {name}: did not train ({status}): {reason}")
                continue
            try:
                weights = weights_of(msg.content)
            except ValueError as err:
                entry.update(status="rejected", reason=str(err))
                continue
            msg.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
            # The digest the site's audit log names for this release: a privacy officer can match them.
            entry["update_sha256"] = arrays_sha256(weights)
            trained[name] = msg
        screening = screen_updates({n: m.content["arrays"] for n, m in trained.items()}, self.sent, self.max_norm_ratio)
        for name, reason in screening.rejected.items():
            self.record.site(server_round, name).update(status="rejected", reason=reason)
            log.warning(f"  round {server_round} {name}: update rejected, left out of the average: {reason}")
            del trained[name]
        self._clip(server_round, trained, screening.norms)
        self._weigh(server_round, trained, "weight", "examples")
        self._class_codes({name: codes[name] for name in trained})
        for name in trained:
            s = self.record.site(server_round, name)
            log.info(f"  round {server_round} {name}: trained, patient-level ε {s['epsilon']:.2f}, σ {s['noise_multiplier']:.2f}, "
                     f"{s['examples']} patients (binned)")
        if len(trained) < self.min_sites:
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, self._harmonised(list(trained.values())))
        if arrays is not None:
            # FedOpt's server maths runs in float64; the global model keeps the model's own dtypes.
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(a.numpy().astype(self.sent[k].dtype))) for k, a in arrays.items()})
            self.record.save_checkpoint(server_round, arrays, self.state())
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message], stage: str = "evaluate") -> MetricRecord | None:
        """Records each site's validation (absent metrics as NaN); averages the replies that carry a
        Dice and a count to weigh it by, so one minimal or refusing site cannot stop the round."""
        valid: dict[str, Message] = {}
        for msg, name, reply in self._site_replies(server_round, replies, stage):
            status, reason, m = reply.status, reply.reason, reply.metrics
            entry = self.record.site(server_round, name)
            entry.update(val_dice=metric(m, "dice"), val_iou=metric(m, "iou"), val_hd95_mm=metric(m, "hd95"),
                         val_slices=count(m, self.weight_key), val_seconds=metric(m, "seconds"),
                         val_dice_per_class=[metric(m, k) for k in sorted(m) if k.startswith("dice-class")])
            if "epsilon" in m:  # a refused validation leaves the round's training ε as it was
                entry["epsilon"] = metric(m, "epsilon")
            if status == "ok":  # the schema made sure it carries a Dice and a count to weigh it by
                entry.setdefault("status", "ok")
                valid[name] = msg
                continue
            if entry.get("status", "ok") == "ok":  # a training problem this round stays the one recorded
                entry.update(status=status, reason=reason)
            log.warning(f"  round {server_round} {name}: validation left out of the average ({status}): {reason}")
        self._weigh(server_round, valid, "val_weight", "val_slices")
        metrics = self.inner.aggregate_evaluate(server_round, self._harmonised(list(valid.values()))) if valid else None
        dice = float(metrics["dice"]) if metrics is not None and "dice" in metrics else math.nan
        self.record.close_round(server_round, dice)
        sites = self.record.round(server_round)["sites"]
        detail = ", ".join(f"{n} {s['val_dice']:.3f}" for n, s in sorted(sites.items()) if not math.isnan(s.get("val_dice", math.nan)))
        log.info(f"round {server_round}: aggregated validation Dice {dice:.3f} ({detail})")
        return metrics

    def _class_codes(self, released: Mapping[str, Mapping[str, Pair]]) -> None:
        """The class codes of the sites whose updates are averaged, into the run's record; a class the
        sites code differently takes the coding a strict majority released, else the generic one, and
        the log says which class (once)."""
        for name, codes in released.items():
            self.record.site_codes[name] = dict(codes)
        for name in sorted(set(self.record.agree_on_codes()) - self.disputed):
            self.disputed.add(name)
            chosen = self.record.class_codes.get(name)
            outcome = (f"the run uses the coding most of them released, {chosen['category'][2]} / {chosen['type'][2]}" if chosen
                       else "no coding has a majority: the run codes it generically (Anatomical Structure)")
            log.warning(f"  class {name!r}: the sites' DICOM-SEGs code it differently; {outcome}")

    def _clip(self, server_round: int, trained: dict[str, Message], update_norms: dict[str, float]) -> None:
        """Scales each update longer than CLIP_RATIO × the median of the other sites' down to that
        bound (direction kept): an update steering the model from just under the rejection limit
        then moves it at most CLIP_RATIO times as far as a typical site's, not 10 times. `update_norms`:
        the screening's norms of these updates (as sent, against `self.sent`), not computed again."""
        norms = {name: update_norms[name] for name in trained}
        for name, norm in norms.items():
            self.record.site(server_round, name)["update_norm"] = norm
        for name, bound in clip_bounds(norms).items():
            factor = bound / norms[name]
            trained[name].content["arrays"] = ArrayRecord({
                k: Array(np.ascontiguousarray((self.sent[k] + factor * (a.numpy() - self.sent[k])).astype(self.sent[k].dtype)))
                for k, a in trained[name].content["arrays"].items()})
            self.record.site(server_round, name)["clipped_to"] = bound
            log.info(f"  round {server_round} {name}: update norm {norms[name]:.3g} scaled down to {bound:.3g} "
                     f"({CLIP_RATIO:g}x the median of the other sites')")

    def _weigh(self, server_round: int, replies: dict[str, Message], field: str, claimed: str) -> None:
        """Sets each reply's weight (its `weight_key` metric, what Flower averages by) to its
        `capped_weights` value and records it as `field`. A site's claim (`claimed`) in the first
        round it was weighed anchors it: a claim can only shrink later, never grow."""
        claims = {name: int(msg.content["metrics"][self.weight_key]) for name, msg in replies.items()}
        anchors = {name: c for name in replies if (c := self._first_claim(server_round, name, field, claimed)) is not None}
        for name, weight in capped_weights(claims, anchors).items():
            replies[name].content["metrics"][self.weight_key] = weight
            self.record.site(server_round, name)[field] = weight
            if weight < claims[name]:
                log.info(f"  round {server_round} {name}: weighs {weight}, not the {claims[name]} it claims "
                         f"(at most its first claim in the run and {WEIGHT_CAP:g}x the median of the other sites' claims)")

    def _first_claim(self, server_round: int, name: str, field: str, claimed: str) -> int | None:
        """The site's claim in the earliest round before `server_round` in which it was weighed."""
        return next((r["sites"][name][claimed] for k, r in sorted(self.record.rounds.items())
                     if k < server_round and field in r["sites"].get(name, {})), None)

    def _harmonised(self, replies: list[Message]) -> list[Message]:
        """The replies with one MetricRecord each, holding only the metrics every one of them has:
        Flower's aggregators raise InconsistentMessageReplies when sites' metric keys differ, and
        sites may leave metrics out. The weighting key is kept (callers pass only replies with it)."""
        records = [msg.content.metric_records.get("metrics", MetricRecord()) for msg in replies]
        shared = set.intersection(*(set(r) for r in records)) if records else set()
        for msg, record in zip(replies, records, strict=True):
            for key in list(msg.content.metric_records):
                del msg.content[key]
            msg.content["metrics"] = MetricRecord({k: record[k] for k in sorted(shared)})
        return replies
