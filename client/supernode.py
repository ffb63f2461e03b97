"""A hospital site as Flower deploys it: a SuperNode that dials the aggregation server over TLS,
authenticates with the site's private key, and runs the fedseg ClientApp on the site's own data.

    SITE_DIR/site.key, site.pub   the site's key pair (`fedseg site-key`); only site.pub leaves the site
    SITE_DIR/privacy_ledger/      ε spent per dataset, across runs and restarts
    SITE_DIR/node_config.toml     what the ClientApp is told: site name, data folder, ledger, budget
    SITE_DIR/.flwr/, logs/        Flower's state and the SuperNode's full log
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from client.client_app import SITE_LOG_LEVEL, SiteConfig
from common.credentials import SiteKeys
from common.flower_env import flower_env
from common.processes import FlowerProcess, flower_executable, free_port, run_until_stopped


@dataclass(frozen=True)
class SiteFolder:
    root: Path

    @property
    def keys(self) -> SiteKeys:
        return SiteKeys(self.root)

    @property
    def ledger_dir(self) -> Path:
        return self.root / "privacy_ledger"

    @property
    def node_config_file(self) -> Path:
        return self.root / "node_config.toml"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "supernode.log"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--server must be HOST:PORT (e.g. fedseg.example.org:8000), got {address!r}")
    return host.strip("[]"), int(port)


def check_server_certificate(address: str, ca_cert: Path) -> bool:
    """Dial the server once with the federation's CA: a wrong CA or host name stops the site here with
    a clear message. Returns False if the server is not reachable yet (the SuperNode keeps retrying)."""
    host, port = split_address(address)
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as err:
        raise SystemExit(f"cannot read the CA certificate {ca_cert}: {err}") from err
    try:
        with socket.create_connection((host, port), timeout=10) as sock, context.wrap_socket(sock, server_hostname=host):
            return True
    except ssl.SSLCertVerificationError as err:
        raise SystemExit(f"the server at {address} is not who {ca_cert} vouches for ({err.verify_message}). Use the "
                         "federation's ca.crt from the coordinator, and a server name listed in its certificate.") from err
    except OSError:
        return False


def write_node_config(folder: SiteFolder, site: SiteConfig) -> Path:
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.node_config_file.write_text(tomli_w.dumps({
        "site-name": site.name, "data-dir": site.data_dir, "ledger-dir": site.ledger_dir, "epsilon-budget": site.epsilon_budget}))
    return folder.node_config_file


def supernode_command(folder: SiteFolder, server: str, ca_cert: Path | None, runtime_port: int) -> list[str]:
    command = [flower_executable("flower-supernode"), "--superlink", server, "--node-config", str(folder.node_config_file.resolve()),
               "--port", str(runtime_port)]
    if ca_cert is None:
        return command + ["--insecure"]
    return command + ["--root-certificates", str(ca_cert.resolve()), "--auth-supernode-private-key", str(folder.keys.private_key.resolve())]


def run_site(folder: SiteFolder, site: SiteConfig, server: str, ca_cert: Path | None, runtime_port: int = 0,
             threads: int = 0, verbose: bool = False) -> int:
    """Start the SuperNode and serve rounds until stopped; explain the refusals a site can meet."""
    if ca_cert is not None:
        if not folder.keys.private_key.is_file():
            raise SystemExit(f"no site key at {folder.keys.private_key}: create it with `fedseg site-key {folder.root}` "
                             "and send site.pub to the coordinator to be registered")
        if not check_server_certificate(server, ca_cert):
            print(f"the server at {server} does not answer yet; the site keeps trying", flush=True)
    write_node_config(folder, site)
    env = flower_env(folder.root / ".flwr")
    env["FLWR_HOME"] = str((folder.root / ".flwr").resolve())
    env[SITE_LOG_LEVEL] = "INFO"
    if threads > 0:  # each round's ClientApp is a fresh process: torch reads this at its start
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = FlowerProcess(supernode_command(folder, server, ca_cert, runtime_port or free_port()), env, folder.root,
                         folder.log_file, verbose)
    print(f"site {site.name} connecting to {server} ({'TLS, authenticated' if ca_cert else 'INSECURE'}); "
          f"full log {folder.log_file}", flush=True)
    code = run_until_stopped(proc)
    tail = proc.output_tail()
    if "Failed to activate SuperNode" in tail:
        raise SystemExit(f"the server refused site {site.name}: its public key {folder.keys.public_key} is not registered. "
                         f"Send site.pub to the coordinator, who runs: fedseg register SERVER_DIR site.pub --name {site.name}")
    if "CERTIFICATE_VERIFY_FAILED" in tail:
        raise SystemExit(f"TLS verification of {server} failed: use the federation's ca.crt (--ca-cert)")
    return code
