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
from server.run_record import ResumeError, RunRecord, run_status
from server.strategy import FederationStrategy, build_strategy
from server.update_check import screen_updates

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


def _reply(node: int, name: str, arrays: ArrayRecord | None, examples: int = 10, status: str = "ok") -> Message:
    ask = _ask(node)
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5, "epsilon": 1.0,
                                                   "noise-multiplier": 1.0, "steps": 4}),
                          "site": ConfigRecord({"name": name, "status": status, "reason": ""})})
    if arrays is not None:
        content["arrays"] = arrays
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
    rejected = screen_updates(updates, GLOBAL, max_norm_ratio=10.0)
    assert set(rejected) == {"nan", "inf", "shape", "dtype", "names", "huge"}
    assert "NaN or Inf" in rejected["nan"] and "NaN or Inf" in rejected["inf"]
    assert "shape (3, 3)" in rejected["shape"] and "float64" in rejected["dtype"]
    assert "missing ['b']" in rejected["names"] and "unexpected ['extra']" in rejected["names"]
    assert "100x the median" in rejected["huge"]
    # Two sites: the extreme one is caught, not both; the check can be turned off.
    assert set(screen_updates({"a": _arrays(0.01), "b": _arrays(1.0)}, GLOBAL, 10.0)) == {"b"}
    assert screen_updates({"a": _arrays(0.01), "b": _arrays(1.0)}, GLOBAL, 0.0) == {}


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "fedtrimmedavg", "krum"])
def test_a_round_survives_bad_sites_with_every_aggregator(tmp_path, strategy):
    config = run_config({"strategy": strategy, "min-sites": 2, "byzantine-sites": 1, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record, progress=lambda _: None)
    fed.sent = dict(GLOBAL)
    fed.asked = [_ask(n) for n in range(1, 8)]
    # The SuperLink answers for a dead node itself: the error's source is the SuperLink (node 1 here too).
    dead = Message(Error(code=5, reason="Node unavailable"), reply_to=fed.asked[5])
    dead.metadata.__dict__["_src_node_id"] = 1
    replies = [_reply(1, "a", _arrays(0.01)), _reply(2, "b", _arrays(0.012)), _reply(3, "c", _arrays(0.011)),
               _reply(4, "nan", _arrays(0.0, w=np.full((4, 3), np.nan, np.float32))),
               _reply(5, "broke", None, status="budget_exhausted"), dead]  # node 7 never answers
    arrays, _ = fed.aggregate_train(1, replies)
    result = [a.numpy() for a in arrays.values()]
    assert all(np.isfinite(r).all() for r in result)
    assert all(0.009 <= float(r.mean()) <= 0.013 for r in result)  # only the honest changes
    sites = record.round(1)["sites"]
    assert {n: s["status"] for n, s in sites.items()} == {
        "a": "ok", "b": "ok", "c": "ok", "nan": "rejected", "broke": "budget_exhausted", "node-6": "train_failed", "node-7": "no_reply"}
    assert "Node unavailable" in sites["node-6"]["reason"] and "round timeout" in sites["node-7"]["reason"]
    assert (tmp_path / "checkpoints" / "global_model-round001.pt").is_file()


def test_too_few_usable_updates_are_never_aggregated(tmp_path):
    config = run_config({"min-sites": 2, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record, progress=lambda _: None)
    fed.sent, fed.asked = dict(GLOBAL), [_ask(1), _ask(2)]
    arrays, _ = fed.aggregate_train(1, [_reply(1, "a", _arrays(0.01)), _reply(2, "b", _arrays(0.01, b=np.full(3, np.inf, np.float32)))])
    assert arrays is None
    assert not (tmp_path / "checkpoints").exists()


def test_fedadam_resumes_with_its_moments_and_the_history_cut_at_the_last_completed_round(tmp_path):
    config = run_config({"strategy": "fedadam", "min-sites": 1, "num-server-rounds": 3, "run-dir": str(tmp_path)})
    record = RunRecord(tmp_path, config)
    fed = FederationStrategy(build_strategy(config), record, progress=lambda _: None)
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
    again = FederationStrategy(build_strategy(resumed.config), resumed, progress=lambda _: None)
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
