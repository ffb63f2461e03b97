"""The site guard, its policy and ledger, and the courier ClientApp, on real DICOM data and real
Flower Messages. Attacks are made as a hostile coordinator would make them: through the courier,
with the requests it controls."""

import math
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants import RDPAccountant

from client.client_app import build_client_app
from client.guard import open_guard
from client.site_state import SiteState
from client.guard_socket import GuardClient, GuardServer, PREFIX, MAGIC
from client.privacy_ledger import LedgerError, PrivacyLedger
from common.array_codec import arrays_sha256
from common.config import SITE_KEYS, run_config
from common.dataset import Preprocessing
from common.model import build_model
from common.parameters import model_arrays
from common.site_reply import VALIDATE_RECEIVED, weights_content, weights_of

pytestmark = pytest.mark.usefixtures("task_identity")
SETTINGS = {"image-size": 32, "local-epochs": 1, "num-server-rounds": 3, "batch-size": 2, "target-epsilon": 6.0, "delta": 1e-3}
POLICY = {"epsilon_budget": 20.0, "delta": 1e-3, "min_noise_multiplier": 0.3}


def _guard(root: Path, data: Path, **policy):
    guard, _ = open_guard(SiteState(root), "north", data, {**POLICY, **policy})
    return guard


def _request(server_round: int, validate_received: bool = False, **overrides) -> dict:
    cfg = run_config({**SETTINGS, **overrides})
    return {**{k: cfg[k] for k in SITE_KEYS}, "server-round": server_round, VALIDATE_RECEIVED: validate_received}


def _message(kind: str, server_round: int, weights: dict | None = None, **overrides) -> Message:
    content = RecordDict({"config": ConfigRecord(_request(server_round, **overrides))})
    weights_content(content, weights or model_arrays(build_model(3)))
    return Message(content=content, dst_node_id=7, message_type=kind)


def _call(guard, kind: str, server_round: int = 1, run: int = 1, weights: dict | None = None, **overrides) -> Message:
    """The courier's handling of one message from the coordinator (`validate_received=True`: a
    train message that also validates the weights it brings)."""
    context = Context(run_id=run, node_id=7, state=RecordDict(), run_config={}, node_config={"partition-id": 0})
    return build_client_app(lambda _: guard)(_message(kind, server_round, weights, **overrides), context)


def _weights(reply: Message) -> dict:
    return weights_of(reply.content)


def test_reply_carries_only_model_shaped_arrays_and_rounded_scalars(tiny_site, tmp_path):
    guard = _guard(tmp_path, tiny_site)
    model_shapes = {k: tuple(v.shape) for k, v in build_model(3).state_dict().items()}
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = _call(guard, kind)
        assert reply.content["site"]["status"] == "ok", reply.content["site"]
        if kind == MessageType.TRAIN:
            assert {k: tuple(a.shape) for k, a in _weights(reply).items()} == model_shapes
        assert set(reply.content.array_records) <= {"arrays"}
        metrics = reply.content["metrics"]
        assert all(isinstance(v, (int, float)) and (not math.isfinite(v) or round(v, 2) == v) for v in metrics.values())
        assert metrics["num-examples"] % 10 == 0  # binned, not the exact patient count
        assert set(reply.content["site"]) == {"name", "status", "reason"}
        assert set(reply.content) <= {"arrays", "layout", "metrics", "site", "class-codes"}
        # what the classes are: none, as the site has fewer SEGs per class than its count bin (10)
        assert "class-codes" not in reply.content
    released = _call(guard, MessageType.TRAIN, 2).content["metrics"]
    assert "steps" not in released and "train-loss" not in released  # steps reveal N; the loss is outside ε


def test_the_released_count_is_the_count_the_round_was_planned_on(tiny_site, tmp_path):
    """Rounded down like σ's planning, not up: a count rounded up next to σ planned on one rounded down
    would pin a bin's edge exactly."""
    key = {"validation_key": "5a" * 16}  # the probe and the site split alike (a fresh key each would not)
    patients = len(_guard(tmp_path / "probe", tiny_site, **key).data(("background", "organ", "lesion"),
                                                                     Preprocessing.from_config(run_config(SETTINGS))).train)
    assert patients >= 3  # so a bin of patients - 1 rounds down and up differently
    guard = _guard(tmp_path / "site", tiny_site, example_count_bin=patients - 1, **key)
    released = _call(guard, MessageType.TRAIN).content["metrics"]["num-examples"]
    assert released == guard.policy.planned_count(patients) == patients - 1 != guard.policy.binned(patients)


def test_one_message_validates_the_weights_it_brings_then_trains_on_them(tiny_site, tmp_path):
    guard = _guard(tmp_path, tiny_site)
    first = _call(guard, MessageType.TRAIN, 1, validate_received=True)
    assert first.content["site"]["status"] == "ok" and "arrays" in first.content
    assert first.content["validation-site"]["status"] == "ok" and 0 <= first.content["validation-metrics"]["dice"] <= 1
    second = _call(guard, MessageType.TRAIN, 2, weights=_weights(first), validate_received=True)
    assert second.content["validation-site"]["status"] == "ok"
    kinds = [(e["kind"], e["round"], e.get("untrained")) for e in guard.ledger.entries if e["kind"] != "genesis"]
    # round 0's weights were nobody's here (the daily cap counts them); round 1's were trained here
    assert kinds == [("validate", 0, True), ("train", 1, None), ("validate", 1, False), ("train", 2, None)]
    assert guard.ledger.entries[3]["received_sha256"] == arrays_sha256(_weights(first))
    # a retried round asks again: the validation is refused (once per round), the training is served
    retry = _call(guard, MessageType.TRAIN, 2, weights=_weights(first), validate_received=True)
    assert (retry.content["validation-site"]["status"], retry.content["validation-site"]["reason"]) == ("refused", "validation_limit")
    assert retry.content["site"]["status"] == "ok" and not dict(retry.content["validation-metrics"])
    # a training refusal does not take the validation down with it
    refused = _call(guard, MessageType.TRAIN, 3, weights=_weights(second), validate_received=True, **{"num-server-rounds": 1000})
    assert refused.content["site"]["reason"] == "rounds_over_policy" and "arrays" not in refused.content
    assert refused.content["validation-site"]["status"] == "ok" and "dice" in refused.content["validation-metrics"]


def test_patient_level_epsilon_is_opacus_rdp_over_patient_sampling_and_survives_a_new_run(tiny_site, tmp_path):
    guard = _guard(tmp_path, tiny_site)
    patients = len(guard.data(("background", "organ", "lesion"), Preprocessing.from_config(run_config(SETTINGS))).train)
    q = min(1.0, SETTINGS["batch-size"] / guard.policy.planned_count(patients))  # planned on one bin at least, never the exact count
    assert patients < guard.policy.example_count_bin and q < 1.0
    steps_each = round(SETTINGS["local-epochs"] / q)
    epsilons, steps = [], 0
    for server_round in (1, 2, 3):
        metrics = _call(guard, MessageType.TRAIN, server_round).content["metrics"]
        sigma = guard.ledger.history[-1][0]
        steps += steps_each
        orders = RDPAccountant.DEFAULT_ALPHAS
        expected, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=1e-3)
        assert guard.ledger.history[-1][1:] == (q, steps_each)
        assert guard.spent() == pytest.approx(expected, rel=1e-9)
        assert metrics["epsilon"] == round(expected, 2)
        epsilons.append(expected)
    assert epsilons[0] < epsilons[1] < epsilons[2] == pytest.approx(SETTINGS["target-epsilon"], abs=0.05)
    # Another run, another seed, another class order, a restarted guard: the same patients, the same ledger.
    again = _guard(tmp_path, tiny_site)
    reply = _call(again, MessageType.TRAIN, 1, run=2, seed=99, classes="lesion,organ")
    assert reply.content["metrics"]["epsilon"] > round(epsilons[2], 2)


def test_an_added_patient_inherits_the_running_total(tiny_federation, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_federation / "site-01", data)
    guard = _guard(tmp_path / "state", data)
    _call(guard, MessageType.TRAIN, 1)
    spent = guard.spent()
    newcomer = sorted(p for p in (tiny_federation / "site-02").iterdir() if p.is_dir())[0]
    shutil.copytree(newcomer, data / newcomer.name)
    reloaded = _guard(tmp_path / "state", data)
    assert reloaded.spent() == spent > 0
    assert _call(reloaded, MessageType.TRAIN, 1, run=2).content["metrics"]["epsilon"] > round(spent, 2)


def test_hostile_requests_are_refused_with_codes_and_spend_nothing(tiny_site, tmp_path):
    guard = _guard(tmp_path, tiny_site)
    attempts = {
        "delta_above_policy": dict(kind=MessageType.TRAIN, delta=0.99),
        "noise_below_policy": dict(kind=MessageType.TRAIN, **{"noise-multiplier": 0.05}),
        "class_not_in_policy": dict(kind=MessageType.TRAIN, classes="organ,brain"),
        "non_private_not_allowed": dict(kind=MessageType.TRAIN, **{"target-epsilon": math.inf}),
        "rounds_over_policy": dict(kind=MessageType.TRAIN, **{"num-server-rounds": 1000}),
    }
    for code, request in attempts.items():
        kind = request.pop("kind")
        reply = _call(guard, kind, request.pop("server_round", 1), **request)
        assert (reply.content["site"]["status"], reply.content["site"]["reason"]) == ("refused", code)
        assert "arrays" not in reply.content and not dict(reply.content["metrics"])
    assert guard.spent() == 0.0 and not guard.ledger.history  # nothing spent, nothing released
    assert [e["code"] for e in guard.ledger.entries if e["kind"] == "refusal"] == list(attempts)
    # one validation per (run, round): the second query of round 0 in the same run is refused
    assert _call(guard, MessageType.EVALUATE, 0).content["site"]["status"] == "ok"
    assert _call(guard, MessageType.EVALUATE, 0).content["site"]["reason"] == "validation_limit"
    # weights this site did not train in that run (round 0, or a round the run never trained here, as
    # after a resume) under ever new run names: capped per day, site-wide
    untrained = [_call(guard, MessageType.EVALUATE, 5 * (i % 2), run=100 + i).content["site"]["reason"] for i in range(5)]
    assert untrained == ["", "", "", "validation_limit", "validation_limit"]  # 1 above + 3 = the policy's 4 a day
    assert [e["code"] for e in guard.ledger.entries if e["kind"] == "refusal"][-3:] == ["validation_limit"] * 3
    # values no run needs, which would hang the accountant or burn budget for nothing
    for absurd in ({"noise-multiplier": float("nan")}, {"noise-multiplier": 1e6}, {"target-epsilon": -1.0},
                   {"target-epsilon": 1e-9}, {"batch-size": 0}, {"max-grad-norm": 0.0}, {"local-epochs": 10**6},
                   {"image-size": 8}, {"image-size": 100_000}):
        reply = _call(guard, MessageType.TRAIN, 1, **absurd)
        assert reply.content["site"]["reason"] == "bad_request", absurd
    assert guard.spent() == 0.0
    # over budget: refused before any data is touched
    poor = _guard(tmp_path / "poor", tiny_site, epsilon_budget=0.5)
    assert _call(poor, MessageType.TRAIN).content["site"]["reason"] == "budget_exhausted" and poor.spent() == 0.0


def test_released_sigma_and_epsilon_depend_on_the_patient_bin_not_the_exact_count(tiny_site, tmp_path):
    from common.config import TrainSettings

    guard = _guard(tmp_path, tiny_site)
    settings = TrainSettings.from_config({**_request(1), "batch-size": 16, "target-epsilon": 8.0, "delta": 1e-5})
    plans = {n: guard.plan(settings, n) for n in (41, 44, 49)}
    assert len(set(plans.values())) == 1 and plans[41].sample_rate == 16 / 40
    assert guard.plan(settings, 51) != plans[41]


def test_the_ct_window_and_class_weights_come_with_the_rounds_config_and_a_bad_one_is_a_bad_request(tiny_site, tmp_path, monkeypatch):
    """The coordinator chooses the window for the task (the same for every patient: no privacy cost);
    the site prepares its patients with it. Its value is the courier's to send, so it is checked."""
    import client.guard as guard_module

    guard, used, real_load = _guard(tmp_path, tiny_site), [], guard_module.load_site
    monkeypatch.setattr(guard_module, "load_site", lambda folder, classes, preprocessing, *rest:
                        used.append(preprocessing) or real_load(folder, classes, preprocessing, *rest))
    assert _call(guard, MessageType.EVALUATE, 0, **{"ct-window": "-200,1500"}).content["site"]["status"] == "ok"
    assert used == [Preprocessing(32, (-200.0, 1500.0), 4.0, "z-score")]
    weights = model_arrays(build_model(3))
    older = {k: v for k, v in _request(0).items() if k not in ("ct-window", "spacing", "mr-intensity")}  # a server from before the options
    reply, _ = guard.handle({"op": "validate", "run": "older", "round": 0, "settings": older}, weights)
    assert reply["status"] == "ok" and used[-1] == Preprocessing(32, (-160.0, 240.0), 0.0, "percentiles")
    for bad in ("1500,-200", "-160", "nan,240", "-160,1e9", 240.0, [-160, 240]):
        reply, out = guard.handle({"op": "validate", "run": "bad", "round": 0, "settings": {**_request(0), "ct-window": bad}}, weights)
        assert (reply["status"], reply["code"], out) == ("refused", "bad_request", {}), bad
    for bad in (-1.0, 0.1, 25.0, "nan", "4 mm"):  # a spacing outside 0.25-20 mm (or 0), whatever the policy
        reply, out = guard.handle({"op": "validate", "run": "bad", "round": 0, "settings": {**_request(0), "spacing": bad}}, weights)
        assert (reply["status"], reply["code"], out) == ("refused", "bad_request", {}), bad
    for bad in ("histogram", 1, None):  # MR's normalisation: one of the two rules
        reply, out = guard.handle({"op": "validate", "run": "bad", "round": 0, "settings": {**_request(0), "mr-intensity": bad}}, weights)
        assert (reply["status"], reply["code"], out) == ("refused", "bad_request", {}), bad
    assert len(used) == 2  # a refused window, spacing or MR rule never reached the data
    for bad in ("organ:1e9,lesion", "organ:nan,lesion", "organ:0,lesion", "organ:-2,lesion", "organ,lesion:x"):  # class weights
        for op in ("train", "validate"):
            reply, out = guard.handle({"op": op, "run": "bad", "round": 1, "settings": {**_request(1), "classes": bad}}, weights)
            assert (reply["status"], reply["code"], out) == ("refused", "bad_request", {}), bad
    assert len(used) == 2 and guard.spent() == 0.0


def test_noise_cannot_be_replayed_from_the_run_config(tiny_site, tmp_path):
    """Same seed, same data, same global model: the updates differ, and a replay on all-zero images
    does not reproduce the noise (it is drawn from an OS-seeded generator)."""
    start = model_arrays(build_model(3))
    first = _weights(_call(_guard(tmp_path / "a", tiny_site), MessageType.TRAIN, 1, weights=start))
    second = _weights(_call(_guard(tmp_path / "b", tiny_site), MessageType.TRAIN, 1, weights=start))
    name = next(iter(start))
    assert not np.allclose(first[name], second[name])
    zeros = tmp_path / "zeros"
    shutil.copytree(tiny_site, zeros)
    import pydicom
    for path in zeros.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if ds.Modality == "CT":
            ds.PixelData = bytes(len(ds.PixelData))
            ds.save_as(path)
    replay = _weights(_call(_guard(tmp_path / "c", zeros), MessageType.TRAIN, 1, weights=start))
    noise_a, noise_b = first[name] - start[name], replay[name] - start[name]
    assert abs(np.corrcoef(noise_a.ravel(), noise_b.ravel())[0, 1]) < 0.9


def test_ledger_edits_deletion_and_replacement_stop_the_site(tiny_site, tmp_path):
    guard = _guard(tmp_path, tiny_site)
    trained = _call(guard, MessageType.TRAIN, 1).content["site"]
    assert trained["status"] == "ok", trained
    state = SiteState(tmp_path)
    lines = state.ledger_file.read_text().splitlines()
    edited = lines[1].replace('"epsilon_after": ', '"epsilon_after": 0.0, "x": ')
    state.ledger_file.write_text("\n".join([lines[0], edited, *lines[2:]]) + "\n")
    with pytest.raises(LedgerError, match="hash chain"):
        state.open("north")
    state.ledger_file.write_text("\n".join(lines) + "\n")
    assert state.open("north")[1].epsilon(1e-3) > 0  # restored from backup: as it was
    original = state.ledger_file.read_bytes()
    state.ledger_file.unlink()
    with pytest.raises(LedgerError, match="missing"):
        state.open("north", create_with=POLICY)  # never recreated silently
    PrivacyLedger.create(state.ledger_file, "north")  # a fresh ledger slipped in
    with pytest.raises(LedgerError, match="another genesis"):
        state.open("north")
    state.ledger_file.write_bytes(original)


def test_a_load_error_leaves_as_a_code_without_patient_identifiers(tiny_site, tmp_path, caplog):
    patient_ids = [p.name for p in tiny_site.iterdir() if p.is_dir()]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_site, broken)
    for seg in broken.rglob("SEG/*.dcm"):
        seg.write_bytes(b"garbage")
    caplog.set_level("INFO", logger="client")
    reply = _call(_guard(tmp_path / "b", broken), MessageType.TRAIN, 1)
    assert (reply.content["site"]["status"], reply.content["site"]["reason"]) == ("refused", "data_unusable")
    site_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("client."))
    assert any(pid in site_log for pid in patient_ids)  # the detail exists: at the site, in its own log
    # What the server keeps of it: its history and its console log hold the code, not the patients.
    from flwr.serverapp.strategy import FedAvg

    from server.run_record import RunRecord
    from server.strategy import FederationStrategy

    caplog.set_level("INFO", logger="server")
    record = RunRecord(tmp_path / "run", run_config({"min-sites": 1}))
    strategy = FederationStrategy(FedAvg(min_train_nodes=1), record)
    strategy.sent = model_arrays(build_model(3))
    strategy.aggregate_train(1, [reply])
    record.write_history()
    console = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("server."))  # the server's, not the site's
    kept = (tmp_path / "run" / "history.json").read_text() + console + repr(reply.content)
    assert "data_unusable" in kept
    assert not any(pid in kept for pid in patient_ids) and str(broken) not in kept and "site-01" not in kept


def test_a_spacing_finer_than_the_policy_allows_is_refused_before_the_data_is_touched(tiny_site, tmp_path, monkeypatch):
    """A hostile coordinator asks for 0.25 mm pixels (the tiny site's ~9 mm series ~1400x in memory).
    The site refuses it by its policy (`min_spacing_mm`), from the request alone, so the refusal says
    nothing of its data: nothing is loaded, nothing spent; 8 mm trains next."""
    import client.guard

    loads = []
    real_load = client.guard.load_site
    monkeypatch.setattr(client.guard, "load_site", lambda *args: loads.append(args[2]) or real_load(*args))
    guard = _guard(tmp_path, tiny_site)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        for spacing in (0.25, 0.99):
            reply = _call(guard, kind, 1, spacing=spacing)
            assert (reply.content["site"]["status"], reply.content["site"]["reason"]) == ("refused", "spacing_below_policy"), kind
    assert loads == [] and guard.spent() == 0.0
    assert _call(guard, MessageType.TRAIN, 1, spacing=8.0).content["site"]["status"] == "ok"
    assert [p.spacing for p in loads] == [8.0] and guard.spent() > 0
    finer = _guard(tmp_path / "finer", tiny_site, min_spacing_mm=0.25)  # a site that allows it, by its own policy
    assert _call(finer, MessageType.EVALUATE, 0, spacing=0.25).content["site"]["status"] == "ok"


def test_audit_log_names_exactly_the_arrays_the_server_received(tiny_site, tmp_path, fedseg_here):
    guard = _guard(tmp_path, tiny_site, example_count_bin=2)  # so the site's few SEGs release their codes
    reply = _call(guard, MessageType.TRAIN, 1)
    entry = guard.ledger.entries[-1]
    assert entry["kind"] == "train" and entry["released_sha256"] == arrays_sha256(_weights(reply))
    assert entry["metrics"] == dict(reply.content["metrics"])
    assert entry["class_codes"] == dict(reply.content["class-codes"])  # the class codes released, as released
    assert dict(reply.content["class-codes"]) == {"organ": ["SCT", "91723000", "SCT", "91772007"],
                                                  "lesion": ["SCT", "49755003", "SCT", "52988006"]}
    out = fedseg_here("audit", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0 and "hash chain OK" in out.stdout and entry["released_sha256"][:16] in out.stdout
    assert "unit of privacy: the patient" in out.stdout
    assert "class lesion coded Morphologically Abnormal Structure / Lesion (SCT 49755003 / SCT 52988006)" in out.stdout
    SiteState(tmp_path).ledger_file.write_text(SiteState(tmp_path).ledger_file.read_text().replace('"train"', '"genesis"'))
    out = fedseg_here("audit", str(tmp_path), cwd=tmp_path)
    assert out.returncode != 0 and "AUDIT FAILED" in out.stderr


def test_guard_socket_serves_the_courier_and_drops_pickles(tiny_site, tmp_path):
    import io
    import pickle

    guard = _guard(tmp_path / "state", tiny_site)
    path = tmp_path / "guard.sock"
    server = GuardServer(path, guard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reply = _call(GuardClient(path), MessageType.TRAIN, 1)
        assert reply.content["site"]["status"] == "ok" and "arrays" in reply.content
        evil = io.BytesIO()
        np.save(evil, np.array([object()], dtype=object), allow_pickle=True)
        payload = pickle.dumps({"op": "train"})
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(PREFIX.pack(MAGIC, len(payload), 0) + payload)
            assert sock.recv(10) == b""  # not JSON: dropped, no answer
        assert len(guard.ledger.history) == 1
    finally:
        server.shutdown()
        server.server_close()
    # A courier that drips its request a byte at a time loses the guard after the frame's deadline.
    server = GuardServer(path, guard, timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        import time
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            started = time.monotonic()
            with pytest.raises(OSError):
                for byte in PREFIX.pack(MAGIC, 100, 0) + b"{" * 100:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
            assert time.monotonic() - started < 5
    finally:
        server.shutdown()
        server.server_close()


def test_two_guards_take_turns_on_the_ledger(tiny_site, tmp_path):
    """One holds the ledger from budget check to write; the other, waiting, then sees its spending."""
    first = _guard(tmp_path, tiny_site)
    second = _guard(tmp_path, tiny_site)
    seen = []
    with first.ledger.locked():
        def other():
            with second.ledger.locked():
                seen.append(list(second.ledger.history))
        waiting = threading.Thread(target=other)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not seen
        first.ledger.append("train", run="a", round=1, event=[1.0, 0.1, 10])
    waiting.join(timeout=10)
    assert seen == [[(1.0, 0.1, 10)]]


def test_server_records_a_refusing_site_and_aggregates_the_others(tiny_site, tmp_path):
    import torch
    from flwr.serverapp.strategy import FedAvg

    from server.run_record import RunRecord
    from server.strategy import FederationStrategy

    ok = _call(_guard(tmp_path / "a", tiny_site, example_count_bin=2), MessageType.TRAIN)
    refused = _call(_guard(tmp_path / "b", tiny_site, epsilon_budget=0.5), MessageType.TRAIN)
    refused.content["site"]["name"] = "south"
    record = RunRecord(tmp_path / "run", run_config({"min-sites": 1}))
    strategy = FederationStrategy(FedAvg(min_train_nodes=1), record)
    strategy.sent = released = _weights(ok)
    arrays, _ = strategy.aggregate_train(1, [ok, refused])
    aggregated = arrays.to_torch_state_dict()
    for key, value in released.items():
        assert torch.allclose(aggregated[key], torch.from_numpy(value))
    sites = record.round(1)["sites"]
    assert sites["north"]["status"] == "ok" and sites["south"]["status"] == "refused"
    assert sites["south"]["reason"] == "budget_exhausted"
    # what the generator's SEGs say the classes are, from the site's files to the run's checkpoint
    assert torch.load(record.dir / "global_model.pt", weights_only=True)["class_codes"] == {
        "organ": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "91772007", "Organ"]},
        "lesion": {"category": ["SCT", "49755003", "Morphologically Abnormal Structure"], "type": ["SCT", "52988006", "Lesion"]}}


def test_slice_choice_oversamples_the_patients_rarest_class_from_its_own_labels():
    """At least half of a sampled patient's slices show its rarest foreground class (nnU-Net-style
    oversampling), read from that patient's labels alone; patients without foreground draw at random."""
    import torch

    from client.training import _slices
    from common.dataset import Patient

    masks = np.zeros((8, 8, 8), np.uint8)
    masks[:, :3, :3] = 1  # organ on every slice
    masks[[2, 5], 3:8, 3:8] = 2  # lesion on two of eight: 50 pixels in all, fewer than the organ's 72

    def patient(pid: str, labels: np.ndarray) -> Patient:
        return Patient(pid, [np.zeros((1, 8, 8), np.float32)] * len(labels), list(labels))

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        chosen = _slices(patient("p", masks), 4, generator)
        assert len(chosen) == 4 and len({k for k, _ in chosen}) == 4
        assert {(2, 2), (5, 2)} <= set(chosen)  # the lesion's slices, their patches centred on the lesion
        assert all(focus == 0 for k, focus in chosen if k not in (2, 5))
    assert len(_slices(patient("q", masks[[0, 2]]), 4, generator)) == 4  # with replacement only when the patient has too few
    empty = _slices(patient("r", np.zeros_like(masks)), 4, generator)
    assert len({k for k, _ in empty}) == 4 and {focus for _, focus in empty} == {0}
