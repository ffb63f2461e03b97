"""`fedseg simulate`: N hospital sites and the aggregation server on one machine, through Flower's
supported route: a local SuperLink in simulation mode, and `flwr run` of the same app (pyproject's
`server.server_app:app` and `client.client_app:app`) a deployment runs.

Flower loads the apps by name in its own processes, so nothing of ours can be handed to them: each
site's guard is served on a Unix socket from a process of its own, as a deployed site serves it
(`simulations.site_guards`), and the couriers find their socket by partition-id."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import tomli_w

from client.guard import SiteGuard, budget_line, open_guard
from client.site_policy import SitePolicy
from client.site_state import SiteState
from common.config import class_names
from common.errors import FedsegError

log = logging.getLogger(__name__)


class SimulationError(FedsegError):
    """The simulation cannot start (no sites) or did not complete."""


def site_policy_for(overrides: dict[str, Any], epsilon_budget: float) -> dict[str, Any]:
    """A simulated site's policy: what the researcher's run asks for is what the site allows."""
    private = math.isfinite(float(overrides["target-epsilon"])) or float(overrides["noise-multiplier"]) > 0
    return {"epsilon_budget": epsilon_budget, "delta": float(overrides["delta"]), "min_noise_multiplier": 0.0,
            "allow_non_private": not private, "max_rounds_per_run": max(100, int(overrides["num-server-rounds"])),
            "validations_per_day": 10_000,  # a researcher's repeated runs on the same sites: every round validates
            "min_spacing_mm": min(SitePolicy.min_spacing_mm, float(overrides["spacing"]) or math.inf),
            "classes": tuple(class_names(overrides)[1:])}


def prepare_sites(sites: list[str], state_root: Path, policy: dict[str, Any]) -> list[SiteGuard]:
    """Each site's policy and ledger, opened (or created on first use) before anything starts."""
    guards = []
    for folder in sites:
        name = Path(folder).name
        guard, created = open_guard(SiteState(state_root / name), name, folder, policy)
        log.info("%s: %s%s", name, "new " if created else "", budget_line(guard))
        guards.append(guard)
    return guards


def federation_config(num_sites: int) -> str:
    """Flower's simulation settings: one virtual SuperNode per site, all running at once. Their
    couriers only relay (the guards train, each in its own process, on the GPU when there is one)."""
    return (f"num-supernodes={num_sites} client-resources-num-cpus=1 client-resources-num-gpus=0 "
            f"init-args-num-cpus={num_sites} init-args-num-gpus=0")


def run_simulation(sites: list[str], run_dir: Path, overrides: dict[str, Any], state_root: Path,
                   faults: dict[int, list[str]] | None = None) -> Path:
    """Train over `sites` (site folders, each with its guard state under `state_root`) and leave
    checkpoints, history and summary in `run_dir`; Flower's state and logs go to RUN_DIR/simulation."""
    from client.client_app import SIMULATED_SOCKETS
    from common.processes import FlowerProcess, free_port, run_until_stopped, wait_for_port
    from server.control import flower_app, flwr
    from server.report import write_report
    from server.run_record import run_status
    from server.superlink import CONNECTION, LOOPBACK, ServerFolder, superlink_command, write_connection
    from simulations.site_guards import serve_guards

    if not sites:
        raise SimulationError("no sites to simulate")
    run_dir = run_dir.resolve()  # the ServerApp runs elsewhere: it gets an absolute run folder
    folder = ServerFolder(run_dir / "simulation")
    shutil.rmtree(folder.root, ignore_errors=True)  # a fresh SuperLink: never one that would relaunch an interrupted run
    request = folder.root / "run-config.toml"
    request.parent.mkdir(parents=True)
    request.write_text(tomli_w.dumps({**{k: v for k, v in overrides.items() if v != ""}, "run-dir": str(run_dir)}))
    port = free_port(LOOPBACK)
    write_connection(folder, port, insecure=True)
    threads = max(1, (os.cpu_count() or 1) // len(sites))  # the sites train at once, as Ray ran them
    started = time.time()
    with serve_guards(sites, state_root, faults or {}, threads, folder.root / "logs") as guards:
        env = {**folder.env(), SIMULATED_SOCKETS: os.pathsep.join(guards.sockets), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
        superlink = FlowerProcess([*superlink_command(folder, port, insecure=True), "--simulation"], env, folder.root,
                                  folder.log_file, console=False)
        try:
            if not wait_for_port(superlink, LOOPBACK, port):
                raise SimulationError(f"the local SuperLink did not start (see {folder.log_file}):\n{superlink.output_tail(8)}")
            guards.wait_ready()  # started alongside the SuperLink
            with flower_app() as app:
                run = flwr(folder, ["run", str(app), CONNECTION, "--run-config", str(request), "--federation-config",
                                    federation_config(len(sites)), "--stream"], log_file=folder.root / "logs" / "run.log")
                run_until_stopped(run)  # follows the run's log to its end, then stops every process still below us
        finally:
            superlink.stop()
    status = run_status(run_dir)
    if status:
        log.info("report: %s", write_report(run_dir, sites))
    if status != "completed":
        raise SimulationError(f"the simulation did not complete (run status: {status or 'no history.json'}); see the log above "
                              f"and {folder.log_file}" + (f"; continue it with --resume {run_dir}" if status else ""))
    log.info("simulation finished in %.0f s", time.time() - started)
    return run_dir


def budget_for(epsilon: float, explicit: float | None) -> float:
    """A site's ε budget: as given, else the run's target (∞ for a non-DP baseline)."""
    if explicit is not None:
        return explicit
    return epsilon if math.isfinite(epsilon) else math.inf
