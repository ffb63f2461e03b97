"""The server's defences, on Flower Messages built here: update screening, robust aggregation,
silent and failing sites, resume from a run folder, checkpoints that a crash cannot truncate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common.config import run_config
from common.site_reply import pack, reply_content, unpack, weights_content
from server.run_record import ResumeError, RunRecord, run_status
from server.server_app import run_federation
from server.strategy import AggregatorError, FederationStrategy, build_strategy, check_aggregator
from server.update_check import screen_updates, update_norm

GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


pytestmark = pytest.mark.usefixtures("task_identity")
def _arrays(step: float, **changes: np.ndarray) -> ArrayRecord:
    state = {k: v + step for k, v in GLOBAL.items()}
    state.update(changes)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _ask(node: int) -> Message:
    """A train message as the Grid leaves it once sent: with its message id."""
    ask = Message(content=RecordDict({"config": ConfigRecord({"to": node})}), dst_node_id=node, message_type=MessageType.TRAIN)
    ask.metadata.__dict__["_message_id"] = ask.object_id
    return ask


def _reply(node: int, name: str, arrays: ArrayRecord | None, examples: int = 10, status: str = "ok", reason: str = "") -> Message:
    ask = _ask(node)
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5, "epsilon": 1.0,
                                                   "noise-multiplier": 1.0, "steps": 4}),
                          "site": ConfigRecord({"name": name, "status": status, "reason": reason})})
    if arrays is not None:
        weights_content(content, {k: a.numpy() for k, a in arrays.items()})  # packed, as a courier sends them
    return Message(content=content, reply_to=ask)


def test_screening_rejects_malformed_and_extreme_updates_and_passes_the_rest():
    updates = {
        "honest-1": _arrays(0.01), "honest-2": _arrays(0.012), "honest-3": _arrays(0.009),
        "nan": _arrays(0.01, b=np.array([0.0, np.nan, 0.0], np.float32)),
        "inf": _arrays(0.01, w=np.full((4, 3), np.inf, np.float32)),
        "shape": _arrays(0.01, w=np.zeros((3, 3), np.float32)),
        "dtype": _arrays(0.01, b=np.zeros(3, np.float64)),
        "names": ArrayRecord({"w": Array(GLOBAL["w"]), "extra": Array(GLOBAL["b"])}),
        "huge": _arrays(1.0),  # 100x the honest sites' change
    }
    screening = screen_updates(updates, GLOBAL, max_norm_ratio=10.0)
    rejected = screening.rejected
    assert set(rejected) == {"nan", "inf", "shape", "dtype", "names", "huge"}
    # Every well-formed update's norm is kept (the strategy clips and records with them, not recomputing).
    assert set(screening.norms) == {"honest-1", "honest-2", "honest-3", "huge"}
    assert screening.norms["huge"] == pytest.approx(update_norm(updates["huge"], GLOBAL))
    assert "NaN or Inf" in rejected["nan"] and "NaN or Inf" in rejected["inf"]
    assert "shape (3, 3)" in rejected["shape"] and "float64" in rejected["dtype"]
    assert "missing ['b']" in rejected["names"] and "unexpected ['extra']" in rejected["names"]
    assert "100x the median" in rejected["huge"]
    # Two sites: the extreme one is caught, not both; the check can be turned off.
    assert set(screen_updates({"a": _arrays(0.01), "b": _arrays(1.0)}, GLOBAL, 10.0).rejected) == {"b"}
    assert screen_updates({"a": _arrays(0.01), "b": _arrays(1.0)}, GLOBAL, 0.0).rejected == {}


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "fedtrimmedavg", "krum"])
def test_a_round_survives_bad_sites_with_every_aggregator(tmp_path, strategy):
    config = run_config({"strategy": strategy, "min-sites": 5, "byzantine-sites": 1, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record)
    fed.sent = dict(GLOBAL)
    fed.asked = [_ask(n) for n in range(1, 10)]
    # The SuperLink answers for a dead node itself: the error's source is the SuperLink (node 1 here too).
    dead = Message(Error(code=5, reason="Node unavailable"), reply_to=fed.asked[7])
    dead.metadata.__dict__["_src_node_id"] = 1
    honest = [_reply(n, name, _arrays(step)) for n, name, step in ((1, "a", 0.01), (2, "b", 0.012), (3, "c", 0.011), (4, "d", 0.01), (5, "e", 0.011))]
    replies = [*honest, _reply(6, "nan", _arrays(0.0, w=np.full((4, 3), np.nan, np.float32))),
               _reply(7, "broke", None, status="refused", reason="budget_exhausted"), dead]  # node 9 never answers
    arrays, _ = fed.aggregate_train(1, replies)
    result = [a.numpy() for a in arrays.values()]
    assert all(np.isfinite(r).all() for r in result)
    assert all(0.009 <= float(r.mean()) <= 0.013 for r in result)  # only the honest changes
    sites = record.round(1)["sites"]
    assert {n: s["status"] for n, s in sites.items()} == {
        **dict.fromkeys("abcde", "ok"), "nan": "rejected", "broke": "refused", "node-8": "train_failed", "node-9": "no_reply"}
    assert "Node unavailable" in sites["node-8"]["reason"] and "round timeout" in sites["node-9"]["reason"]
    assert (tmp_path / "checkpoints" / "global_model-round001.pt").is_file()


def test_a_train_reply_closes_the_previous_round_with_the_validation_it_carries(tmp_path):
    """One message per site and round: the courier's reply (built by the shared protocol) carries the
    validation of the weights it was sent; the server closes the previous round from it."""
    record = RunRecord(tmp_path, run_config({"min-sites": 1, "run-dir": str(tmp_path)}))
    fed = FederationStrategy(build_strategy(record.config), record)
    fed.sent, fed.asked, fed.validating = dict(GLOBAL), [_ask(1), _ask(2), _ask(3)], True
    trained = {"status": "ok", "code": "", "metrics": {"num-examples": 10, "epsilon": 1.0, "noise-multiplier": 1.0}}
    weights = {k: v + 0.01 for k, v in GLOBAL.items()}
    replies = [Message(content=reply_content({**trained, "site": "a", "validation": {"status": "ok", "code": "", "metrics": {"dice": 0.4, "num-examples": 10}}}, weights),
                       reply_to=fed.asked[0]),
               Message(content=reply_content({**trained, "site": "b", "validation": {"status": "refused", "code": "validation_limit", "metrics": {}}}, weights),
                       reply_to=fed.asked[1]),
               Message(Error(code=0, reason="the site crashed"), reply_to=fed.asked[2])]
    arrays, _ = fed.aggregate_train(1, replies)
    assert arrays is not None and record.round(0)["dice"] == pytest.approx(0.4)
    before = record.round(0)["sites"]
    assert (before["a"]["status"], before["a"]["val_dice"]) == ("ok", 0.4)
    assert (before["b"]["status"], before["b"]["reason"]) == ("refused", "validation_limit")
    assert before["node-3"]["status"] == "validation_failed"
    assert {n: s["status"] for n, s in record.round(1)["sites"].items()} == {"a": "ok", "b": "ok", "node-3": "train_failed"}
    assert "dice" not in record.round(1) and record.round(1)["checkpoint"] == "global_model-round001.pt"
    # Round 2 asks only the sites that trained round 1 to validate it (a and b; the crashed one would
    # spend its daily allowance of validations of weights it did not train); round 0 and the round a
    # resume starts from are asked of everyone.
    record.site_nodes.update({"1": "a", "2": "b", "3": "node-3"})
    assert [fed._may_ask(1, n) for n in (1, 2, 3)] == [True, True, False]
    assert fed._may_ask(0, 3)
    fed.resumed_from = 1
    assert fed._may_ask(1, 3)


def test_replies_are_named_by_the_registered_node_not_by_the_name_they_claim(tmp_path):
    record = RunRecord(tmp_path, run_config({"min-sites": 1, "run-dir": str(tmp_path)}))
    fed = FederationStrategy(build_strategy(record.config), record,
                             registered={"1": "hospital-a", "2": "hospital-b", "3": "hospital-c"})
    fed.sent, fed.asked = dict(GLOBAL), [_ask(1), _ask(2), _ask(3)]
    # hospital-b claims to be hospital-a, to replace its update and history entry; hospital-c dies unheard
    dead = Message(Error(code=5, reason="Node unavailable"), reply_to=fed.asked[2])
    fed.aggregate_train(1, [_reply(1, "hospital-a", _arrays(0.01)), _reply(2, "hospital-a", _arrays(0.012)), dead])
    sites = record.round(1)["sites"]
    assert {n: s["status"] for n, s in sites.items()} == {"hospital-a": "ok", "hospital-b": "ok", "hospital-c": "train_failed"}
    assert sites["hospital-a"]["update_sha256"] != sites["hospital-b"]["update_sha256"]


def test_too_few_usable_updates_are_never_aggregated(tmp_path):
    config = run_config({"min-sites": 2, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record)
    fed.sent, fed.asked = dict(GLOBAL), [_ask(1), _ask(2)]
    arrays, _ = fed.aggregate_train(1, [_reply(1, "a", _arrays(0.01)), _reply(2, "b", _arrays(0.01, b=np.full(3, np.inf, np.float32)))])
    assert arrays is None
    assert not (tmp_path / "checkpoints").exists()


def test_fedadam_resumes_with_its_moments_and_the_history_cut_at_the_last_completed_round(tmp_path):
    config = run_config({"strategy": "fedadam", "min-sites": 1, "num-server-rounds": 3, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record)
    start = _arrays(0.0)
    for server_round in (1, 2):
        fed.configure_train(server_round, start, ConfigRecord(), grid=_OneNodeGrid())
        start, _ = fed.aggregate_train(server_round, [_reply(1, "a", _arrays(0.01 * server_round))])
        fed.aggregate_evaluate(server_round, [])
    fed.configure_train(3, start, ConfigRecord(), grid=_OneNodeGrid())  # round 3 in flight when the server dies
    moments = {k: {n: a.copy() for n, a in getattr(fed.inner, k).items()} for k in ("m_t", "v_t")}

    resumed, checkpoint, done = RunRecord.resume(tmp_path, run_config({"resume": True, "num-server-rounds": 5, "run-dir": str(tmp_path)}))
    assert done == 2 and sorted(resumed.rounds) == [1, 2]  # round 3 was in flight: it is run again
    assert resumed.config["strategy"] == "fedadam" and resumed.config["num-server-rounds"] == 5
    assert "resumed after round 2" in resumed.events[-1]["event"]
    again = FederationStrategy(build_strategy(resumed.config), resumed)
    again.load_state(checkpoint["strategy_state"])
    for key, arrays in moments.items():
        for name, value in arrays.items():
            np.testing.assert_array_equal(getattr(again.inner, key)[name], value)
    assert checkpoint["round"] == 2
    np.testing.assert_array_equal(checkpoint["state_dict"]["w"].numpy(), start["w"].numpy())
    # The checkpoint holds tensors and plain values only: it loads without unpickling code.
    torch.load(tmp_path / "global_model.pt", weights_only=True)


def test_resume_refuses_a_folder_without_a_completed_round(tmp_path):
    with pytest.raises(ResumeError, match="no readable history.json"):
        RunRecord.resume(tmp_path, run_config({"resume": True}))
    (tmp_path / "history.json").write_text(json.dumps({"config": run_config(), "rounds": [{"round": 0, "sites": {}}]}))
    with pytest.raises(ResumeError, match="no round was completed"):
        RunRecord.resume(tmp_path, run_config({"resume": True}))
    assert run_status(tmp_path) is None


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    record = RunRecord(tmp_path, run_config())
    record.save_checkpoint(1, _arrays(0.01), {})
    before = (tmp_path / "global_model.pt").read_bytes()

    def dies_halfway(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        record.save_checkpoint(2, _arrays(0.02), {})
    assert (tmp_path / "global_model.pt").read_bytes() == before
    assert not (tmp_path / "checkpoints" / "global_model-round002.pt").exists()
    assert not list(tmp_path.rglob("*.tmp"))


class _OneNodeGrid:
    def get_node_ids(self):
        return [1]


def _validation(node: int, name: str, status: str = "ok", **metrics: float) -> Message:
    """A validation reply carrying only the metrics given: what a site's privacy policy lets out."""
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": name, "status": status, "reason": ""})})
    return Message(content=content, reply_to=_ask(node))


def test_minimal_validation_replies_are_averaged_and_one_without_dice_is_rejected(tmp_path):
    config = run_config({"min-sites": 1, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record)
    fed.asked = [_ask(n) for n in range(1, 6)]
    replies = [_validation(1, "full", dice=0.8, iou=0.7, hd95=5.0, epsilon=1.0, **{"num-examples": 10}),
               _validation(2, "minimal", dice=0.6, **{"num-examples": 20}),  # no iou, hd95 nor ε
               _validation(3, "no-dice", iou=0.9, hd95=1.0, **{"num-examples": 100}),
               _validation(4, "no-count", dice=0.1),
               _validation(5, "refused", status="refused")]
    metrics = fed.aggregate_evaluate(1, replies)
    assert metrics["dice"] == pytest.approx((0.8 * 10 + 0.6 * 20) / 30)  # weighted by num-examples
    assert "iou" not in metrics and "hd95" not in metrics  # only what every averaged site sent
    assert record.round(1)["dice"] == pytest.approx(2 / 3)
    sites = record.round(1)["sites"]
    assert {n: s["status"] for n, s in sites.items()} == {
        "full": "ok", "minimal": "ok", "no-dice": "rejected", "no-count": "rejected", "refused": "refused"}
    assert sites["no-dice"]["reason"] == "validation reply has no dice" and sites["no-count"]["reason"] == "validation reply has no num-examples"
    assert math.isnan(sites["minimal"]["val_iou"]) and math.isnan(sites["minimal"]["val_hd95_mm"]) and "epsilon" not in sites["minimal"]
    assert sites["minimal"]["val_slices"] == 20 and "val_slices" not in sites["no-count"]  # a reply that breaks the schema: only its reason
    # With no usable reply at all the round closes unvalidated, without an error.
    assert fed.aggregate_evaluate(2, [_validation(3, "no-dice", iou=0.9, **{"num-examples": 10})]) is None
    assert math.isnan(record.round(2)["dice"])


def test_a_validation_refusal_does_not_hide_the_rounds_training_problem(tmp_path):
    record = RunRecord(tmp_path, run_config({"run-dir": str(tmp_path)}))
    fed = FederationStrategy(build_strategy(record.config), record)
    fed.asked = [_ask(1)]
    record.site(1, "broke").update(status="refused", reason="budget_exhausted")
    fed.aggregate_evaluate(1, [_validation(1, "broke", status="error")])
    assert record.round(1)["sites"]["broke"]["reason"] == "budget_exhausted"


def test_train_replies_without_steps_seconds_or_loss_are_still_averaged(tmp_path):
    config = run_config({"min-sites": 2, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record)
    fed.sent, fed.asked = dict(GLOBAL), [_ask(1), _ask(2)]
    minimal = Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 20}),
                                          "site": ConfigRecord({"name": "minimal", "status": "ok", "reason": ""})}), reply_to=_ask(2))
    weights_content(minimal.content, {k: a.numpy() for k, a in _arrays(0.02).items()})
    arrays, _ = fed.aggregate_train(1, [_reply(1, "full", _arrays(0.01)), minimal])
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(3, (0.01 * 10 + 0.02 * 20) / 30, np.float32), rtol=1e-5)
    site = record.round(1)["sites"]["minimal"]
    assert site["status"] == "ok" and site["steps"] == 0 and math.isnan(site["train_loss"]) and math.isnan(site["train_seconds"])


def test_packed_weights_round_trip_and_a_lying_layout_is_rejected_not_a_crash(tmp_path):
    weights = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(3, np.float32)}
    record, layout = pack(weights)
    assert list(record) == ["weights"] and record["weights"].numpy().shape == (15,)  # one array on the wire
    assert {k: v.tolist() for k, v in unpack(record, layout).items()} == {k: v.tolist() for k, v in weights.items()}
    lies = {"more values than sent": {"dims": [4, 4, 3]}, "a pickled dtype": {"dtypes": ["object", "float32"]},
            "negative size": {"dims": [-4, 3, 3]}, "fewer names than shapes": {"names": ["w"]},
            "text counts": {"ndims": ["2", "1"]}, "fractional counts": {"ndims": [1.5, 1.5]}, "infinite size": {"dims": [4.0, 3.0, float("inf")]},
            "negative ndims": {"ndims": [3, -1]}, "a size that wraps int64": {"dims": [2**32 + 1, 2**32 - 1, 3]},
            "no layout at all": {"names": None}}
    for what, change in lies.items():
        lying = {k: v for k, v in {**dict(layout), **change}.items() if v is not None}
        with pytest.raises(ValueError):
            unpack(record, ConfigRecord(lying))
    # at the server: that site is left out with the reason, the others aggregated
    fed = FederationStrategy(build_strategy(run_config({"min-sites": 1})), RunRecord(tmp_path, run_config({"min-sites": 1})))
    fed.sent, fed.asked = dict(GLOBAL), [_ask(1), _ask(2)]
    liar = _reply(2, "liar", _arrays(0.01))
    liar.content["layout"] = ConfigRecord({**dict(liar.content["layout"]), "dims": [4, 4, 3]})
    arrays, _ = fed.aggregate_train(1, [_reply(1, "honest", _arrays(0.01)), liar])
    assert arrays is not None and fed.record.round(1)["sites"]["liar"]["status"] == "rejected"
    assert "layout asks for more values" in fed.record.round(1)["sites"]["liar"]["reason"]


def _federation(tmp_path, sites: int, **settings) -> FederationStrategy:
    """A strategy that asked nodes 1..`sites` to train on GLOBAL."""
    config = run_config({"min-sites": sites, "run-dir": str(tmp_path), **settings})
    fed = FederationStrategy(build_strategy(config), RunRecord(tmp_path, config))
    fed.sent, fed.asked = dict(GLOBAL), [_ask(n) for n in range(1, sites + 1)]
    return fed


def test_a_site_cannot_weigh_more_than_its_claims_allow(tmp_path):
    """10^9 patients is refused by the schema; a claim within it weighs at most 2x the median of the
    other sites' claims, and never more than the site's first weight in the run."""
    fed = _federation(tmp_path, 5, **{"min-sites": 3})
    honest = lambda: [_reply(n, f"h{n}", _arrays(0.01), examples=40) for n in (1, 2, 3)]  # noqa: E731
    arrays, _ = fed.aggregate_train(1, [*honest(), _reply(4, "liar", _arrays(0.03), examples=10**9),
                                        _reply(5, "sleeper", _arrays(0.01), examples=10)])
    liar = fed.record.round(1)["sites"]["liar"]
    assert (liar["status"], liar["reason"]) == ("rejected", "train reply has num-examples 1000000000, outside [1, 1e+06]")
    np.testing.assert_allclose(arrays["b"].numpy(), 0.01, rtol=1e-5)  # the round went on without it
    arrays, _ = fed.aggregate_train(2, [*honest(), _reply(4, "liar", _arrays(0.03), examples=900_000),
                                        _reply(5, "sleeper", _arrays(0.03), examples=900_000)])
    sites = fed.record.round(2)["sites"]
    assert (sites["liar"]["weight"], sites["liar"]["examples"], sites["sleeper"]["weight"]) == (80, 900_000, 10)
    np.testing.assert_allclose(arrays["b"].numpy(), (0.01 * 120 + 0.03 * 80 + 0.03 * 10) / 210, rtol=1e-5)


def test_an_honest_large_site_capped_among_small_peers_counts_in_full_once_its_peers_are_as_large(tmp_path):
    """The anchor is a site's first claim, not its first (capped) weight: a hospital of 400 patients
    that starts beside two of 100 is not held at 200 for the rest of the run."""
    fed = _federation(tmp_path, 5, **{"min-sites": 3})
    fed.aggregate_train(1, [_reply(1, "large", _arrays(0.01), examples=400), _reply(2, "a", _arrays(0.01), examples=100),
                            _reply(3, "b", _arrays(0.01), examples=100)])
    assert fed.record.round(1)["sites"]["large"]["weight"] == 200
    fed.aggregate_train(2, [_reply(1, "large", _arrays(0.01), examples=400), _reply(4, "c", _arrays(0.01), examples=400),
                            _reply(5, "d", _arrays(0.01), examples=400)])
    weights = {n: s["weight"] for n, s in fed.record.round(2)["sites"].items() if "weight" in s}
    assert weights == {"large": 400, "c": 400, "d": 400}


def test_a_steering_update_just_under_the_rejection_limit_is_scaled_down(tmp_path):
    """9.5x the others' median norm passes the 10x screen, but counts only as 3x: scaled, not reversed."""
    fed = _federation(tmp_path, 5)
    honest = [_reply(n, f"h{n}", _arrays(0.01)) for n in (1, 2, 3, 4)]
    arrays, _ = fed.aggregate_train(1, [*honest, _reply(5, "steer", _arrays(-0.095))])
    steer, median = fed.record.round(1)["sites"]["steer"], 0.01 * math.sqrt(15)
    assert steer["status"] == "ok"
    assert steer["update_norm"] == pytest.approx(9.5 * median, rel=1e-5) and steer["clipped_to"] == pytest.approx(3 * median)
    np.testing.assert_allclose(arrays["w"].numpy(), (4 * 0.01 - 0.03) / 5, atol=1e-6)  # unclipped: -0.011
    assert "clipped_to" not in fed.record.round(1)["sites"]["h1"]


def test_each_update_norm_is_computed_once_per_round(tmp_path, monkeypatch):
    """The screening's norms are the ones clipping and the record use: one pass over each update."""
    from server import strategy, update_check

    calls, real = [], update_check.update_norm
    for module in (update_check, strategy):  # wherever a norm could be computed
        monkeypatch.setattr(module, "update_norm", lambda arrays, sent: calls.append(1) or real(arrays, sent), raising=False)
    fed = _federation(tmp_path, 5)
    fed.aggregate_train(1, [*(_reply(n, f"h{n}", _arrays(0.01)) for n in (1, 2, 3, 4)), _reply(5, "steer", _arrays(-0.095))])
    assert len(calls) == 5
    assert fed.record.round(1)["sites"]["steer"]["clipped_to"] > 0


DROP = object()  # a `_broken` value: delete the key


def _broken(content: RecordDict, where: str, key: str, value) -> RecordDict:
    """`content` with one protocol violation: `key` of its `where` record ("" for a record itself) set to `value`."""
    target = content[where] if where else content
    if value is DROP:
        del target[key]
    else:
        target[key] = value
    return content


@pytest.mark.parametrize("where, key, value, reason", [
    ("metrics", "num-examples", DROP, "train reply has no num-examples"),
    ("metrics", "num-examples", 10.0, "train reply has num-examples of type float, not an integer"),
    ("metrics", "num-examples", 0, "train reply has num-examples 0, outside [1, 1e+06]"),
    ("metrics", "epsilon", -1.0, "train reply has epsilon -1.0, outside [0, inf]"),
    ("metrics", "noise-multiplier", math.nan, "train reply has noise-multiplier nan, outside [0, 100]"),
    ("metrics", "epsilon", [1.0, 2.0], "train reply has epsilon of type list, not a number"),
    ("metrics", "gradient-norm", 1.0, "train reply has an unexpected metric 'gradient-norm'"),
    ("site", "role", "admin", "train reply has an unexpected site key 'role'"),
    ("site", "status", "accepted", "train reply has status 'accepted', not one of ok, refused, error, rejected"),
    ("site", "status", b"ok", "train reply has a site status that is not printable text of at most 300 characters"),
    ("site", "reason", "\x1b[2J", "train reply has a site reason that is not printable text of at most 300 characters"),
    ("", "debug", ConfigRecord({"x": 1}), "train reply has an unexpected config record 'debug'"),
    ("", "site", DROP, "train reply has no site record"),
    ("", "arrays", DROP, "train reply has no weights"),
])
def test_a_train_reply_that_breaks_the_schema_is_rejected_with_the_reason_and_the_round_goes_on(tmp_path, where, key, value, reason):
    fed = _federation(tmp_path, 3, **{"min-sites": 2})
    bad = _reply(3, "bad", _arrays(0.5))
    _broken(bad.content, where, key, value)
    arrays, _ = fed.aggregate_train(1, [_reply(1, "a", _arrays(0.01)), _reply(2, "b", _arrays(0.01)), bad])
    np.testing.assert_allclose(arrays["b"].numpy(), 0.01, rtol=1e-5)
    entry = fed.record.round(1)["sites"]["node-3" if key == "site" else "bad"]  # without a site record: named by its node
    assert entry == {"status": "rejected", "reason": reason}  # nothing else of it is recorded


@pytest.mark.parametrize("where, key, value, reason", [
    ("metrics", "dice", DROP, "validation reply has no dice"),
    ("metrics", "dice", 1.5, "validation reply has dice 1.5, outside [0, 1]"),
    ("metrics", "dice", math.nan, "validation reply has dice nan, outside [0, 1]"),
    ("metrics", "num-examples", DROP, "validation reply has no num-examples"),
    ("metrics", "num-examples", -3, "validation reply has num-examples -3, outside [1, 1e+06]"),
    ("metrics", "hd95", -1.0, "validation reply has hd95 -1.0, outside [0, 1e+06]"),
    ("metrics", "dice-class0", 0.5, "validation reply has an unexpected metric 'dice-class0'"),
    ("metrics", "noise-multiplier", 1.0, "validation reply has an unexpected metric 'noise-multiplier'"),
    ("site", "status", "", "validation reply has status '', not one of ok, refused, error, rejected"),
    ("", "arrays", ArrayRecord({"w": Array(GLOBAL["w"])}), "validation reply has an unexpected array record 'arrays'"),
    ("", "class-codes", ConfigRecord({"organ": ["SCT", "91772007", "SCT", "91772007"]}), "validation reply has an unexpected config record 'class-codes'"),
])
def test_a_validation_reply_that_breaks_the_schema_is_rejected_with_the_reason_and_the_round_goes_on(tmp_path, where, key, value, reason):
    fed = _federation(tmp_path, 2, **{"min-sites": 1})
    good = dict(dice=0.5, iou=0.4, hd95=3.0, epsilon=1.0, **{"dice-class1": 0.5, "dice-class2": math.nan, "num-examples": 10})
    bad = _validation(2, "bad", **good)
    _broken(bad.content, where, key, value)
    metrics = fed.aggregate_evaluate(1, [_validation(1, "good", **good), bad])
    assert metrics["dice"] == pytest.approx(0.5) and fed.record.round(1)["dice"] == pytest.approx(0.5)
    assert fed.record.round(1)["sites"]["bad"] == {"status": "rejected", "reason": reason}


def test_a_broken_validation_inside_a_train_reply_rejects_the_validation_not_the_training(tmp_path):
    fed = _federation(tmp_path, 2, **{"min-sites": 2})
    fed.validating = True
    trained = {"status": "ok", "code": "", "metrics": {"num-examples": 10, "epsilon": 1.0}}
    replies = [Message(content=reply_content({**trained, "site": name, "validation": {"status": "ok", "code": "", "metrics": {"dice": dice, "num-examples": 10}}},
                                             {k: v + 0.01 for k, v in GLOBAL.items()}), reply_to=fed.asked[n])
               for n, name, dice in ((0, "a", 0.4), (1, "b", 7.0))]
    arrays, _ = fed.aggregate_train(1, replies)
    assert arrays is not None and fed.record.round(0)["dice"] == pytest.approx(0.4)
    assert fed.record.round(0)["sites"]["b"] == {"status": "rejected", "reason": "validation reply has dice 7.0, outside [0, 1]"}
    assert fed.record.round(1)["sites"]["b"]["status"] == "ok"


@pytest.mark.parametrize("strategy, settings, needed", [
    ("fedtrimmedavg", {"trim-fraction": 0.2}, 5), ("fedtrimmedavg", {"trim-fraction": 0.34}, 3),
    ("krum", {"byzantine-sites": 1}, 5), ("krum", {"byzantine-sites": 2}, 7), ("fedmedian", {}, 3)])
def test_a_robust_aggregator_that_could_trim_no_one_refuses_to_start(tmp_path, strategy, settings, needed):
    config = run_config({"strategy": strategy, "min-sites": needed - 1, "run-dir": str(tmp_path / "run"), **settings})
    with pytest.raises(AggregatorError, match=f"leaves no site out of a round of {needed - 1} .*set --min-sites to at least {needed}"):
        run_federation(grid=None, config=config)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    check_aggregator({**config, "min-sites": needed})
    # A strategy built around the check (a run started before it) still never aggregates fewer, untrimmed.
    fed = _federation(tmp_path, needed - 1, strategy=strategy, **settings)
    assert fed.min_sites == needed
    assert fed.aggregate_train(1, [_reply(n, f"s{n}", _arrays(0.01)) for n in range(1, needed)]) == (None, None)


def test_averaging_strategies_start_with_any_number_of_sites_and_a_zero_trim_is_refused():
    check_aggregator(run_config({"strategy": "fedavg", "min-sites": 1}))
    with pytest.raises(AggregatorError, match="trim-fraction must be in"):
        check_aggregator(run_config({"strategy": "fedtrimmedavg", "trim-fraction": 0.0, "min-sites": 10}))


def test_the_server_app_shows_its_progress_on_stdout_once_with_or_without_the_cli(capsys):
    """In `flwr-serverapp` (a deployment) fedseg's CLI never configures logging: the app puts its
    progress on stdout, which Flower streams to `fedseg run`; under the CLI's handler it adds none."""
    import logging
    import sys

    from server.server_app import progress_on_stdout

    strategy_log, server_log = logging.getLogger("server.strategy"), logging.getLogger("server")
    with progress_on_stdout():
        strategy_log.info("round 1: aggregated validation Dice 0.500")
    strategy_log.info("after the run, nothing is shown")
    assert capsys.readouterr().out == "round 1: aggregated validation Dice 0.500\n" and not server_log.handlers

    cli_handler = logging.StreamHandler(sys.stdout)
    server_log.addHandler(cli_handler)
    server_log.setLevel(logging.INFO)
    try:
        with progress_on_stdout():
            strategy_log.info("round 2: training at 3 sites")
    finally:
        server_log.removeHandler(cli_handler)
        server_log.setLevel(logging.NOTSET)
    assert capsys.readouterr().out == "round 2: training at 3 sites\n"


# --- class codes: what a site says its classes are -----------------------------------------------

LIVER = ["SCT", "91723000", "SCT", "10200004"]  # Anatomical Structure / Liver
BONE = ["SCT", "85756007", "SCT", "3138006"]  # Tissue / Bone
LESION = ["SCT", "49755003", "SCT", "52988006"]  # Morphologically Abnormal Structure / Lesion
NEOPLASM = ["SCT", "49755003", "SCT", "108369006"]  # Morphologically Abnormal Structure / Neoplasm


def _coded(node: int, name: str, **codes) -> Message:
    reply = _reply(node, name, _arrays(0.01))
    reply.content["class-codes"] = ConfigRecord(codes)
    return reply


def test_the_run_keeps_the_codes_a_majority_of_sites_release_and_warns_once_of_a_class_they_disagree_on(tmp_path, caplog):
    fed = _federation(tmp_path, 3)
    replies = lambda: [_coded(1, "a", organ=LIVER, lesion=LESION), _coded(2, "b", organ=LIVER, lesion=LESION),  # noqa: E731
                       _coded(3, "c", organ=BONE)]
    with caplog.at_level("WARNING", logger="server"):
        assert fed.aggregate_train(1, replies())[0] is not None
        fed.aggregate_train(2, replies())
    expected = {"organ": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]},
                "lesion": {"category": ["SCT", "49755003", "Morphologically Abnormal Structure"], "type": ["SCT", "52988006", "Lesion"]}}
    assert fed.record.class_codes == expected  # the lesion agreed on; the organ by 2 to 1
    warned = [r.getMessage() for r in caplog.records if "code it differently" in r.getMessage()]
    assert warned == ["  class 'organ': the sites' DICOM-SEGs code it differently; the run uses the coding most of them released, "
                      "Anatomical Structure / Liver"]
    assert torch.load(tmp_path / "global_model.pt", weights_only=True)["class_codes"] == expected
    assert json.loads((tmp_path / "history.json").read_text())["class_codes"] == expected


def test_of_two_sites_that_code_a_class_differently_neither_chooses_the_run_codes_it_generically(tmp_path, caplog):
    """The attack: in a two-site federation a hostile site codes the lesion as it likes; a tie went to
    string order, so it won every time. Now a class needs a strict majority, else the generic coding."""
    fed = _federation(tmp_path, 2)
    with caplog.at_level("WARNING", logger="server"):
        fed.aggregate_train(1, [_coded(1, "a", organ=LIVER, lesion=LESION), _coded(2, "hostile", organ=LIVER, lesion=NEOPLASM)])
    assert fed.record.class_codes == {"organ": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}}
    assert "class 'lesion': the sites' DICOM-SEGs code it differently; no coding has a majority" in caplog.text
    assert "lesion" not in torch.load(tmp_path / "global_model.pt", weights_only=True)["class_codes"]  # predicted: generic


NOT_CODES = "has class codes for 'organ' that are not a segmentation property category and type (CID 7150, 7151)"


@pytest.mark.parametrize("codes, reason", [
    ({"organ": ["SCT", "49755003", "SCT", "165816005"]}, NOT_CODES),  # HIV Positive: pydicom's dictionary, a diagnosis
    ({"organ": ["SCT", "49755003", "DCM", "111421"]}, NOT_CODES),  # its meaning is over 64 characters: highdicom refuses it
    ({"organ": ["SCT", "91772007", "SCT", "10200004"]}, NOT_CODES),  # Organ: a type, not a category (CID 7150)
    ({"organ": ["SCT", "91772007", "SCT", "99999999"]}, NOT_CODES),
    ({"organ": ["99WARD7", "X1", "SCT", "10200004"]}, NOT_CODES),
    ({"organ": LIVER[:2]}, NOT_CODES),
    ({"organ": [*LIVER, "Liver of patient X"]}, NOT_CODES),
    ({"organ": 7}, NOT_CODES),
    ({"organ": [1, 2, 3, 4]}, NOT_CODES),
    ({"organ": b"SCT1"}, NOT_CODES),
    ({"organ": ["SCT", "1" * 100_000, "SCT", "10200004"]}, NOT_CODES),
    ({"spleen": LIVER}, "has class codes for 'spleen', not a class of the run"),
    ({"background": LIVER}, "has class codes for 'background', not a class of the run"),
    ({"x" * 100_000: LIVER}, f"has class codes for {'x' * 40!r}, not a class of the run"),
    ({"organ": LIVER, "lesion": LESION, "spleen": LIVER}, "has class codes for 'spleen', not a class of the run"),
])
def test_class_codes_that_break_the_schema_reject_the_reply_and_the_round_goes_on(tmp_path, codes, reason):
    fed = _federation(tmp_path, 3, **{"min-sites": 2})
    arrays, _ = fed.aggregate_train(1, [_coded(1, "a", organ=BONE), _coded(2, "b", organ=BONE), _coded(3, "bad", **codes)])
    assert arrays is not None
    assert fed.record.round(1)["sites"]["bad"] == {"status": "rejected", "reason": f"train reply {reason}"}
    assert fed.record.class_codes == {"organ": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "3138006", "Bone"]}}
