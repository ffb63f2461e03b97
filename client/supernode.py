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

import logging
import os
import shlex
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
from client.isolation import COURIER_USER, Courier, external_courier, open_socket_to_courier, prepare_courier
from common.credentials import SiteKeys
from common.errors import FedsegError
from common.flower_env import flower_env
from common.folders import Entry
from common.processes import FlowerProcess, flower_executable, free_port, run_until_stopped

log = logging.getLogger(__name__)


class SiteError(FedsegError, RuntimeError):
    """The site cannot start or was turned away; the message says what to do."""


@dataclass(frozen=True)
class SiteFolder:
    root: Path
    keys = Entry(kind=SiteKeys)
    state = Entry(kind=SiteState)
    node_config_file = Entry("node_config.toml")
    flwr_home = Entry(".flwr")
    log_file = Entry("logs", "supernode.log")
    superexec_log_file = Entry("logs", "superexec.log")


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


def courier_command(runtime_port: int) -> list[str]:
    """The courier's SuperExec: it starts a ClientApp process per message, as the courier user."""
    return [flower_executable("flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]


def external_courier_instructions(courier: Courier, launcher: Path | None, runtime_port: int) -> str:
    """What the hospital runs as the courier user (in a shell of that user, or the courier's container)."""
    env = courier_env(courier, launcher)
    line = " ".join([f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())] + [shlex.quote(a) for a in courier_command(runtime_port)])
    return f"start the courier as {courier.user} now (it needs this machine's loopback and {courier.socket_dir}):\n  env -i {line}"


def run_site(folder: SiteFolder, guard: SiteGuard, server: str, ca_cert: Path | None, runtime_port: int = 0,
             verbose: bool = False, external_courier_user: str | None = None) -> int:
    """Serve rounds until stopped: the guard on its socket (in this process), the SuperNode (this
    user: it holds the site key), and the SuperExec with its ClientApps as the courier user — started
    here, or by the hospital as `external_courier_user`."""
    if ca_cert is not None:
        if not folder.keys.private_key.is_file():
            raise SiteError(f"no site key at {folder.keys.private_key}: create it with `fedseg site-init {folder.root}` "
                            "and send site.pub to the coordinator to be registered")
        if not check_server_certificate(server, ca_cert):
            log.info("the server at %s does not answer yet; the site keeps trying", server)
    courier = (external_courier(folder.root, Path(guard.data_dir), external_courier_user) if external_courier_user
               else prepare_courier(folder.root, Path(guard.data_dir)))
    if not courier.isolated:
        log.warning("not running as root, so the app bundle the coordinator ships (the courier) runs as this same user "
                    "and could read what this user can. Run `fedseg site` as root (it then uses the unprivileged user "
                    "%s), or start the courier as another user yourself (--external-courier USER; README: privacy model).", COURIER_USER)
    socket_path = courier.socket_dir / "guard.sock"
    guard_server = GuardServer(socket_path, guard)
    open_socket_to_courier(socket_path, courier)
    threading.Thread(target=guard_server.serve_forever, name="site-guard", daemon=True).start()
    write_node_config(folder, guard.name, socket_path)
    runtime_port = runtime_port or free_port()
    env = {**flower_env(folder.flwr_home), "FLWR_HOME": str(folder.flwr_home.resolve())}
    launcher = write_launcher(courier.socket_dir)
    supernode = FlowerProcess(supernode_command(folder, server, ca_cert, runtime_port), env, folder.root, folder.log_file, verbose,
                              name="flower-supernode")
    processes = [supernode]
    if courier.external:
        log.info(external_courier_instructions(courier, launcher, runtime_port))
    else:
        processes.append(FlowerProcess(courier_command(runtime_port), courier_env(courier, launcher), courier.home,
                                       folder.superexec_log_file, verbose, user=courier.uid, group=courier.gid))
    log.info("site %s connecting to %s (%s); courier runs as %s; guard socket %s; full log %s", guard.name, server,
             "TLS, authenticated" if ca_cert else "INSECURE", courier.user or "this user", socket_path, folder.log_file)
    try:
        code = run_until_stopped(*processes)
    finally:
        if courier.external:
            log.warning("stop the courier you started as %s now: its site is gone", courier.user)
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
