"""A hospital site as Flower deploys it: the site guard (this process, owner of the data), a SuperNode
that dials the aggregation server over TLS and authenticates with the site's private key, and the
SuperExec that runs each message's courier ClientApp as another OS user (`client.isolation`).

    SITE_DIR/site.key, site.pub   the site's key pair (`fedseg site-init`); only site.pub leaves the site
    SITE_DIR/site_policy.toml     what the site allows, whatever a run asks (`fedseg site-init`)
    SITE_DIR/privacy_ledger/      the hash-chained ledger and audit log (`fedseg audit`)
    SITE_DIR/node_config.toml     what the courier is told: the site's name and its guard's socket
    SITE_DIR/.flwr/, logs/        Flower's state and the SuperNode's and SuperExec's full logs
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from client.clientapp_launcher import write_launcher
from client.supernode_poll import supernode_launcher
from client.guard import SiteGuard
from client.site_state import SiteState
from client.guard_socket import GuardServer
from client.isolation import COURIER_USER, Courier, open_socket_to_courier, prepare_courier
from common.credentials import SiteKeys
from common.errors import FedsegError
from common.flower_env import flower_env
from common.processes import FlowerProcess, flower_executable, free_port, run_until_stopped


class SiteError(FedsegError, RuntimeError):
    """The site cannot start or was turned away; the message says what to do."""


@dataclass(frozen=True)
class SiteFolder:
    root: Path

    @property
    def keys(self) -> SiteKeys:
        return SiteKeys(self.root)

    @property
    def state(self) -> SiteState:
        return SiteState(self.root)

    @property
    def node_config_file(self) -> Path:
        return self.root / "node_config.toml"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "supernode.log"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SiteError(f"--server must be HOST:PORT (e.g. fedseg.example.org:8000), got {address!r}")
    return host.strip("[]"), int(port)


def check_server_certificate(address: str, ca_cert: Path) -> bool:
    """Dial the server once with the federation's CA: a wrong CA or host name stops the site here with
    a clear message. Returns False if the server is not reachable yet (the SuperNode keeps retrying)."""
    host, port = split_address(address)
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as err:
        raise SiteError(f"cannot read the CA certificate {ca_cert}: {err}") from err
    try:
        with socket.create_connection((host, port), timeout=10) as sock, context.wrap_socket(sock, server_hostname=host):
            return True
    except ssl.SSLCertVerificationError as err:
        raise SiteError(f"the server at {address} is not who {ca_cert} vouches for ({err.verify_message}). Use the "
                         "federation's ca.crt from the coordinator, and a server name listed in its certificate.") from err
    except OSError:
        return False


def write_node_config(folder: SiteFolder, name: str, guard_socket: Path) -> Path:
    """What the courier is told: the site's name and where its guard listens. Nothing else."""
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.node_config_file.write_text(tomli_w.dumps({"site-name": name, "guard-socket": str(guard_socket)}))
    return folder.node_config_file


def supernode_command(folder: SiteFolder, server: str, ca_cert: Path | None, runtime_port: int) -> list[str]:
    command = [*supernode_launcher(), "--superlink", server, "--node-config", str(folder.node_config_file.resolve()),
               "--isolation", "process", "--port", str(runtime_port)]
    if ca_cert is None:
        return command + ["--insecure"]
    return command + ["--root-certificates", str(ca_cert.resolve()), "--auth-supernode-private-key", str(folder.keys.private_key.resolve())]


def courier_env(courier: Courier, launcher: Path | None) -> dict[str, str]:
    """The courier's whole environment: nothing of the hospital's own (no credentials, no paths);
    `launcher` (our `flwr-clientapp`), when there is one, is the one SuperExec finds first."""
    env = {k: v for k, v in flower_env(courier.home).items() if k.startswith(("FLWR_", "LANG", "LC_")) or k == "PATH"}
    env.update(HOME=str(courier.home), FLWR_HOME=str(courier.home), FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
    if launcher is not None:
        env["PATH"] = os.pathsep.join([str(launcher.parent), env["PATH"]])
    return env


def run_site(folder: SiteFolder, guard: SiteGuard, server: str, ca_cert: Path | None, runtime_port: int = 0,
             verbose: bool = False) -> int:
    """Serve rounds until stopped: the guard on its socket (in this process), the SuperNode (this
    user: it holds the site key), and the SuperExec with its ClientApps as the courier user."""
    if ca_cert is not None:
        if not folder.keys.private_key.is_file():
            raise SiteError(f"no site key at {folder.keys.private_key}: create it with `fedseg site-init {folder.root}` "
                            "and send site.pub to the coordinator to be registered")
        if not check_server_certificate(server, ca_cert):
            print(f"the server at {server} does not answer yet; the site keeps trying", flush=True)
    courier = prepare_courier(folder.root, Path(guard.data_dir))
    if not courier.isolated:
        print("WARNING: not running as root, so the app bundle the coordinator ships (the courier) runs as this same user "
              "and could read what this user can. Run `fedseg site` as root (it then uses the unprivileged user "
              f"{COURIER_USER}), or use the two-container layout in the README.", flush=True)
    socket_path = courier.socket_dir / "guard.sock"
    guard_server = GuardServer(socket_path, guard)
    open_socket_to_courier(socket_path, courier)
    threading.Thread(target=guard_server.serve_forever, name="site-guard", daemon=True).start()
    write_node_config(folder, guard.name, socket_path)
    runtime_port = runtime_port or free_port()
    env = flower_env(folder.root / ".flwr")
    env["FLWR_HOME"] = str((folder.root / ".flwr").resolve())
    supernode = FlowerProcess(supernode_command(folder, server, ca_cert, runtime_port), env, folder.root, folder.log_file, verbose)
    superexec = FlowerProcess([flower_executable("flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"],
                              courier_env(courier, write_launcher(courier.socket_dir)), courier.home, folder.root / "logs" / "superexec.log", verbose,
                              user=courier.uid, group=courier.gid)
    print(f"site {guard.name} connecting to {server} ({'TLS, authenticated' if ca_cert else 'INSECURE'}); courier runs as "
          f"{courier.user or 'this user'}; guard socket {socket_path}; full log {folder.log_file}", flush=True)
    try:
        code = run_until_stopped(supernode, superexec)
    finally:
        guard_server.shutdown()
        guard_server.server_close()
        shutil.rmtree(courier.socket_dir, ignore_errors=True)
        shutil.rmtree(courier.home, ignore_errors=True)
    tail = supernode.output_tail()
    if "Failed to activate SuperNode" in tail:
        raise SiteError(f"the server refused site {guard.name}: its public key {folder.keys.public_key} is not registered. "
                        f"Send site.pub to the coordinator, who runs: fedseg register SERVER_DIR site.pub --name {guard.name}")
    if "CERTIFICATE_VERIFY_FAILED" in tail:
        raise SiteError(f"TLS verification of {server} failed: use the federation's ca.crt (--ca-cert)")
    return code
