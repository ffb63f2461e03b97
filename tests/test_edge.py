"""The server's edge as a network peer meets it: `fedseg server` on a non-loopback address (127.0.0.2)
serves the Fleet API there and nothing else; the Control API answers on 127.0.0.1 only. A full TLS run
through the edge is in test_deployment.py, whose sites dial 127.0.0.2. The tests that start servers
are slow (real processes); the edge's configuration and checks have fast tests of their own."""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from common.credentials import create_server_certificates
from common.processes import descendants, free_port, port_open
from server import edge
from server.superlink import ServerFolder, start_server
from tests.commands import Background, fedseg, require_nginx

PUBLIC = "127.0.0.2"
REFUSED = b"fedseg edge: only the Fleet API"
# What a peer would try: Flower's Control and runtime routes, its docs, and ways around the prefix check.
NOT_SERVED = ["/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-run", "/docs", "/openapi.json",
              "/health", "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
              "/v1/fleet/..%2fcontrol/list-runs", "//v1/control/list-runs", "/v1/fleetx/get-run"]


def _post(port: int, path: str, ca: Path | None, body: bytes = b"") -> tuple[int, bytes]:
    """POST `path` exactly as written (no client-side normalisation), as a raw peer would."""
    if ca is None:
        conn = http.client.HTTPConnection(PUBLIC, port, timeout=10)
    else:
        conn = http.client.HTTPSConnection(PUBLIC, port, timeout=10, context=ssl.create_default_context(cafile=str(ca)))
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent that is gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def certified(tmp_path_factory) -> Path:
    """`fedseg certs coordinator` once for the module; each server runs on a copy of the folder."""
    require_nginx()
    root = tmp_path_factory.mktemp("certified")
    made = fedseg("certs", "coordinator", "--hostname", PUBLIC, cwd=root)
    assert made.returncode == 0, made.stderr
    return root / "coordinator"


def _coordinator(certified: Path, where: Path) -> Path:
    """A fresh server folder with the module's certificates, under a name with spaces (nginx's config
    quotes every path); returns the folder it is in, where `fedseg` runs."""
    root = where / "a folder with spaces"
    shutil.copytree(certified, root / "coordinator")
    return root


def _serve(root: Path, *options: str) -> tuple[Background, int]:
    port = free_port(PUBLIC)
    server = Background(f"server-{port}", ["server", "coordinator", "--host", PUBLIC, "--port", str(port), *options], root)
    server.wait_for("aggregation server on", timeout=90)
    return server, port


@pytest.fixture(scope="module")
def served(certified, tmp_path_factory):
    """One server for the tests that only talk to it. The flood test comes last: it leaves this
    address rate-limited (for BURST / REQUESTS_PER_SECOND seconds)."""
    root = _coordinator(certified, tmp_path_factory.mktemp("served"))
    server, port = _serve(root)
    yield root, port
    assert not server.stop(), "processes left behind"
    assert not port_open(PUBLIC, port)


@pytest.mark.slow
def test_only_the_fleet_api_faces_the_network_and_the_coordinator_works_locally(served):
    coordinator, port = served
    ca = coordinator / "coordinator" / "certs" / "ca.crt"
    for path in NOT_SERVED:
        status, body = _post(port, path, ca)
        assert (status, REFUSED in body) == (404, True), (path, status, body[:200])
    # A Fleet route reaches the SuperLink (which rejects the empty request itself, not the edge).
    status, body = _post(port, "/v1/fleet/get-run", ca)
    assert status != 404 and REFUSED not in body, (status, body[:200])
    # So does a model-sized body (spooled to disk by nginx's workers, another user when run as root) ...
    status, body = _post(port, "/v1/fleet/push-object", ca, bytes(6 * 2**20))
    assert status == 400 and b"Invalid protobuf" in body, (status, body[:200])  # ... where Flower refuses it (not nginx: 500)
    # ... but not one over the edge's limit.
    assert _post(port, "/v1/fleet/push-object", ca, bytes(17 * 2**20))[0] == 413
    # The SuperLink itself listens on loopback only, where the coordinator's commands reach it.
    local = tomllib.loads(ServerFolder(coordinator / "coordinator").connection_file.read_text())["superlink"]["fedseg"]
    host, local_port = local["address"].rsplit(":", 1)
    assert host == "127.0.0.1" and not port_open(PUBLIC, int(local_port))
    listed = fedseg("sites", "coordinator", cwd=coordinator)
    assert listed.returncode == 0 and "site" in listed.stdout.splitlines()[0], listed.stdout + listed.stderr


def _burst(port: int, ca: Path, requests: int) -> list[int]:
    """`requests` Fleet POSTs over one kept-alive connection, as fast as they are answered."""
    conn = http.client.HTTPSConnection(PUBLIC, port, timeout=30, context=ssl.create_default_context(cafile=str(ca)))
    statuses = []
    try:
        for _ in range(requests):
            conn.request("POST", "/v1/fleet/get-run", body=b"", headers={"Content-Type": "application/protobuf"})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        conn.close()
    return statuses


@pytest.mark.slow
def test_a_flood_from_one_address_is_cut_to_the_rate_limit(served):
    """8 connections x 100 requests at once: beyond the burst of 200 at 20/s nginx answers 429 itself;
    what it lets through reaches Flower (which refuses the unsigned request with 401)."""
    coordinator, port = served
    ca = coordinator / "coordinator" / "certs" / "ca.crt"
    with ThreadPoolExecutor(8) as pool:
        statuses = [s for batch in pool.map(lambda _: _burst(port, ca, 100), range(8)) for s in batch]
    assert set(statuses) <= {401, 429} and statuses.count(429) > 0 and statuses.count(401) >= edge.BURST, \
        {s: statuses.count(s) for s in set(statuses)}


@pytest.mark.slow
def test_the_allow_list_turns_away_every_other_network(certified, tmp_path):
    coordinator = _coordinator(certified, tmp_path)
    server, port = _serve(coordinator, "--allow", "192.0.2.0/24")
    try:
        status, _ = _post(port, "/v1/fleet/get-run", coordinator / "coordinator" / "certs" / "ca.crt")
        assert status == 403
    finally:
        assert not server.stop(), "processes left behind"


@pytest.mark.parametrize("network", ["10.0.0.300/8", "192.168.1.10/24", "fe80::%eth0/64", "10.0.0.0/8; allow all"])
def test_a_wrong_allow_list_is_refused_before_anything_starts(tmp_path, network):
    require_nginx()
    folder = ServerFolder(tmp_path / "coordinator")
    create_server_certificates(folder.certs.folder, [PUBLIC])
    with pytest.raises(edge.EdgeError, match="--allow takes networks"):
        start_server(folder, PUBLIC, free_port(PUBLIC), insecure=False, allow=["192.0.2.0/24", network])
    assert sorted(p.name for p in folder.root.iterdir()) == ["certs"]  # refused before anything started or was written


def test_the_edge_config_is_one_nginx_accepts_with_the_allow_list_on_the_fleet_api_only(tmp_path):
    """The configuration as written for a folder whose name needs quoting; nginx itself checks it."""
    require_nginx()
    root = tmp_path / 'a "quoted" folder with spaces'
    create_server_certificates(ServerFolder(root).certs.folder, [PUBLIC])
    (root / "logs").mkdir()
    (root / "edge").mkdir()
    conf = edge.edge_config(root, PUBLIC, 8443, 9092, insecure=False, allow=["192.0.2.0/24", "2001:db8::/32"], spool=root / "spool")
    (root / "edge" / "nginx.conf").write_text(conf)
    checked = subprocess.run([edge.find_nginx(), "-t", "-p", str(root / "edge"), "-c", str(root / "edge" / "nginx.conf"),
                              "-e", "stderr"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "syntax is ok" in checked.stderr, checked.stderr
    fleet, rest = conf.split("location /v1/fleet/ {")[1].split("location / {")
    assert "allow 192.0.2.0/24;\n        allow 2001:db8::/32;\n        deny all;" in fleet
    assert "allow" not in rest and "deny" not in rest and "return 404" in rest  # everything else: refused, whoever asks
    assert "proxy_ssl_verify on;" in fleet and "listen 127.0.0.2:8443 ssl;" in conf
    open_conf = edge.edge_config(root, PUBLIC, 8443, 9092, insecure=True, allow=[], spool=root / "spool")
    assert "deny" not in open_conf and "ssl" not in open_conf and "proxy_pass http://superlink;" in open_conf


def test_a_server_folder_with_a_dollar_in_its_path_is_refused(tmp_path):
    """nginx would read `$name` in a path as a variable."""
    with pytest.raises(edge.EdgeError, match="move the server folder"):
        edge.edge_config(tmp_path / "cost$100", PUBLIC, 8443, 9092, insecure=True, allow=[], spool=tmp_path / "spool")


def test_a_server_without_nginx_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(edge.shutil, "which", lambda *a, **k: None)
    with pytest.raises(edge.EdgeError, match="apt-get install nginx"):
        edge.find_nginx()


@pytest.mark.slow
def test_one_server_per_folder_and_none_outlives_a_killed_fedseg(certified, tmp_path):
    """A second server on the same state.db is refused; SIGKILL of `fedseg server` (no chance to
    clean up) still takes the SuperLink and nginx down with it, and the folder can serve again."""
    root = _coordinator(certified, tmp_path)
    server, port = _serve(root)
    try:
        second = fedseg("server", "coordinator", "--host", PUBLIC, "--port", str(free_port(PUBLIC)), cwd=root)
        assert second.returncode != 0 and "another `fedseg server` is running" in second.stderr, second.stderr
        daemons = descendants(server.proc.pid)  # SuperLink, nginx and its worker, and Flower's SuperExec (a session of its own)
        assert len(daemons) >= 4, daemons
        server.proc.kill()
        deadline = time.monotonic() + 30
        while (alive := [pid for pid in daemons if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"daemons outlived fedseg: {alive}"
        assert not port_open(PUBLIC, port)
        killed_spool = Path((root / "coordinator" / "edge" / "spool").read_text().strip())
        assert killed_spool.is_dir()  # left behind by the kill ...
        again, _ = _serve(root)
        assert not killed_spool.exists()  # ... and removed by the next start
        assert not again.stop(), "processes left behind"
    finally:
        server.stop()
