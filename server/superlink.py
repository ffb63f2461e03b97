"""The aggregation server as Flower deploys it: a SuperLink with TLS, site authentication and a
persistent state database, on loopback behind the edge (`server/edge.py`), everything under one
server folder.

    SERVER_DIR/certs/       CA + server certificate (`fedseg certs`)
    SERVER_DIR/state.db     the SuperLink's state: registered sites, runs, messages
    SERVER_DIR/.flwr/       Flower CLI home: the loopback connection `fedseg register` / `run` / `sites` use
    SERVER_DIR/edge/        the edge's nginx.conf
    SERVER_DIR/logs/        the SuperLink's full log, the edge's logs
    SERVER_DIR/runs/        one folder per training run (checkpoints, history.json, summary.md)

The SuperLink's working directory is the server folder, so a run's relative `run-dir` lands there.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

import tomli_w

from common.credentials import ServerCertificates
from common.errors import FedsegError
from common.flower_env import flower_env
from common.folders import Entry
from common.processes import FlowerProcess, flower_executable, free_port, port_open, wait_for_port
from server.edge import allowed_networks, find_nginx, start_edge

CONNECTION = "fedseg"
LOOPBACK = "127.0.0.1"
SPOOL_PREFIX = "fedseg-edge-"


class ServerStartError(FedsegError, RuntimeError):
    """The server cannot start (no certificates, port taken, a daemon died); the message says what to do."""


@dataclass(frozen=True)
class ServerFolder:
    root: Path
    certs = Entry("certs", kind=ServerCertificates)
    flwr_home = Entry(".flwr")
    connection_file = Entry(".flwr", "config.toml")
    state_db = Entry("state.db")
    log_file = Entry("logs", "superlink.log")
    lock_file = Entry(".lock")
    spool_record = Entry("edge", "spool")

    def env(self) -> dict[str, str]:
        # FLWR_HOME: the server's own, whatever the caller's shell says
        return {**flower_env(self.flwr_home), "FLWR_HOME": str(self.flwr_home.resolve())}


def local_address(host: str, port: int) -> str:
    """How a process on the server machine reaches a SuperLink bound to `host`."""
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host in ("::", "[::]"):
        return f"[::1]:{port}"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def write_connection(folder: ServerFolder, port: int, insecure: bool) -> None:
    """The Flower CLI connection to this SuperLink's loopback port, for `fedseg register`, `run` and `sites`."""
    connection: dict[str, object] = {"address": f"{LOOPBACK}:{port}"}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(folder.certs.ca_cert.resolve())
    folder.flwr_home.mkdir(parents=True, exist_ok=True)
    folder.connection_file.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def superlink_command(folder: ServerFolder, port: int, insecure: bool) -> list[str]:
    command = [flower_executable("flower-superlink"), "--database", str(folder.state_db.resolve()),
               "--host", LOOPBACK, "--port", str(port), "--disable-runtime-dependency-installation"]
    if insecure:
        return command + ["--insecure"]
    certs = folder.certs
    return command + ["--ssl-ca-certfile", str(certs.ca_cert.resolve()), "--ssl-certfile", str(certs.server_cert.resolve()),
                      "--ssl-keyfile", str(certs.server_key.resolve()), "--enable-supernode-auth"]


@dataclass
class Server:
    """A running server: its two daemons, the lock that keeps a second one off its folder, and the
    edge's spool folder for large request bodies."""

    superlink: FlowerProcess
    edge: FlowerProcess
    lock: IO[bytes]
    spool: Path

    def close(self) -> None:
        """After both daemons have stopped: remove the spool, free the folder."""
        shutil.rmtree(self.spool, ignore_errors=True)
        self.lock.close()


def _lock(folder: ServerFolder) -> IO[bytes]:
    """One server per folder: two SuperLinks on one state.db would each hand out the other's runs."""
    folder.root.mkdir(parents=True, exist_ok=True)
    handle = folder.lock_file.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ServerStartError(f"another `fedseg server` is running on {folder.root}; stop it first") from None
    return handle


def _new_spool(folder: ServerFolder) -> Path:
    """A fresh spool folder for the edge, named in SERVER_DIR/edge/spool; the one a killed server
    left behind (named there too) is removed first, so crashes do not pile folders up in /tmp."""
    record = folder.spool_record
    if record.is_file():
        old = Path(record.read_text().strip())
        if old.parent == Path(tempfile.gettempdir()) and old.name.startswith(SPOOL_PREFIX):
            shutil.rmtree(old, ignore_errors=True)
    spool = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{spool}\n")
    return spool


def start_server(folder: ServerFolder, host: str, port: int, insecure: bool, allow: Sequence[str] = (),
                 local_port: int | None = None, verbose: bool = False) -> Server:
    """Start the SuperLink on loopback and the edge on `host:port`; return once both accept
    connections. Raises ServerStartError / EdgeError saying what to do."""
    if not insecure and (missing := folder.certs.missing()):
        raise ServerStartError(f"no TLS certificates for the server: missing {', '.join(map(str, missing))}.\n"
                               f"Create them with: fedseg certs {folder.root} --hostname <name or IP the sites will dial>\n"
                               "(or pass --insecure for a local test without TLS and without site authentication)")
    find_nginx()  # before anything starts: no half-started server
    networks = allowed_networks(allow)
    probe = local_address(host, port).rsplit(":", 1)[0].strip("[]")
    local_port = local_port or free_port(LOOPBACK)
    for where, number in ((probe, port), (LOOPBACK, local_port)):
        if port_open(where, number):
            raise ServerStartError(f"port {number} on {where} is already in use (another server?); "
                                   "choose another with --port / --local-port")
    command = superlink_command(folder, local_port, insecure)  # finds flower-superlink before anything is taken
    lock = _lock(folder)
    spool = _new_spool(folder)
    write_connection(folder, local_port, insecure)
    started: list[FlowerProcess] = []

    def give_up(why: str) -> NoReturn:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(spool, ignore_errors=True)
        lock.close()
        raise ServerStartError(why)

    started.append(FlowerProcess(command, folder.env(), folder.root, folder.log_file, verbose))
    if not wait_for_port(started[0], LOOPBACK, local_port):
        give_up(f"the SuperLink did not start (see {folder.log_file}):\n{started[0].output_tail(8)}")
    started.append(start_edge(folder.root, host, port, local_port, insecure, networks, spool, folder.env(), verbose))
    if not wait_for_port(started[1], probe, port, timeout=20):
        give_up(f"the edge (nginx) did not start on {host}:{port}:\n{started[1].output_tail(8)}")
    return Server(started[0], started[1], lock, spool)
