"""The researcher's `fedseg` subcommands: simulate, demo-data, bench.

`register(subparsers)` adds them to the `fedseg` parser (common/cli.py finds it through the
`fedseg.commands` entry point "simulations"). Only argument wiring lives here; each handler imports
the simulation code when it runs, so `fedseg --help` never imports Ray or the simulation engine."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.config import RUN_DEFAULTS
from server.run_options import add_run_options, describe, run_overrides

PATIENTS_HELP = "built-in sites get N to N + N/5 patients each (default: 50 for --size default, 4 for tiny)"


def _patients(text: str) -> int:
    count = int(text)
    if count < 2:
        raise argparse.ArgumentTypeError("a site needs at least 2 patients (one trains, one validates)")
    return count


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are whole numbers separated by commas, e.g. 0,1,2; not {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError("seeds must differ from one another and be 0 or more")
    return seeds


def _hex_key(text: str) -> str:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a key is hexadecimal, e.g. the output of `openssl rand -hex 16`") from None
    if len(key) < 16:
        raise argparse.ArgumentTypeError("a key needs at least 16 bytes (32 hex digits)")
    return key.hex()


def _default_cache() -> str:
    return os.environ.get("FEDSEG_CACHE", str(Path.home() / ".cache" / "fedseg"))


def _simulate(args: argparse.Namespace) -> int:
    from client.privacy_ledger import LedgerError
    from client.site_policy import PolicyError
    from simulations.faults import parse_faults
    from simulations.federation import build_federation
    from common.dataset import Preprocessing
    from common.site_files import site_folders
    from simulations.simulate import SimulationError, budget_for, prepare_sites, run_simulation, site_policy_for

    try:
        faults = parse_faults(args.fault)
    except ValueError as err:
        raise SimulationError(str(err)) from err
    if args.data_root:
        sites = site_folders(Path(args.data_root))
    else:
        root = build_federation(Path(args.cache_dir), args.sites, args.seed, args.size, args.patients)
        print(f"built-in federation: {root}")
        sites = site_folders(root)
    run_dir = Path(args.resume or args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S"))
    min_sites = min(args.min_sites, len(sites)) if args.min_sites else (None if args.resume else len(sites))
    overrides = run_overrides(args, min_sites, run_dir)
    budget = budget_for(float(overrides["target-epsilon"]), args.epsilon_budget)
    # Real site folders keep their policy and ledger beside the data, for every later run on the same
    # patients; the built-in synthetic sites get fresh ones in the run folder.
    state_root = Path(args.ledger_dir or (Path(args.data_root) / ".fedseg-sites" if args.data_root else run_dir / "sites"))
    try:
        policy = site_policy_for(overrides, budget)
        if args.validation_key:
            policy["validation_key"] = args.validation_key
        guards = prepare_sites(sites, state_root, policy)
        for guard in guards:
            if args.validation_key and guard.policy.split_key != bytes.fromhex(args.validation_key):
                raise SimulationError(f"--validation-key applies when a site's policy is first made; {guard.name}'s policy in "
                                      f"{state_root} has another key: give a new --ledger-dir to split with this one")
        if args.data_root:  # foreign data: show each site's load report before spending minutes on Ray
            for guard in guards:
                print(guard.load(("background", *guard.policy.classes), Preprocessing.from_config(overrides)).report.format())
    except (PolicyError, LedgerError, ValueError, OSError) as err:
        raise SimulationError(f"cannot simulate: {err}") from err
    print(f"{'resuming ' + str(run_dir) if args.resume else 'simulating'}: {len(sites)} sites, {describe(overrides)}, "
          f"site budget patient-level ε {budget}")
    for index, kinds in sorted(faults.items()):
        if index >= len(sites):
            raise SimulationError(f"--fault names site {index + 1}, but there are {len(sites)} sites")
        print(f"fault injection: {Path(sites[index]).name} sends {', '.join(kinds)} (one per round, in turn)")
    run_simulation(sites, run_dir, overrides, state_root, faults)
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from simulations.federation import build_federation
    from common.site_files import site_folders

    root = build_federation(Path(args.out), args.sites, args.seed, args.size, args.patients)
    print("synthetic site folders (DICOM series + DICOM-SEG), one per hospital:\n" + "\n".join(f"  {s}" for s in site_folders(root)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from simulations.bench import run_bench, run_deployment_bench

    if args.seeds and (args.scan_only or args.deployment_only):
        print("fedseg bench: --seeds is for the accuracy rows; --scan-only and --deployment-only have none", file=sys.stderr)
        return 2
    plan = "quick" if args.quick else "full"
    kind = "scan" if args.scan_only else "deployment" if args.deployment_only else plan
    out = Path(args.out or Path("results") / f"bench-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.scan_only:
        from simulations.scan_bench import run_scan_bench

        run_scan_bench(out, args.files)
        print((out / "README.md").read_text())
        return 0
    if args.deployment_only:
        run_deployment_bench(plan, out, Path(args.cache_dir))
        print((out / "table.md").read_text())
        print(f"results: {out} (results.json, table.md; each run's server, site and run logs)")
        return 0
    run_bench(plan, out, Path(args.cache_dir), deployment=not args.quick, seeds=args.seeds)
    print((out / "table.md").read_text())
    print(f"results: {out} (results.json, table.md, dice_vs_round.png, dice_vs_epsilon.png, dice_vs_patients.png, cost.png; runs/ and logs/)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the researcher's subcommands, in the order `fedseg --help` lists them."""
    sim = sub.add_parser("simulate", help="researcher: run N sites and the server locally on Flower's simulation engine")
    sim.add_argument("--sites", type=int, default=3, help="number of built-in synthetic sites (default 3)")
    sim.add_argument("--data-root", help="use existing site folders (each subfolder one site) instead of built-in data")
    add_run_options(sim)
    sim.add_argument("--epsilon-budget", type=float, default=None, help="each site's patient-level ε budget (default: --epsilon)")
    sim.add_argument("--min-sites", type=int, default=None, help="sites needed per round (default: all)")
    sim.add_argument("--size", choices=("default", "tiny"), default="default", help="built-in federation size")
    sim.add_argument("--patients", type=_patients, metavar="N", help=PATIENTS_HELP)
    sim.add_argument("--fault", action="append", default=[], metavar="SITE:KIND[,KIND...]",
                     help="make site number SITE faulty, one KIND per round in turn: crash, nan, shape, scale (100x update)")
    sim.add_argument("--out", help="run folder (default runs/simulate-<time>)")
    sim.add_argument("--ledger-dir", help="sites' policies and privacy ledgers (default: DATA_ROOT/.fedseg-sites with "
                     "--data-root, so every run on the same patients adds up; RUN_DIR/sites for built-in data)")
    sim.add_argument("--validation-key", type=_hex_key, metavar="HEX",
                     help="the sites' validation-split key when their policies are made (default: a fresh random one per site); "
                          "runs given the same key validate on the same patients, so they can be compared site by site")
    sim.add_argument("--cache-dir", default=_default_cache(), help="where the built-in federation is generated once")
    sim.set_defaults(func=_simulate)

    demo = sub.add_parser("demo-data", help="researcher: write the built-in synthetic hospitals' DICOM folders")
    demo.add_argument("out", help="folder to write them under")
    demo.add_argument("--sites", type=int, default=3)
    demo.add_argument("--size", choices=("default", "tiny"), default="default")
    demo.add_argument("--patients", type=_patients, metavar="N", help=PATIENTS_HELP)
    demo.add_argument("--seed", type=int, default=RUN_DEFAULTS["seed"])
    demo.set_defaults(func=_demo_data)

    bench = sub.add_parser("bench", help="researcher: utility (pooled, local, federated, DP) and cost, measured side by side")
    bench.add_argument("--quick", action="store_true", help="a few minutes, tiny data: checks that every benchmark runs")
    bench.add_argument("--deployment-only", action="store_true",
                       help="only the real-process deployment row, 3 times: round wall time vs the sites' compute (~8 min)")
    bench.add_argument("--scan-only", action="store_true",
                       help="only the site scan: time and peak memory of loading a --files-file folder and the hostile files (~2 min)")
    bench.add_argument("--files", type=int, default=10_000, help="files in the --scan-only site folder (default 10000)")
    bench.add_argument("--seeds", type=_seeds, metavar="S,S,...",
                       help="seeds for the accuracy rows (default: the plan's, 0,1,2 for the full bench; 0 for --quick)")
    bench.add_argument("--out", help="results folder (default results/bench-<plan>-<time>); runs an earlier call finished there are "
                                     "reused, so the same --out continues a bench that was cut short")
    bench.add_argument("--cache-dir", default=_default_cache())
    bench.set_defaults(func=_bench)
