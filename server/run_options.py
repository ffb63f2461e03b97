"""A training run's options, shared by `fedseg run` (a deployment) and `fedseg simulate`: one set of
flags, one set of defaults, one way to turn them into the run config (and to resume a run), and one
line that describes it. Light to import: the strategy check is imported only when a run is set up."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from common.config import OPTIONS, RUN_DEFAULTS
from common.errors import FedsegError


class RunOptionsError(FedsegError):
    """The options name a run that cannot start: an aggregator that would trim no one, or a run to
    resume that has no readable history."""


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per run-config option that has one. A resumable option's flag has no default, so that
    an unset flag keeps a resumed run's own value (a new run gets the option's default)."""
    for option in OPTIONS.values():
        if option.flag is None:
            continue
        help_text = f"{option.help} (default {option.default:g})" if option.resumable else option.help
        parser.add_argument(f"--{option.flag}", type=type(option.default), choices=option.choices or None, metavar=option.metavar,
                            default=None if option.resumable else option.default, help=help_text or None)
    changeable = [f"--{option.flag}" for option in OPTIONS.values() if option.resumable and option.flag]
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last completed round (its own settings; "
                             f"{', '.join(changeable)} and --min-sites may change)")


def run_overrides(args: argparse.Namespace, min_sites: int | None, run_dir: Path | None = None) -> dict[str, Any]:
    """The run config from the options. With --resume, the interrupted run's own config (from its
    history.json in `run_dir`), changed only by the resumable options given here. A robust
    aggregator that could trim no one is refused here (RunOptionsError), before anything starts."""
    from common.config import run_config
    from server.strategy import check_aggregator

    config = _chosen_config(args, min_sites, run_dir)
    try:
        check_aggregator(run_config(config))
    except (KeyError, ValueError) as err:  # AggregatorError is a ValueError
        raise RunOptionsError(f"run not started: {err}") from err
    return config


def _chosen_config(args: argparse.Namespace, min_sites: int | None, run_dir: Path | None) -> dict[str, Any]:
    given = {**_flags(args, resumable_only=bool(args.resume)), "min-sites": min_sites}
    if args.resume:
        from server.run_record import RunHistory

        try:
            saved = RunHistory.read(run_dir).config
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not a run's history
            raise RunOptionsError(f"cannot resume {run_dir}: no readable history.json there ({err})") from err
        return {**saved, **{k: v for k, v in given.items() if v is not None}, "resume": True}
    return {k: RUN_DEFAULTS[k] if v is None else v for k, v in given.items()}


def _flags(args: argparse.Namespace, resumable_only: bool) -> dict[str, Any]:
    """The run-config keys add_run_options gives flags to (only the resumable ones, for a resumed run),
    with the flags' values (None: not given)."""
    return {key: getattr(args, option.flag.replace("-", "_")) for key, option in OPTIONS.items()
            if option.flag and (option.resumable or not resumable_only)}


def describe(config: dict[str, Any]) -> str:
    """One line for the operator: rounds, strategy, DP and the sites needed per round."""
    eps, sigma = float(config["target-epsilon"]), float(config["noise-multiplier"])
    dp = ("off (ε = ∞ baseline)" if not math.isfinite(eps) and sigma <= 0
          else f"noise multiplier {sigma}" if sigma > 0 else f"target patient-level ε {eps:g} over the run")
    return (f"{config['num-server-rounds']} rounds x {config['local-epochs']} local epochs, {config['strategy']}, DP {dp}, "
            f"δ {config['delta']:g}, at least {config['min-sites']} sites per round")
