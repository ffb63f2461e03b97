"""Deployment with real processes on loopback: `fedseg server` (SuperLink, TLS, site authentication),
two `fedseg site` SuperNodes, `fedseg run`; the sites that must be turned away; a hospital that dies
mid-round and a server that crashes mid-run and is resumed. Every process is started here and stopped
here, by pid, and the suite checks none is left behind."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from client.privacy_ledger import PrivacyLedger
from common.flower_env import flower_env
from common.model import build_model
from common.processes import free_port, port_open

REPO = Path(__file__).parents[1]
HOSPITALS = ("hospital-a", "hospital-b")
FEDSEG = [sys.executable, "-m", "common.cli"]


def _fedseg(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDSEG, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


class Background:
    """A `fedseg` command in its own process group, output to a file."""

    def __init__(self, name: str, args: list[str], cwd: Path) -> None:
        self.log = cwd / f"{name}.out"
        self.proc = subprocess.Popen([*FEDSEG, *args], cwd=cwd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"exited early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.5)

    def group(self) -> list[int]:
        """Live processes in this command's process group (it and everything it started)."""
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        return alive

    def stop(self) -> list[int]:
        """SIGTERM to fedseg alone (it must stop its children); returns what was still alive after it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(1)
        leftovers = self.group()
        if leftovers:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return leftovers


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Coordinator and two hospitals on one machine, as the README walks them through."""
    root = tmp_path_factory.mktemp("deploy")
    port = free_port()
    assert _fedseg("demo-data", "demo", "--sites", "2", "--size", "tiny", cwd=root).returncode == 0
    data = root / "demo" / "federation-v3-tiny-2sites-seed0"
    assert _fedseg("certs", "coordinator", "--hostname", "fedseg.test", cwd=root).returncode == 0
    for site in (*HOSPITALS, "site-unregistered"):
        assert _fedseg("site-key", site, cwd=root).returncode == 0
    server = Background("server", ["server", "coordinator", "--port", str(port)], root)
    started: list[Background] = [server]
    try:
        server.wait_for("aggregation server on", timeout=90)
        for site in HOSPITALS:
            reg = _fedseg("register", "coordinator", f"{site}/site.pub", "--name", site, cwd=root)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for site, folder in zip(HOSPITALS, ("site-01", "site-02")):
            # Budget 60 against a run target of 30: room for a round lost in the server crash and run again.
            started.append(Background(site, ["site", site, "--data", str(data / folder), "--server", f"localhost:{port}",
                                             "--ca-cert", "coordinator/certs/ca.crt", "--epsilon-budget", "60", "--threads", "1"], root))
        yield {"root": root, "port": port, "server": server, "sites": started[1:], "started": started,
               "data": data / "site-01"}
    finally:
        leftovers = {bg.log.name: bg.stop() for bg in reversed(started)}
        assert not any(leftovers.values()), f"processes left behind: {leftovers}"
        assert not port_open("127.0.0.1", port), "the server port is still open"


def _history(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        return {"rounds": []}


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(1)


def _online(root: Path) -> set[str]:
    """Names of the sites `fedseg sites` lists as online."""
    rows = [line.split() for line in _fedseg("sites", "coordinator", cwd=root).stdout.splitlines()[1:]]
    return {row[0] for row in rows if len(row) > 2 and row[2] == "online"}


def test_sites_train_over_tls_through_a_dead_hospital_and_a_server_crash_while_intruders_are_refused(federation, tmp_path):
    root, port, server = federation["root"], federation["port"], federation["server"]
    sites = {bg.log.stem: bg for bg in federation["sites"]}
    for site in sites.values():
        site.wait_for("connecting to", timeout=120)
    _wait_until(lambda: _online(root) == set(HOSPITALS), 90, "both sites online")
    run_dir = root / "coordinator" / "runs" / "test"
    run = Background("run", ["run", "coordinator", "--rounds", "2", "--local-epochs", "2", "--epsilon", "30", "--image-size", "32",
                             "--batch-size", "8", "--min-sites", "1", "--round-timeout", "300", "--run-dir", "runs/test"], root)
    federation["started"].append(run)
    run.wait_for("round 0: aggregated", timeout=240)

    # hospital-b loses power while training round 1: no goodbye, the SuperLink only stops hearing from it.
    time.sleep(3)
    os.killpg(sites["hospital-b"].proc.pid, signal.SIGKILL)

    # Meanwhile: a site whose key was never registered is refused ...
    refused = _fedseg("site", "site-unregistered", "--data", str(federation["data"]), "--server",
                      f"127.0.0.1:{port}", "--ca-cert", "coordinator/certs/ca.crt", cwd=root, timeout=180)
    assert refused.returncode != 0 and "is not registered" in refused.stderr, refused.stdout + refused.stderr
    # ... a site holding some other CA's certificate stops before connecting ...
    assert _fedseg("certs", str(tmp_path / "other"), cwd=root).returncode == 0
    wrong_ca = _fedseg("site", "hospital-a", "--data", str(federation["data"]), "--server", f"127.0.0.1:{port}",
                       "--ca-cert", str(tmp_path / "other" / "certs" / "ca.crt"), cwd=root, timeout=180)
    assert wrong_ca.returncode != 0 and "vouches for" in wrong_ca.stderr, wrong_ca.stdout + wrong_ca.stderr
    # ... and a bare SuperNode without the federation's CA cannot complete the TLS handshake.
    bare_log = tmp_path / "bare.out"
    bare = subprocess.Popen([str(Path(sys.executable).parent / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                             "--auth-supernode-private-key", "hospital-a/site.key", "--max-retries", "1", "--port", str(free_port())],
                            cwd=root, stdout=bare_log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=flower_env(tmp_path / "bare"))
    try:
        assert bare.wait(timeout=120) != 0 and "CERTIFICATE_VERIFY_FAILED" in bare_log.read_text()
    finally:
        try:
            os.killpg(bare.pid, signal.SIGKILL)  # its SuperExec helper, if still there
        except ProcessLookupError:
            pass

    # Round 1 completes with the live hospital (min-sites 1); then the server machine crashes (every process of it).
    _wait_until(lambda: any(r["round"] == 1 and "dice" in r for r in _history(run_dir)["rounds"]), 480,
                f"round 1 never completed:\n{run.output()[-3000:]}")
    os.killpg(server.proc.pid, signal.SIGKILL)
    assert run.proc.wait(timeout=120) != 0  # the coordinator's follower lost the server
    assert _history(run_dir)["status"] == "running"

    restarted = Background("server-restarted", ["server", "coordinator", "--port", str(port)], root)
    federation["started"].append(restarted)
    restarted.wait_for("aggregation server on", timeout=90)
    _wait_until(lambda: "hospital-a" in _online(root), 120, "hospital-a reconnects to the restarted server")
    resume = Background("resume", ["run", "coordinator", "--resume", "runs/test"], root)
    federation["started"].append(resume)
    assert resume.proc.wait(timeout=540) == 0, resume.output()[-4000:]
    assert "resuming runs/test: 2 rounds" in resume.output()

    history = _history(run_dir)
    assert history["status"] == "completed"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]  # every round once
    assert "resumed after round 1" in " ".join(e["event"] for e in history["events"])
    rounds = {r["round"]: r for r in history["rounds"]}
    lost = rounds[1]["sites"]["hospital-b"]
    assert lost["status"] == "train_failed" and "Node Unavailable" in lost["reason"], lost  # dead site named, with why
    assert rounds[1]["sites"]["hospital-a"]["status"] == "ok"
    assert {n: s["status"] for n, s in rounds[2]["sites"].items()} == {"hospital-a": "ok"}
    state = torch.load(run_dir / "global_model.pt", weights_only=True)
    assert state["round"] == 2
    build_model(3).load_state_dict(state["state_dict"])
    for name in ("hospital-a",):
        reported = rounds[2]["sites"][name]["epsilon"]
        # The ε the server saw is the site's own accountant's, over every step it actually took: two
        # rounds, or three when its round 2 finished at the site after the server had died.
        ledger_file = next((root / name / "privacy_ledger").glob("privacy_ledger-*.json"))
        ledger = PrivacyLedger(ledger_file.parent, json.loads(ledger_file.read_text())["fingerprint"], name)
        assert math.isclose(ledger.epsilon(1e-5), reported, rel_tol=1e-9)
        assert len(ledger.rounds) in (2, 3) and 0 < reported <= 60.0
        assert "round 2: " in sites[name].output()  # each hospital's console shows its own rounds
    assert not list((root / "hospital-b" / "privacy_ledger").glob("*.json"))  # died before spending anything
    assert "foreground Dice" in resume.output() and "hospital-a" in resume.output()
    assert (run_dir / "report.html").is_file() and "report: " in resume.output()  # the coordinator's report, no images


def test_site_with_no_usable_data_fails_at_start(tmp_path):
    data = tmp_path / "export"
    data.mkdir()
    (data / "IM000001").write_bytes(b"\x00" * 200 + b"not DICOM")
    assert _fedseg("site-key", "site", cwd=tmp_path).returncode == 0
    result = _fedseg("site", "site", "--data", str(data), "--server", f"127.0.0.1:{free_port()}", "--ca-cert", "ca.crt", cwd=tmp_path)
    assert result.returncode != 0
    assert "cannot start" in result.stderr and "no usable labelled series" in result.stderr and "IM000001" in result.stderr
    assert not (tmp_path / "site" / "logs").exists()  # no SuperNode was ever started


def test_server_refuses_to_start_without_certificates_unless_insecure(tmp_path):
    result = _fedseg("server", "coordinator", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode != 0 and "fedseg certs" in result.stderr


def test_site_with_a_corrupt_privacy_ledger_refuses_to_start_and_keeps_the_ledger(tmp_path, tiny_site):
    from client.client_app import SiteConfig, site_data
    from common.config import RUN_DEFAULTS

    fingerprint = site_data(SiteConfig("h", str(tiny_site), "", 8.0), RUN_DEFAULTS).fingerprint
    assert _fedseg("site-key", "site", cwd=tmp_path).returncode == 0
    ledger = tmp_path / "site" / "privacy_ledger" / f"privacy_ledger-{fingerprint}.json"
    ledger.parent.mkdir()
    ledger.write_text('{"accountant_history": [[1.1, 0.1, 40]], "non_priv')  # cut off mid-write by a disk failure
    result = _fedseg("site", "site", "--data", str(tiny_site), "--server", f"127.0.0.1:{free_port()}", "--ca-cert", "ca.crt", cwd=tmp_path)
    assert result.returncode != 0 and "cannot start" in result.stderr
    assert "corrupt" in result.stderr and "It is not reset" in result.stderr and str(ledger.name) in result.stderr
    assert ledger.read_text().endswith('"non_priv')  # left exactly as found, for the privacy officer
    assert not (tmp_path / "site" / "logs").exists()
