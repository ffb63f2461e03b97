"""The site's ClientApp, called with real Flower Messages on real DICOM data."""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from client.client_app import build_client_app
from client.privacy_ledger import LedgerError, PrivacyLedger
from common.config import class_names, run_config
from common.model import build_model
from common.parameters import to_arrays
from server.server_app import SITE_KEYS

pytestmark = pytest.mark.usefixtures("task_identity")
SETTINGS = {"image-size": 32, "local-epochs": 1, "num-server-rounds": 3, "batch-size": 8, "target-epsilon": 4.0}


def _config(server_round: int, **overrides) -> ConfigRecord:
    cfg = run_config({**SETTINGS, **overrides})
    return ConfigRecord({**{k: cfg[k] for k in SITE_KEYS}, "server-round": server_round})


def _call(site_dir, ledger_dir, kind, server_round=1, budget=100.0, name="north", **overrides) -> Message:
    config = _config(server_round, **overrides)
    model = build_model(len(class_names(config)))
    msg = Message(content=RecordDict({"arrays": to_arrays(model), "config": config}), dst_node_id=7, message_type=kind)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(site_dir), "site-name": name, "ledger-dir": str(ledger_dir), "epsilon-budget": budget})
    return build_client_app()(msg, context)


def test_reply_carries_only_model_shaped_arrays_and_scalars(tiny_site, tmp_path):
    model_shapes = {k: tuple(v.shape) for k, v in build_model(3).state_dict().items()}
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = _call(tiny_site, tmp_path, kind)
        assert not reply.has_error(), reply.error
        for record in reply.content.array_records.values():
            assert {k: tuple(a.shape) for k, a in record.items()} == model_shapes
        for record in reply.content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in record.values())
        for record in reply.content.config_records.values():
            assert set(record) == {"name", "status", "reason"} and all(isinstance(v, str) for v in record.values())
        assert set(reply.content) <= {"arrays", "metrics", "site"}
    assert "arrays" in _call(tiny_site, tmp_path, MessageType.TRAIN).content
    assert "arrays" not in _call(tiny_site, tmp_path, MessageType.EVALUATE).content


def test_epsilon_grows_every_round_and_equals_opacus_rdp(tiny_site, tmp_path):
    epsilons, steps_total = [], 0
    for server_round in (1, 2, 3):  # a fresh ClientApp every round, as Flower does
        metrics = _call(tiny_site, tmp_path, MessageType.TRAIN, server_round).content["metrics"]
        sigma, steps, n = metrics["noise-multiplier"], int(metrics["steps"]), int(metrics["num-examples"])
        steps_total += steps
        q = 1 / math.ceil(n / SETTINGS["batch-size"])
        orders = RDPAccountant.DEFAULT_ALPHAS
        expected, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps_total, orders=orders), delta=1e-5)
        assert metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
        epsilons.append(metrics["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert epsilons[2] == pytest.approx(SETTINGS["target-epsilon"], abs=0.05)  # σ was calibrated for 3 rounds
    # a new run on the same data continues from the site's ledger, it does not start from zero
    evaluated = _call(tiny_site, tmp_path, MessageType.EVALUATE).content["metrics"]
    assert evaluated["epsilon"] == pytest.approx(epsilons[2])


def test_site_over_budget_refuses_to_train_and_says_why(tiny_site, tmp_path):
    reply = _call(tiny_site, tmp_path, MessageType.TRAIN, budget=0.5)
    assert reply.content["site"]["status"] == "budget_exhausted"
    assert "budget of 0.5" in reply.content["site"]["reason"]
    assert "arrays" not in reply.content and reply.content["metrics"]["epsilon"] == 0.0
    assert not list(tmp_path.glob("privacy_ledger-*.json"))  # nothing was spent


def test_training_without_dp_spends_unbounded_privacy(tiny_site, tmp_path):
    reply = _call(tiny_site, tmp_path, MessageType.TRAIN, budget=math.inf, **{"target-epsilon": math.inf})
    assert reply.content["metrics"]["epsilon"] == math.inf and reply.content["metrics"]["noise-multiplier"] == 0.0
    refused = _call(tiny_site, tmp_path, MessageType.TRAIN, budget=100.0)  # DP afterwards cannot undo it
    assert refused.content["site"]["status"] == "budget_exhausted"


def test_corrupt_ledger_stops_the_site(tmp_path):
    ledger = PrivacyLedger(tmp_path, "abc", "north")
    ledger.record_round([(1.0, 0.1, 10)], 1e-5, "run", 1, private=True)
    assert PrivacyLedger(tmp_path, "abc", "north").epsilon(1e-5) == pytest.approx(ledger.epsilon(1e-5))
    ledger.path.write_text(json.dumps({"accountant_history": "garbage"}))
    with pytest.raises(LedgerError, match="not reset"):
        PrivacyLedger(tmp_path, "abc", "north")


def test_server_records_a_refusing_site_and_aggregates_the_others(tiny_site, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from server.run_record import RunRecord
    from server.strategy import FederationStrategy

    ok = _call(tiny_site, tmp_path / "a", MessageType.TRAIN, name="north")
    refused = _call(tiny_site, tmp_path / "b", MessageType.TRAIN, budget=0.5, name="south")
    record = RunRecord(tmp_path / "run", run_config({"min-sites": 1}))
    strategy = FederationStrategy(FedAvg(min_train_nodes=1), record, progress=lambda _: None)
    strategy.sent = {k: v.numpy() for k, v in ok.content["arrays"].items()}  # the global model's names, shapes, dtypes
    arrays, _ = strategy.aggregate_train(1, [ok, refused])
    aggregated = arrays.to_torch_state_dict()
    for key, value in ok.content["arrays"].to_torch_state_dict().items():
        assert torch.allclose(aggregated[key], value)  # only the site that trained contributes
    sites = record.round(1)["sites"]
    assert sites["north"]["status"] == "ok" and sites["south"]["status"] == "budget_exhausted"
    assert "budget" in sites["south"]["reason"]
    assert (tmp_path / "run" / "checkpoints" / "global_model-round001.pt").is_file()


def test_two_runs_on_the_same_data_take_turns_on_the_ledger(tmp_path):
    """Run A holds the ledger from budget check to write; run B, waiting, then sees A's spending."""
    import threading

    first = PrivacyLedger(tmp_path, "abc", "north")
    seen = []
    with first.locked():
        second = PrivacyLedger(tmp_path, "abc", "north")

        def other_run():
            with second.locked():
                seen.append(list(second.history))

        waiting = threading.Thread(target=other_run)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not seen  # blocked while run A trains
        first.record_round([(1.0, 0.1, 10)], 1e-5, "run-a", 1, private=True)
    waiting.join(timeout=10)
    assert seen == [[(1.0, 0.1, 10)]]  # re-read under the lock: A's steps count against B's budget
