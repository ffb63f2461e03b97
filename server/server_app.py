"""The aggregation server's Flower ServerApp: initial model, round-0 baseline, federated rounds."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import class_names, run_config
from common.model import build_model
from common.parameters import to_arrays
from server.run_record import RunRecord
from server.strategy import FederationStrategy, build_strategy

# Sent to sites each round; the rest of the run config is the server's business.
SITE_KEYS = ("num-server-rounds", "local-epochs", "batch-size", "learning-rate", "momentum", "target-epsilon",
             "noise-multiplier", "max-grad-norm", "delta", "image-size", "classes", "val-fraction", "seed")


def run_federation(grid: Grid, config: dict[str, Any], progress=print) -> RunRecord:
    """Round 0 measures the untrained model, then `num-server-rounds` rounds of train + validate."""
    run_dir = Path(config["run-dir"] or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    record = RunRecord(run_dir, config)
    torch.manual_seed(int(config["seed"]))
    arrays = to_arrays(build_model(len(class_names(config))))
    strategy = FederationStrategy(build_strategy(config), record, progress)
    site_config = ConfigRecord({k: config[k] for k in SITE_KEYS})
    timeout = float(config["round-timeout"])
    record.save_checkpoint(0, arrays)
    progress(f"round 0: validating the initial model at every site (run folder {run_dir})")
    strategy.aggregate_evaluate(0, grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(dict(site_config)), grid), timeout=timeout))
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(config["num-server-rounds"]), timeout=timeout,
                   train_config=site_config, evaluate_config=ConfigRecord(dict(site_config)))
    progress("\n" + record.summary())
    progress(f"\nrun folder: {run_dir} (global_model.pt, checkpoints/, history.json, summary.md)")
    return record


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp reading the Flower run config, with `overrides` (from `fedseg simulate`) on top."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, run_config({**dict(context.run_config), **dict(overrides or {})}))

    return app


app = build_server_app()
