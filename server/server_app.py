"""The aggregation server's Flower ServerApp: round 0 baseline, then federated rounds that survive
silent sites (timeouts), too few sites (wait, retry, stop cleanly) and a server restart (--resume)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from common.config import SITE_KEYS, class_names, run_config
from common.model import build_model
from common.parameters import to_arrays
from common.site_reply import VALIDATE_RECEIVED
from server.run_record import RunRecord
from server.site_names import read_site_names
from server.strategy import AggregatorError, FederationStrategy, build_strategy, check_aggregator

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """Too few sites, after every retry: the run stops with its last completed round kept."""


def wait_for_sites(grid: Grid, needed: int, timeout: float) -> int:
    """Wait (up to `timeout` s) until `needed` sites are online; says so while it waits."""
    deadline, shown = time.time() + timeout, None
    while (online := len(list(grid.get_node_ids()))) < needed and time.time() < deadline:
        if online != shown:
            log.info(f"waiting for sites: {online} of the {needed} needed are online")
            shown = online
        time.sleep(2)
    return online


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None, poll: float = 0.2) -> list[Message]:
    """`grid.send_and_receive`, polling every `poll` s: Flower's HttpGrid (deployment) sleeps 3 s
    between pulls, adding up to 3 s to every train and validate exchange. Same semantics: the replies
    in by `timeout` (None: wait for all), possibly fewer; pushing gives each message its id in place,
    which the strategy reads to name silent sites."""
    pending = {i for i in grid.push_messages(list(messages)) if i}  # HttpGrid gives None for one it could not push
    deadline = None if timeout is None else time.time() + timeout
    replies: list[Message] = []
    while pending and (deadline is None or time.time() < deadline):
        pulled = list(grid.pull_messages(pending))
        replies += pulled
        pending -= {msg.metadata.reply_to_message_id for msg in pulled}
        if pending:
            time.sleep(poll)
    return replies


def _train(grid: Grid, strategy: FederationStrategy, server_round: int, arrays: ArrayRecord, site_config: ConfigRecord,
           config: dict[str, Any]) -> ArrayRecord:
    """One round's training; retried while fewer than `min-sites` usable updates came back. The
    first attempt also has the sites validate `arrays`, closing the previous round in one message."""
    needed, timeout, retries = strategy.min_sites, float(config["round-timeout"]), int(config["round-retries"])
    for attempt in range(retries + 1):
        if wait_for_sites(grid, needed, timeout) >= needed:
            validate = "dice" not in strategy.record.round(server_round - 1)
            messages = strategy.configure_train(server_round, arrays, ConfigRecord({**dict(site_config), VALIDATE_RECEIVED: validate}), grid)
            log.info(f"round {server_round}: training at {len(messages)} sites" + (f" (and validating round {server_round - 1}'s global model)" if validate else ""))
            strategy.record.start_round(server_round)
            replies = exchange(grid, messages, timeout)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                return aggregated
        what = f"round {server_round}: fewer than the {needed} sites needed gave a usable update; the global model is unchanged"
        if attempt < retries:
            strategy.record.event(f"{what}; retry {attempt + 1} of {retries}")
            log.warning(f"{what}; retrying ({attempt + 1} of {retries})")
    raise RunStopped(f"{what} after {retries} retries: run stopped")


def _validate(grid: Grid, strategy: FederationStrategy, server_round: int, arrays: ArrayRecord, site_config: ConfigRecord,
              timeout: float) -> None:
    """Every online site validates the global model; with none online the round closes unvalidated."""
    if wait_for_sites(grid, 1, timeout) >= 1:
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(site_config)), grid)
        strategy.aggregate_evaluate(server_round, exchange(grid, messages, timeout))
    else:
        strategy.record.event(f"round {server_round}: no site online to validate the global model")
        strategy.aggregate_evaluate(server_round, [])


def run_federation(grid: Grid, config: dict[str, Any], registered: Mapping[str, str] | None = None) -> RunRecord:
    """`num-server-rounds` rounds, each one message per site: validate the global model received
    (round 0: the untrained one), then train on it; a last message validates the final model.
    With `resume`, continues the run in `run-dir` after its last saved global model. A robust
    aggregator that could leave no one out of `min-sites` sites is refused (AggregatorError) before
    anything is written."""
    check_aggregator(config)
    run_dir = Path(config["run-dir"] or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if config["resume"]:
        record, checkpoint, done = RunRecord.resume(run_dir, config)
        arrays = ArrayRecord(checkpoint["state_dict"])
        log.info(f"resuming {run_dir} after round {done} of {record.config['num-server-rounds']}")
    else:
        if (run_dir / "history.json").exists():
            raise FileExistsError(f"{run_dir} already holds a run: resume it (--resume) or choose another run folder")
        record, checkpoint, done = RunRecord(run_dir, config), {"strategy_state": {}}, -1
        torch.manual_seed(int(config["seed"]))
        arrays = to_arrays(build_model(len(class_names(config))))
    config = record.config
    strategy = FederationStrategy(build_strategy(config), record, registered)
    strategy.load_state(checkpoint["strategy_state"])
    if config["resume"]:
        strategy.resumed_from = done  # no site trained these weights in this (new) run
    site_config = ConfigRecord({k: config[k] for k in SITE_KEYS})
    timeout = float(config["round-timeout"])
    if done < 0:
        record.save_checkpoint(0, arrays, strategy.state())
        log.info(f"round 0: the initial model, validated with round 1's training (run folder {run_dir})")
        done = 0
    try:
        for server_round in range(done + 1, int(config["num-server-rounds"]) + 1):
            arrays = _train(grid, strategy, server_round, arrays, site_config, config)
        last = int(config["num-server-rounds"])
        if "dice" not in record.round(last):
            log.info(f"round {last}: validating the final global model at every site")
            _validate(grid, strategy, last, arrays, site_config, timeout)
    except RunStopped as stop:
        record.event(str(stop))
        record.finish("stopped")
        log.warning(f"{stop}. The last completed round is kept; continue later with --resume {run_dir}")
        return record  # the run's own record says "stopped"; fedseg run / simulate exit non-zero on it
    record.finish("completed")
    log.info("\n" + record.summary())
    log.info(f"\nrun folder: {run_dir} (global_model.pt, checkpoints/, history.json, summary.md)")
    return record


@contextmanager
def progress_on_stdout() -> Iterator[None]:
    """The run's progress as plain lines on stdout while the app runs. In a deployment the app runs in
    Flower's `flwr-serverapp`, where fedseg's CLI never configures logging: Flower streams that process's
    stdout to `fedseg run` (`flwr log --stream`), and `fedseg simulate` runs it in Flower's simulation
    process alike. Where a handler is already there (the CLI's, in-process), none is added: no line twice."""
    logger = logging.getLogger("server")
    if logger.handlers:
        yield
        return
    handler, level = logging.StreamHandler(sys.stdout), logger.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The run config as Flower hands it over (a deployment's `fedseg run`, or `fedseg simulate`);
    replies are named by the sites registered in the server folder it runs in (none: their own names)."""
    with progress_on_stdout():
        try:
            run_federation(grid, run_config(dict(context.run_config)), registered=read_site_names(Path(".")))
        except AggregatorError as err:  # a configuration mistake, said in one line; the run leaves no record
            log.error(f"run not started: {err}")
