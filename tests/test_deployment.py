"""Deployment with real processes on loopback: `fedseg server` (SuperLink, TLS, site authentication),
two `fedseg site` guards with their SuperNodes and courier SuperExecs, `fedseg run`; the sites that
must be turned away; a hospital that dies mid-round and a server that crashes mid-run and is resumed;
then a hostile app bundle shipped to the surviving site. Every process is started here and stopped
here, by pid, and the suite checks none is left behind. The refusals at start need no daemon: they
run in the fast lane, in this process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from client.isolation import ensure_user, let_courier_run_python
from client.site_state import SiteState
from common.flower_env import flower_env
from common.model import build_model
from common.parameters import model_arrays
from common.processes import descendants, free_port, port_open
from server import control
from server.superlink import ServerFolder, write_connection
from simulations.federation import federation_dir
from tests.commands import Background, require_nginx
from tests.commands import fedseg as _fedseg

REPO = Path(__file__).parents[1]
HOSPITALS = ("hospital-a", "hospital-b")
# The address the sites dial: not 127.0.0.1, where the SuperLink itself listens (only nginx answers here).
PUBLIC = "127.0.0.2"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Coordinator and two hospitals on one machine, as the README walks them through."""
    require_nginx()
    root = tmp_path_factory.mktemp("deploy")
    port = free_port()
    # Budget 60 against a run target of 30: room for a round lost in the server crash and run again.
    setup = [("demo-data", "demo", "--sites", "2", "--size", "tiny"),
             ("certs", "coordinator", "--hostname", "fedseg.test", "--hostname", PUBLIC),
             *[("site-init", site, "--epsilon-budget", "60", "--min-noise-multiplier", "0.1") for site in (*HOSPITALS, "site-unregistered")]]
    with ThreadPoolExecutor(len(setup)) as pool:  # independent of each other: their start-ups overlap
        for made in pool.map(lambda args: _fedseg(*args, cwd=root), setup):
            assert made.returncode == 0, f"{made.args}: {made.stdout}{made.stderr}"
    data = federation_dir(root / "demo", 2, 0, "tiny")
    if os.geteuid() == 0:  # sites then run their courier as an unprivileged user, who must be able to run this Python
        ensure_user()
        let_courier_run_python()
    server = Background("server", ["server", "coordinator", "--host", PUBLIC, "--port", str(port)], root)
    started: list[Background] = [server]
    try:
        server.wait_for("aggregation server on", timeout=90)
        for site in HOSPITALS:
            reg = _fedseg("register", "coordinator", f"{site}/site.pub", "--name", site, cwd=root)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for site, folder in zip(HOSPITALS, ("site-01", "site-02")):
            started.append(Background(site, ["site", site, "--data", str(data / folder), "--server", f"{PUBLIC}:{port}",
                                             "--ca-cert", "coordinator/certs/ca.crt", "--threads", "1"], root))
        yield {"root": root, "port": port, "server": server, "sites": started[1:], "started": started,
               "data": data / "site-01"}
    finally:
        leftovers = {bg.log.name: bg.stop() for bg in reversed(started)}
        assert not any(leftovers.values()), f"processes left behind: {leftovers}"
        assert not port_open(PUBLIC, port), "the server port is still open"


def _history(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        return {"rounds": []}


def _wait_until(condition, timeout: float, what: str, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(poll)


def _online(root: Path) -> set[str]:
    """Names of the sites `fedseg sites` lists as online."""
    rows = [line.split() for line in _fedseg("sites", "coordinator", cwd=root).stdout.splitlines()[1:]]
    return {row[0] for row in rows if len(row) > 2 and row[2] == "online"}


def _intruders_are_refused(root: Path, port: int, data: Path, tmp_path: Path) -> None:
    """While a run is in progress, at once (each waits on its own refusal): a site whose key was never
    registered is refused; a site holding some other CA's certificate stops before connecting; a bare
    SuperNode without the federation's CA cannot complete the TLS handshake."""
    def unregistered() -> None:
        refused = _fedseg("site", "site-unregistered", "--data", str(data), "--server",
                          f"{PUBLIC}:{port}", "--ca-cert", "coordinator/certs/ca.crt", cwd=root, timeout=180)
        assert refused.returncode != 0 and "is not registered" in refused.stderr, refused.stdout + refused.stderr

    def wrong_ca() -> None:
        assert _fedseg("certs", str(tmp_path / "other"), cwd=root).returncode == 0
        wrong = _fedseg("site", "hospital-a", "--data", str(data), "--server", f"{PUBLIC}:{port}",
                        "--ca-cert", str(tmp_path / "other" / "certs" / "ca.crt"), cwd=root, timeout=180)
        assert wrong.returncode != 0 and "vouches for" in wrong.stderr, wrong.stdout + wrong.stderr

    def bare_supernode() -> None:
        bare_log = tmp_path / "bare.out"
        bare = subprocess.Popen([str(Path(sys.executable).parent / "flower-supernode"), "--superlink", f"{PUBLIC}:{port}",
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

    with ThreadPoolExecutor(3) as pool:
        for check in [pool.submit(c) for c in (unregistered, wrong_ca, bare_supernode)]:
            check.result()  # its assertion, if it failed


@pytest.mark.slow  # real processes
def test_sites_train_over_tls_through_a_dead_hospital_and_a_server_crash_while_intruders_are_refused(federation, tmp_path):
    root, port, server = federation["root"], federation["port"], federation["server"]
    sites = {bg.log.stem: bg for bg in federation["sites"]}
    for site in sites.values():
        site.wait_for("connecting to", timeout=120)
    _wait_until(lambda: _online(root) == set(HOSPITALS), 90, "both sites online")
    run_dir = root / "coordinator" / "runs" / "test"
    run = Background("run", ["run", "coordinator", "--rounds", "2", "--local-epochs", "2", "--epsilon", "30", "--image-size", "32", "--spacing", "8",
                             "--batch-size", "8", "--min-sites", "1", "--round-timeout", "300", "--run-dir", "runs/test"], root)
    federation["started"].append(run)
    run.wait_for("round 1: training at 2 sites", timeout=240)

    # hospital-b loses power during round 1: no goodbye, the SuperLink only stops hearing from it. At once:
    # with the SuperNode's 0.5 s poll, a tiny round's training can be over (and replied) within seconds.
    os.killpg(sites["hospital-b"].proc.pid, signal.SIGKILL)

    # Round 1 completes with the live hospital (min-sites 1); then, before round 2 can, the server machine
    # crashes (every process of it).
    _wait_until(lambda: any(r["round"] == 1 and "checkpoint" in r for r in _history(run_dir)["rounds"]), 480,
                f"round 1 never completed:\n{run.output()[-3000:]}", poll=0.2)
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:  # Flower starts some in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert run.proc.wait(timeout=120) != 0  # the coordinator's follower lost the server
    assert _history(run_dir)["status"] == "running"

    restarted = Background("server-restarted", ["server", "coordinator", "--host", PUBLIC, "--port", str(port)], root)
    federation["started"].append(restarted)
    restarted.wait_for("aggregation server on", timeout=90)
    _wait_until(lambda: "hospital-a" in _online(root), 120, "hospital-a reconnects to the restarted server")
    resume = Background("resume", ["run", "coordinator", "--resume", "runs/test"], root)
    federation["started"].append(resume)
    _intruders_are_refused(root, port, federation["data"], tmp_path)
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
    # The ε the server saw is the site's own accountant's (patient level, at the site's δ), over every
    # step it actually took: two rounds, or three when its round 2 finished after the server had died.
    _, ledger, _ = SiteState(root / "hospital-a").open("hospital-a")
    assert abs(ledger.epsilon(1e-5) - rounds[2]["sites"]["hospital-a"]["epsilon"]) <= 0.005
    assert len(ledger.history) in (2, 3) and 0 < ledger.epsilon(1e-5) <= 60.0
    # The site's audit log names exactly the weights the server received.
    released = {e["released_sha256"] for e in ledger.entries if e["kind"] == "train"}
    assert {rounds[r]["sites"]["hospital-a"]["update_sha256"] for r in (1, 2)} <= released
    assert "round 2: " in sites["hospital-a"].output()  # each hospital's console shows its own rounds
    assert not SiteState(root / "hospital-b").open("hospital-b")[1].history  # died before spending anything
    assert "foreground Dice" in resume.output() and "hospital-a" in resume.output()
    assert (run_dir / "report.html").is_file() and "report: " in resume.output()  # the coordinator's report, no images

    # Finally the coordinator turns hostile: it ships its own app to hospital-a.
    spent = ledger.epsilon(1e-5)
    found = _hostile_run(root, tmp_path, federation["data"])
    assert len(found) == 1, found
    found = found[0]
    if os.geteuid() == 0:  # the courier is another OS user: the site's files are closed to it
        assert int(found["uid"]) != 0
        assert {found[f] for f in ("data-file", "ledger-file", "policy-file")} == {"PermissionError"}, found
    expected = {"delta": "refused:delta_above_policy:0", "noise": "refused:noise_below_policy:0",
                "classes": "refused:class_not_in_policy:0", "no-dp": "refused:non_private_not_allowed:0",
                "validate-round-0-again": "refused:validation_limit:0", "validate-untrained-6": "refused:validation_limit:0"}
    assert {k: found[k].replace(" arrays", "") for k in expected} == expected, found
    after = SiteState(root / "hospital-a").open("hospital-a")[1]
    assert after.epsilon(1e-5) == spent  # nothing spent
    refused = [v.split(":")[1] for k, v in found.items() if v.startswith("refused")]  # in the order asked
    assert [e["code"] for e in after.entries if e["kind"] == "refusal"][-len(refused):] == refused
    # validations of weights the site did not train in that run: never more than the policy's 4 a day
    assert sum(e["kind"] == "validate" and e.get("untrained", False) for e in after.entries) == 4


def _hostile_run(root: Path, tmp_path: Path, data: Path) -> list[dict]:
    """`flwr run` of tests/hostile_app on the federation's server; what its ClientApp found at each site."""
    app = tmp_path / "hostile"
    shutil.copytree(REPO / "tests" / "hostile_app", app)
    for rel in ("client/guard_socket.py", "common/array_codec.py"):  # the guard's wire format: no secret
        (app / rel).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / rel, app / rel)
    weights, out = tmp_path / "weights.npz", tmp_path / "found.json"
    np.savez(weights, **model_arrays(build_model(3)))
    state = SiteState(root / "hospital-a")
    data_file = next(p for p in data.rglob("*.dcm"))
    config = " ".join(f'{k}="{v}"' for k, v in {"out": out, "weights-file": weights, "data-file": data_file,
                                                 "ledger-file": state.ledger_file, "policy-file": state.policy_file}.items())
    folder = ServerFolder(root / "coordinator")
    started = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(app), "fedseg", "--run-config", config],
                             cwd=folder.root, env=folder.env(), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert started.returncode == 0, started.stdout + started.stderr
    _wait_until(out.is_file, 240, "the hostile run never finished")
    time.sleep(1)
    return json.loads(out.read_text())


def test_site_with_no_usable_data_fails_at_start(tmp_path, fedseg_here):
    data = tmp_path / "export"
    data.mkdir()
    (data / "IM000001").write_bytes(b"\x00" * 200 + b"not DICOM")
    assert fedseg_here("site-init", "site", cwd=tmp_path).returncode == 0
    result = fedseg_here("site", "site", "--data", str(data), "--server", f"127.0.0.1:{free_port()}", "--ca-cert", "ca.crt", cwd=tmp_path)
    assert result.returncode != 0
    assert "cannot start" in result.stderr and "no usable labelled series" in result.stderr and "IM000001" in result.stderr
    assert not (tmp_path / "site" / "logs").exists()  # no SuperNode was ever started


def test_server_refuses_to_start_without_certificates_unless_insecure(tmp_path, fedseg_here):
    result = fedseg_here("server", "coordinator", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode != 0 and "fedseg certs" in result.stderr


def test_site_with_a_corrupt_privacy_ledger_refuses_to_start_and_keeps_the_ledger(tmp_path, tiny_site, fedseg_here):
    assert fedseg_here("site-init", "site", cwd=tmp_path).returncode == 0
    ledger = SiteState(tmp_path / "site").ledger_file
    ledger.write_text(ledger.read_text() + '{"seq": 1, "kind": "train", "event": [1.1, 0.1, 40], "pr')  # cut off mid-write
    damaged = ledger.read_text()
    result = fedseg_here("site", "site", "--data", str(tiny_site), "--server", f"127.0.0.1:{free_port()}", "--ca-cert", "ca.crt", cwd=tmp_path)
    assert result.returncode != 0 and "cannot start" in result.stderr
    assert "cannot be trusted" in result.stderr and "It is not reset" in result.stderr and "privacy_ledger/ledger.jsonl" in result.stderr
    assert ledger.read_text() == damaged  # left exactly as found, for the privacy officer
    assert not (tmp_path / "site" / "logs").exists()
    ledger.unlink()  # deleted: the site still stops; it never starts again from zero
    result = fedseg_here("site", "site", "--data", str(tiny_site), "--server", f"127.0.0.1:{free_port()}", "--ca-cert", "ca.crt", cwd=tmp_path)
    assert result.returncode != 0 and "is missing" in result.stderr and not ledger.exists()


def test_the_coordinators_commands_say_when_there_is_no_server_to_talk_to(tmp_path, fedseg_here):
    """`fedseg sites` and `register` go through the connection `fedseg server` writes, to a server answering there."""
    missing = fedseg_here("sites", "coordinator", cwd=tmp_path)
    assert missing.returncode != 0 and "is not a server folder" in missing.stderr and "fedseg server" in missing.stderr
    write_connection(ServerFolder(tmp_path / "coordinator"), free_port(), insecure=False)  # what a stopped server leaves
    stopped = fedseg_here("register", "coordinator", "site.pub", "--name", "north", cwd=tmp_path)
    assert stopped.returncode != 0 and "no server answers at 127.0.0.1:" in stopped.stderr, stopped.stderr


def test_an_installed_fedseg_ships_the_files_its_manifest_names_and_nothing_from_outside(tmp_path, monkeypatch):
    """`fedseg run` from an installed package (no checkout) bundles a temporary copy of the app."""
    installed = tmp_path / "site-packages"
    (installed / "server").mkdir(parents=True)
    (installed / "server" / "server_app.py").write_text("# the ServerApp\n")
    manifest = tmp_path / "share" / "fedseg" / "pyproject.toml"
    manifest.parent.mkdir(parents=True)
    monkeypatch.setattr(control, "APP_DIR", installed)  # no pyproject.toml there: not a checkout
    monkeypatch.setattr(control, "_installed_manifest", lambda: manifest)

    def including(*names: str) -> None:
        manifest.write_text(tomli_w.dumps({"project": {"name": "fedseg"}, "tool": {"flwr": {"app": {"fab-include": list(names)}}}}))

    including("server/server_app.py")
    with control.flower_app() as app:
        assert sorted(p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()) == ["pyproject.toml", "server/server_app.py"]
    assert not app.exists()  # removed on leaving the block
    for outside in ("../server/server_app.py", str(installed / "server" / "server_app.py"), "server/*.py"):
        including(outside)
        with pytest.raises(control.ControlError, match="without globs"), control.flower_app():
            pass
    including("server/strategy.py")
    with pytest.raises(control.ControlError, match="lacks server/strategy.py"), control.flower_app():
        pass
