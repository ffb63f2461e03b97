"""A training run's options, shared by `fedseg run` (a deployment) and `fedseg simulate`: one set of
flags, one set of defaults, one way to turn them into the run config (and to resume a run), and one
line that describes it. Light to import: the strategy check is imported only when a run is set up."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from common.config import RUN_DEFAULTS, STRATEGIES
from common.errors import FedsegError


class RunOptionsError(FedsegError):
    """The options name a run that cannot start: an aggregator that would trim no one, or a run to
    resume that has no readable history."""


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Run options shared by `simulate` and `run`: one set of flags, one set of defaults."""
    parser.add_argument("--rounds", type=int, help=f"federated rounds (default {RUN_DEFAULTS['num-server-rounds']})")
    parser.add_argument("--local-epochs", type=int, default=RUN_DEFAULTS["local-epochs"])
    parser.add_argument("--epsilon", type=float, default=RUN_DEFAULTS["target-epsilon"],
                        help="target patient-level ε for the whole run, per site; 'inf' turns DP off (baseline)")
    parser.add_argument("--noise-multiplier", type=float, default=RUN_DEFAULTS["noise-multiplier"],
                        help="fixed DP-SGD noise multiplier instead of calibrating to --epsilon")
    parser.add_argument("--delta", type=float, default=RUN_DEFAULTS["delta"])
    parser.add_argument("--max-grad-norm", type=float, default=RUN_DEFAULTS["max-grad-norm"])
    parser.add_argument("--strategy", choices=STRATEGIES, default=RUN_DEFAULTS["strategy"])
    parser.add_argument("--batch-size", type=int, default=RUN_DEFAULTS["batch-size"])
    parser.add_argument("--learning-rate", type=float, default=RUN_DEFAULTS["learning-rate"])
    parser.add_argument("--image-size", type=int, default=RUN_DEFAULTS["image-size"])
    parser.add_argument("--seed", type=int, default=RUN_DEFAULTS["seed"])
    parser.add_argument("--classes", default=RUN_DEFAULTS["classes"],
                        help="foreground classes, matched to SEG segment labels (default organ,lesion)")
    parser.add_argument("--round-timeout", type=float, help="seconds to wait for sites' replies (and for enough sites to be "
                        f"online) per round (default {RUN_DEFAULTS['round-timeout']:g})")
    parser.add_argument("--round-retries", type=int, help="times a round is retried when fewer than --min-sites usable "
                        f"updates came back (default {RUN_DEFAULTS['round-retries']})")
    parser.add_argument("--max-update-norm-ratio", type=float, default=RUN_DEFAULTS["max-update-norm-ratio"],
                        help="reject an update whose norm exceeds this many times the other sites' median (0: off)")
    parser.add_argument("--trim-fraction", type=float, default=RUN_DEFAULTS["trim-fraction"], help="fedtrimmedavg: fraction cut at each end")
    parser.add_argument("--byzantine-sites", type=int, default=RUN_DEFAULTS["byzantine-sites"], help="krum, fedmedian, fedtrimmedavg: sites assumed malicious (at least 1 is always assumed)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last completed round (its own settings; "
                             "--rounds, --round-timeout, --round-retries and --min-sites may change)")


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
    resumable = {"num-server-rounds": args.rounds, "round-timeout": args.round_timeout, "round-retries": args.round_retries,
                 "min-sites": min_sites}
    if args.resume:
        from server.run_record import RunHistory

        try:
            saved = RunHistory.read(run_dir).config
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not a run's history
            raise RunOptionsError(f"cannot resume {run_dir}: no readable history.json there ({err})") from err
        return {**saved, **{k: v for k, v in resumable.items() if v is not None}, "resume": True}
    chosen = {
        **{k: RUN_DEFAULTS[k] if v is None else v for k, v in resumable.items()},
        "local-epochs": args.local_epochs, "strategy": args.strategy, "target-epsilon": args.epsilon,
        "noise-multiplier": args.noise_multiplier, "batch-size": args.batch_size, "learning-rate": args.learning_rate,
        "image-size": args.image_size, "seed": args.seed, "delta": args.delta, "max-grad-norm": args.max_grad_norm,
        "max-update-norm-ratio": args.max_update_norm_ratio, "trim-fraction": args.trim_fraction,
        "byzantine-sites": args.byzantine_sites, "classes": args.classes,
    }
    return chosen


def describe(config: dict[str, Any]) -> str:
    """One line for the operator: rounds, strategy, DP and the sites needed per round."""
    eps, sigma = float(config["target-epsilon"]), float(config["noise-multiplier"])
    dp = ("off (ε = ∞ baseline)" if not math.isfinite(eps) and sigma <= 0
          else f"noise multiplier {sigma}" if sigma > 0 else f"target patient-level ε {eps:g} over the run")
    return (f"{config['num-server-rounds']} rounds x {config['local-epochs']} local epochs, {config['strategy']}, DP {dp}, "
            f"δ {config['delta']:g}, at least {config['min-sites']} sites per round")
