"""A simulation's sites: each guard served from its own process on a socket, faults injected on the
site's side of it, and the courier finding a virtual SuperNode's socket."""

import os
from pathlib import Path

import numpy as np
import psutil
import pytest

from client.client_app import SIMULATED_SOCKETS, socket_guard
from client.guard_socket import GuardClient
from common.site_files import site_folders
from simulations.faults import FaultyGuard
from simulations.simulate import prepare_sites
from simulations.site_guards import SiteGuardError, serve_guards

POLICY = {"epsilon_budget": 10.0, "delta": 1e-5, "min_noise_multiplier": 0.0, "allow_non_private": False,
          "max_rounds_per_run": 100, "classes": ("organ", "lesion")}


class _Trains:
    """A guard that answers a train request with its weights plus one."""

    def handle(self, header, arrays):
        return {"status": "ok", "code": "", "site": "s", "metrics": {}}, {k: v + 1.0 for k, v in arrays.items()}


def _train(guard, server_round: int, op: str = "train"):
    sent = {"a": np.zeros((3, 2), np.float32), "b": np.ones(4, np.float32)}
    return sent, *guard.handle({"op": op, "round": server_round, "settings": {}}, sent)


def test_a_faulty_guard_corrupts_its_training_answers_one_kind_per_round_in_turn():
    guard = FaultyGuard(_Trains(), "site-03", ["nan", "shape", "scale", "crash"])
    _, reply, out = _train(guard, 1)
    assert reply["status"] == "ok" and np.isnan(out["a"]).all() and (out["b"] == 2).all()
    _, _, out = _train(guard, 2)
    assert out["a"].shape == (2, 2)
    sent, _, out = _train(guard, 3)
    assert np.allclose(out["a"], sent["a"] + 100) and np.allclose(out["b"], sent["b"] + 100)
    _, reply, out = _train(guard, 4)
    assert reply == {"status": "error", "code": "internal_error", "site": "site-03", "metrics": {}} and out == {}
    _, _, out = _train(guard, 5)  # round 5 is round 1's kind again
    assert np.isnan(out["a"]).all()
    _, reply, out = _train(guard, 4, op="validate")  # only training goes wrong
    assert reply["status"] == "ok" and (out["a"] == 1).all()


def test_the_courier_takes_the_node_configs_socket_else_the_simulations_socket_for_its_partition(monkeypatch):
    monkeypatch.setenv(SIMULATED_SOCKETS, os.pathsep.join(["/s/0.sock", "/s/1.sock"]))
    assert socket_guard({"guard-socket": "/site/guard.sock", "partition-id": 1}).path == "/site/guard.sock"
    assert socket_guard({"partition-id": 1, "num-partitions": 2}).path == "/s/1.sock"
    with pytest.raises(LookupError):
        socket_guard({"partition-id": 2, "num-partitions": 3})
    monkeypatch.delenv(SIMULATED_SOCKETS)
    with pytest.raises(LookupError):
        socket_guard({"partition-id": 0})


@pytest.mark.slow  # two fresh interpreters importing torch
def test_each_site_is_served_by_a_guard_process_of_its_own_until_the_block_ends(tiny_federation, tmp_path):
    sites = site_folders(tiny_federation)
    prepare_sites(sites, tmp_path, POLICY)
    with serve_guards(sites, tmp_path, {1: ["crash"]}, threads=1, log_dir=tmp_path / "logs") as guards:
        guards.wait_ready()
        sockets = guards.sockets
        for site, path in zip(sites, sockets, strict=True):
            reply, _ = GuardClient(path, timeout=60).handle({"op": "bogus", "round": 1, "settings": {}}, {})
            assert reply["site"] == Path(site).name and reply["code"] == "bad_request"
        reply, _ = GuardClient(sockets[1], timeout=60).handle({"op": "train", "round": 1, "settings": {}}, {})
        assert reply["code"] == "internal_error"  # the fault is site 2's, on its side of the socket
        serving = {c.laddr: child for child in psutil.Process().children() for c in child.net_connections(kind="unix") if c.laddr in sockets}
        assert sorted(serving) == sorted(sockets) and len({p.pid for p in serving.values()}) == len(sites)  # one process each
    assert not any(Path(s).exists() for s in sockets)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in serving.values())


@pytest.mark.slow
def test_a_guard_that_cannot_open_its_ledger_fails_the_start(tiny_federation, tmp_path):
    with pytest.raises(SiteGuardError, match="site-01"):
        with serve_guards(site_folders(tiny_federation)[:1], tmp_path / "no-such-state", {}, threads=1, log_dir=tmp_path) as guards:
            guards.wait_ready()
