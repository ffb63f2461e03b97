"""The coordinator's side of a running server, through Flower's own CLI (`flwr`) and the connection
`fedseg server` wrote: register a site's public key, list sites, start a training run and follow it."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from common.errors import FedsegError
from common.processes import FlowerProcess, flower_executable, port_open, run_until_stopped
from server.run_record import run_status
from server.site_names import add_site_name, read_site_names
from server.superlink import CONNECTION, ServerFolder

APP_DIR = Path(__file__).resolve().parents[1]  # the checkout, or site-packages when installed

log = logging.getLogger(__name__)


class ControlError(FedsegError):
    """The coordinator's command cannot reach or use the running server (or `flwr` refused it)."""


def _connection(folder: ServerFolder) -> str:
    """The server's address, after checking that `fedseg server` set it up and that it answers."""
    if not folder.connection_file.is_file():
        raise ControlError(f"{folder.root} is not a server folder (no {folder.connection_file}): start the server "
                           f"first with: fedseg server {folder.root}")
    text = folder.connection_file.read_text()
    address = re.search(r'address = "([^"]+)"', text)
    host, _, port = (address.group(1) if address else "").rpartition(":")
    if not port_open(host.strip("[]"), int(port or 0)):
        raise ControlError(f"no server answers at {host}:{port}: is `fedseg server {folder.root}` running?")
    return f"{host}:{port}"


def flwr(folder: ServerFolder, args: list[str], verbose: bool = False, log_file: Path | None = None, console: bool = True) -> FlowerProcess:
    return FlowerProcess([flower_executable("flwr"), *args], folder.env(), folder.root, log_file, verbose, console)


def _flwr_json(folder: ServerFolder, args: list[str]) -> dict[str, Any]:
    proc = flwr(folder, [*args, "--format", "json"], console=False)
    code, out = proc.wait(), proc.output_tail(10_000)
    start = out.find("{")
    reply = json.loads(out[start:]) if start >= 0 else {}
    if code != 0 or not reply.get("success"):
        raise ControlError(f"flwr {args[0]} {args[1]} failed: {reply.get('error-message') or out.strip()}")
    return reply


def register_site(folder: ServerFolder, public_key: Path, name: str) -> str:
    """Register a site's public key: only SuperNodes holding a registered key may join. Returns
    the node id Flower gave it."""
    _connection(folder)
    if not public_key.is_file():
        raise ControlError(f"public key {public_key} not found: the site creates it with `fedseg site-key` (site.pub)")
    node_id = str(_flwr_json(folder, ["supernode", "register", str(public_key.resolve()), CONNECTION, "--name", name])["node-id"])
    add_site_name(folder.root, node_id, name)
    return node_id


def list_sites(folder: ServerFolder) -> list[dict[str, str]]:
    """The registered sites as Flower lists them (node-id, status, online-at), each with the `site`
    name it was registered under ("?" for a node fedseg did not register)."""
    _connection(folder)
    names = read_site_names(folder.root)
    return [{**node, "site": names.get(node["node-id"], "?")} for node in _flwr_json(folder, ["supernode", "list", CONNECTION])["nodes"]]


def _is_fedseg_manifest(path: Path) -> bool:
    try:
        return tomllib.loads(path.read_text())["project"]["name"] == "fedseg"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return False


def _installed_manifest() -> Path | None:
    """The pyproject.toml a (non-editable) install of fedseg carries as data (share/fedseg/pyproject.toml)."""
    try:
        files = importlib.metadata.distribution("fedseg").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "pyproject.toml" and file.parent.name == "fedseg":
            path = Path(file.locate()).resolve()
            if _is_fedseg_manifest(path):
                return path
    return None


@contextmanager
def flower_app() -> Iterator[Path]:
    """The Flower app (pyproject.toml + code) that `flwr run` bundles and sends to server and sites.

    From a checkout, the checkout itself. From an installed fedseg, a temporary folder (removed on
    leaving the block) holding the installed pyproject.toml and the files its fab-include names,
    copied from where the packages are installed."""
    if _is_fedseg_manifest(APP_DIR / "pyproject.toml"):
        yield APP_DIR
        return
    manifest = _installed_manifest()
    if manifest is None:
        raise ControlError(f"fedseg run needs fedseg's pyproject.toml (the Flower app's manifest): neither at {APP_DIR} "
                           "nor installed with the package (share/fedseg/pyproject.toml); reinstall fedseg")
    try:
        include = tomllib.loads(manifest.read_text())["tool"]["flwr"]["app"]["fab-include"]
    except (KeyError, tomllib.TOMLDecodeError) as err:
        raise ControlError(f"{manifest} does not list the app's files (tool.flwr.app.fab-include): reinstall fedseg") from err
    if any(Path(name).is_absolute() or ".." in Path(name).parts or any(c in name for c in "*?[") for name in include):
        raise ControlError(f"{manifest}: fab-include must name files inside the package, without globs")
    with tempfile.TemporaryDirectory(prefix="fedseg-app-") as tmp:
        app = Path(tmp) / "fedseg"
        app.mkdir()
        shutil.copyfile(manifest, app / "pyproject.toml")
        for name in include:
            source = APP_DIR / name
            if not source.is_file():
                raise ControlError(f"the installed fedseg lacks {name} (under {APP_DIR}), which the Flower app needs; reinstall fedseg")
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, app / name)
        yield app


def start_run(folder: ServerFolder, run_config: dict[str, Any], verbose: bool = False) -> int:
    """Start a run with `run_config`, then follow its log until it ends.

    The requested config is kept under logs/ beside the followed log. Interrupting only stops
    following: the run goes on at the server."""
    address = _connection(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_config = {"run-dir": f"runs/{stamp}", **{k: v for k, v in run_config.items() if v != ""}}
    request = folder.root / "logs" / f"run-{stamp}.toml"
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_text(tomli_w.dumps(run_config))
    with flower_app() as app:
        run_id = str(_flwr_json(folder, ["run", str(app), CONNECTION, "--run-config", str(request.resolve())])["run-id"])
    run_dir = folder.root / run_config["run-dir"]
    log.info(f"run {run_id} started on {address}; run folder {run_dir}; config {request}")
    follow = flwr(folder, ["log", run_id, CONNECTION, "--stream"], verbose, folder.root / "logs" / f"run-{stamp}.log")
    code = run_until_stopped(follow)
    status = _flwr_json(folder, ["ls", CONNECTION, "--run-id", run_id])["runs"][0]
    if not status["status"].startswith("finished"):
        log.warning(f"stopped following run {run_id} ({status['status']}); it goes on at the server. Follow it again or stop it with:\n"
                    f"  FLWR_HOME={folder.flwr_home} flwr log {run_id} {CONNECTION} --stream\n"
                    f"  FLWR_HOME={folder.flwr_home} flwr stop {run_id} {CONNECTION}")
        return code or 1
    traffic, compute = status["network-traffic"], status["compute-time"]
    details = "" if status["status-details"] in ("", "N/A") else f" ({status['status-details']})"
    log.info(f"run {run_id} {status['status']}{details}: {float(status['elapsed']):.0f} s wall, "
             f"{traffic['total-bytes'] / 1e6:.1f} MB exchanged, ClientApp compute {compute['clientapp-seconds']:.0f} s "
             f"(all sites), ServerApp {compute['serverapp-seconds']:.0f} s")
    outcome = run_status(run_dir)
    if outcome:
        from server.report import write_report

        log.info(f"report: {write_report(run_dir)}")
    if outcome != "completed":
        log.warning(f"the run's own record says: {outcome or 'no history.json'}" + (f"; continue it with: fedseg run {folder.root} --resume {run_config['run-dir']}" if outcome else ""))
    return 0 if status["status"].endswith("completed") and outcome == "completed" else 1
