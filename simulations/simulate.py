"""`fedseg simulate`: N hospital sites and the aggregation server in one process, on Flower's
simulation engine (Ray), with the same ServerApp and ClientApp code a deployment runs."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from client.guard import SiteGuard, budget_line, open_guard
from client.site_state import SiteState
from common.errors import FedsegError
from common.flower_env import flower_env


class SimulationError(FedsegError):
    """The simulation cannot start (no sites) or did not complete."""


def site_policy_for(overrides: dict[str, Any], epsilon_budget: float) -> dict[str, Any]:
    """A simulated site's policy: what the researcher's run asks for is what the site allows."""
    private = math.isfinite(float(overrides["target-epsilon"])) or float(overrides["noise-multiplier"]) > 0
    return {"epsilon_budget": epsilon_budget, "delta": float(overrides["delta"]), "min_noise_multiplier": 0.0,
            "allow_non_private": not private, "max_rounds_per_run": max(100, int(overrides["num-server-rounds"])),
            "classes": tuple(c.strip() for c in str(overrides["classes"]).split(",") if c.strip())}


def prepare_sites(sites: list[str], state_root: Path, policy: dict[str, Any]) -> list[SiteGuard]:
    """Each site's policy and ledger, opened (or created on first use) before the engine starts."""
    guards = []
    for folder in sites:
        name = Path(folder).name
        guard, created = open_guard(SiteState(state_root / name), name, folder, policy)
        print(f"{name}: {'new ' if created else ''}{budget_line(guard)}")
        guards.append(guard)
    return guards


def simulated_guards(sites: list[str], state_root: Path) -> Callable[[Mapping[str, Any]], SiteGuard]:
    """Each virtual SuperNode's guard, in-process (same class a deployed site serves on its socket),
    opened once per engine worker."""
    opened: dict[int, SiteGuard] = {}

    def guard_for(node_config: Mapping[str, Any]) -> SiteGuard:
        index = int(node_config["partition-id"])
        if index not in opened:
            name = Path(sites[index]).name
            opened[index], _ = open_guard(SiteState(state_root / name), name, sites[index])
        return opened[index]
    return guard_for


def run_simulation(sites: list[str], run_dir: Path, overrides: dict[str, Any], state_root: Path,
                   faults: dict[int, list[str]] | None = None, cpus_per_site: float = 1.0) -> Path:
    """Train over `sites` (site folders, each with its guard state under `state_root`) and leave
    checkpoints, history and summary in `run_dir`."""
    # Deprecated in flwr 1.41 (it logs a warning), but the only public way to run these app *objects*: the
    # replacement, `flwr run` against a SuperLink in simulation mode, installs a FAB in a `flwr-simulation`
    # process and loads the apps there by name (pyproject's components), so the in-process guards and the
    # fault mods built below could not be passed in.
    from flwr.simulation import run_simulation as flower_run_simulation

    from client.client_app import build_client_app
    from server.report import write_report
    from server.run_record import run_status
    from simulations.faults import fault_mod
    from server.server_app import build_server_app

    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(flower_env(run_dir / ".flwr"))  # Flower's state inside the run folder
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    gpus = 1.0 / len(sites) if torch.cuda.is_available() else 0.0
    backend = {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}
    started = time.time()
    flower_run_simulation(
        server_app=build_server_app({**overrides, "run-dir": str(run_dir)}, server_folder=None),
        client_app=build_client_app(simulated_guards(sites, state_root), [fault_mod(faults)] if faults else None),
        num_supernodes=len(sites),
        backend_config=backend,
    )
    status = run_status(run_dir)
    if status:
        print(f"report: {write_report(run_dir, sites)}")
    if status != "completed":
        raise SimulationError(f"the simulation did not complete (run status: {status or 'no history.json'}); see the log above"
                              + (f"; continue it with --resume {run_dir}" if status else ""))
    print(f"simulation finished in {time.time() - started:.0f} s")
    return run_dir


def budget_for(epsilon: float, explicit: float | None) -> float:
    """A site's ε budget: as given, else the run's target (∞ for a non-DP baseline)."""
    if explicit is not None:
        return explicit
    return epsilon if math.isfinite(epsilon) else math.inf

