"""The `fedseg` command. Subcommands import their side (site, server, simulation) lazily, so a site
installation never needs the simulation engine and `fedseg --help` is instant."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from common.config import RUN_DEFAULTS, STRATEGIES


def _simulate(args: argparse.Namespace) -> int:
    from simulations.federation import build_federation
    from simulations.simulate import budget_for, run_simulation, site_folders

    if args.data_root:
        sites = site_folders(Path(args.data_root))
    else:
        root = build_federation(Path(args.cache_dir), args.sites, args.seed, args.size)
        print(f"built-in federation: {root}")
        sites = site_folders(root)
    overrides = {
        "num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "strategy": args.strategy,
        "target-epsilon": args.epsilon, "noise-multiplier": args.noise_multiplier, "batch-size": args.batch_size,
        "learning-rate": args.learning_rate, "image-size": args.image_size, "min-sites": min(args.min_sites or len(sites), len(sites)),
        "seed": args.seed, "delta": args.delta, "max-grad-norm": args.max_grad_norm,
    }
    run_dir = Path(args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S"))
    budget = budget_for(args.epsilon, args.epsilon_budget)
    dp = "off (ε = ∞ baseline)" if not math.isfinite(args.epsilon) and args.noise_multiplier <= 0 else (
        f"noise multiplier {args.noise_multiplier}" if args.noise_multiplier > 0 else f"target ε {args.epsilon} over the run")
    print(f"simulating {len(sites)} sites, {args.rounds} rounds x {args.local_epochs} local epochs, {args.strategy}, "
          f"DP {dp}, δ {args.delta}, site budget ε {budget}")
    run_simulation(sites, run_dir, overrides, budget, Path(args.ledger_dir or run_dir / "privacy_ledgers"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedseg", description="Federated, differentially private medical image segmentation.")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run N sites and the server locally on Flower's simulation engine")
    sim.add_argument("--sites", type=int, default=3, help="number of built-in synthetic sites (default 3)")
    sim.add_argument("--data-root", help="use existing site folders (each subfolder one site) instead of built-in data")
    sim.add_argument("--rounds", type=int, default=RUN_DEFAULTS["num-server-rounds"])
    sim.add_argument("--local-epochs", type=int, default=RUN_DEFAULTS["local-epochs"])
    sim.add_argument("--epsilon", type=float, default=RUN_DEFAULTS["target-epsilon"],
                     help="target ε for the whole run, per site; 'inf' turns DP off (baseline)")
    sim.add_argument("--noise-multiplier", type=float, default=RUN_DEFAULTS["noise-multiplier"],
                     help="fixed DP-SGD noise multiplier instead of calibrating to --epsilon")
    sim.add_argument("--epsilon-budget", type=float, default=None, help="each site's ε budget (default: --epsilon)")
    sim.add_argument("--delta", type=float, default=RUN_DEFAULTS["delta"])
    sim.add_argument("--max-grad-norm", type=float, default=RUN_DEFAULTS["max-grad-norm"])
    sim.add_argument("--strategy", choices=STRATEGIES, default=RUN_DEFAULTS["strategy"])
    sim.add_argument("--batch-size", type=int, default=RUN_DEFAULTS["batch-size"])
    sim.add_argument("--learning-rate", type=float, default=RUN_DEFAULTS["learning-rate"])
    sim.add_argument("--image-size", type=int, default=RUN_DEFAULTS["image-size"])
    sim.add_argument("--min-sites", type=int, default=None, help="sites needed per round (default: all)")
    sim.add_argument("--seed", type=int, default=RUN_DEFAULTS["seed"])
    sim.add_argument("--size", choices=("default", "tiny"), default="default", help="built-in federation size")
    sim.add_argument("--out", help="run folder (default runs/simulate-<time>)")
    sim.add_argument("--ledger-dir", help="privacy ledgers (default RUN_DIR/privacy_ledgers)")
    sim.add_argument("--cache-dir", default=os.environ.get("FEDSEG_CACHE", str(Path.home() / ".cache" / "fedseg")),
                     help="where the built-in federation is generated once")
    sim.set_defaults(func=_simulate)
    return parser


def configure_logging(verbose: bool) -> None:
    """Our progress lines on stdout; Flower's own log only with --verbose. Done before any import of
    opacus, whose import-time basicConfig would otherwise print every Flower line twice."""
    import flwr.common.logger  # noqa: F401  (sets its own level on import; ours must come after)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("fedseg").setLevel(logging.INFO)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
