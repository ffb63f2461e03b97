"""The aggregation server as Flower deploys it: a SuperLink with TLS, site authentication and a
persistent state database, everything under one server folder.

    SERVER_DIR/certs/       CA + server certificate (`fedseg certs`)
    SERVER_DIR/state.db     the SuperLink's state: registered sites, runs, messages
    SERVER_DIR/.flwr/       Flower CLI home: the connection `fedseg register` / `fedseg run` use
    SERVER_DIR/logs/        the SuperLink's full log
    SERVER_DIR/runs/        one folder per training run (checkpoints, history.json, summary.md)

The SuperLink's working directory is the server folder, so a run's relative `run-dir` lands there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomli_w

from common.credentials import ServerCertificates
from common.flower_env import flower_env
from common.processes import FlowerProcess, flower_executable, port_open, wait_for_port

CONNECTION = "fedseg"


@dataclass(frozen=True)
class ServerFolder:
    root: Path

    @property
    def certs(self) -> ServerCertificates:
        return ServerCertificates(self.root / "certs")

    @property
    def flwr_home(self) -> Path:
        return self.root / ".flwr"

    @property
    def connection_file(self) -> Path:
        return self.flwr_home / "config.toml"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "superlink.log"

    def env(self) -> dict[str, str]:
        env = flower_env(self.flwr_home)
        env["FLWR_HOME"] = str(self.flwr_home.resolve())  # the server's own, whatever the caller's shell says
        return env


def local_address(host: str, port: int) -> str:
    """How a process on the server machine reaches a SuperLink bound to `host`."""
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host in ("::", "[::]"):
        return f"[::1]:{port}"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def write_connection(folder: ServerFolder, host: str, port: int, insecure: bool) -> None:
    """The Flower CLI connection to this SuperLink, for `fedseg register` and `fedseg run`."""
    connection: dict[str, object] = {"address": local_address(host, port)}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(folder.certs.ca_cert.resolve())
    folder.flwr_home.mkdir(parents=True, exist_ok=True)
    folder.connection_file.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def superlink_command(folder: ServerFolder, host: str, port: int, insecure: bool) -> list[str]:
    command = [flower_executable("flower-superlink"), "--database", str((folder.root / "state.db").resolve()),
               "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if insecure:
        return command + ["--insecure"]
    certs = folder.certs
    return command + ["--ssl-ca-certfile", str(certs.ca_cert.resolve()), "--ssl-certfile", str(certs.server_cert.resolve()),
                      "--ssl-keyfile", str(certs.server_key.resolve()), "--enable-supernode-auth"]


def start_superlink(folder: ServerFolder, host: str, port: int, insecure: bool, verbose: bool = False) -> FlowerProcess:
    """Start the SuperLink and return once it accepts connections; raise SystemExit with its log otherwise."""
    if not insecure and (missing := folder.certs.missing()):
        raise SystemExit(f"no TLS certificates for the server: missing {', '.join(map(str, missing))}.\n"
                         f"Create them with: fedseg certs {folder.root} --hostname <name or IP the sites will dial>\n"
                         "(or pass --insecure for a local test without TLS and without site authentication)")
    probe = local_address(host, port).rsplit(":", 1)[0].strip("[]")
    if port_open(probe, port):
        raise SystemExit(f"port {port} on {host} is already in use (another server?); choose one with --port")
    folder.root.mkdir(parents=True, exist_ok=True)
    write_connection(folder, host, port, insecure)
    proc = FlowerProcess(superlink_command(folder, host, port, insecure), folder.env(), folder.root, folder.log_file, verbose)
    if not wait_for_port(proc, probe, port):
        proc.stop()
        raise SystemExit(f"the SuperLink did not start (see {folder.log_file}):\n{proc.output_tail(8)}")
    return proc
