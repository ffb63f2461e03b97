"""The `fedseg` command. Subcommands import their side (site, server, simulation) lazily, so a site
installation never needs the simulation engine and `fedseg --help` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.config import RUN_DEFAULTS, STRATEGIES
from common.errors import FedsegError


def _run_options(parser: argparse.ArgumentParser) -> None:
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


def _run_overrides(args: argparse.Namespace, min_sites: int | None, run_dir: Path | None = None) -> dict[str, Any]:
    """The run config from the options. With --resume, the interrupted run's own config (from its
    history.json in `run_dir`), changed only by the resumable options given here. A robust
    aggregator that could trim no one is refused here, before anything starts."""
    from common.config import run_config
    from server.strategy import check_aggregator

    config = _chosen_config(args, min_sites, run_dir)
    try:
        check_aggregator(run_config(config))
    except (KeyError, ValueError) as err:  # AggregatorError is a ValueError
        raise SystemExit(f"run not started: {err}") from err
    return config


def _chosen_config(args: argparse.Namespace, min_sites: int | None, run_dir: Path | None) -> dict[str, Any]:
    resumable = {"num-server-rounds": args.rounds, "round-timeout": args.round_timeout, "round-retries": args.round_retries,
                 "min-sites": min_sites}
    if args.resume:
        try:
            saved = json.loads((run_dir / "history.json").read_text())["config"]
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"cannot resume {run_dir}: no readable history.json there ({err})") from err
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


def _describe(config: dict[str, Any]) -> str:
    eps, sigma = float(config["target-epsilon"]), float(config["noise-multiplier"])
    dp = ("off (ε = ∞ baseline)" if not math.isfinite(eps) and sigma <= 0
          else f"noise multiplier {sigma}" if sigma > 0 else f"target patient-level ε {eps:g} over the run")
    return (f"{config['num-server-rounds']} rounds x {config['local-epochs']} local epochs, {config['strategy']}, DP {dp}, "
            f"δ {config['delta']:g}, at least {config['min-sites']} sites per round")


def _simulate(args: argparse.Namespace) -> int:
    from client.privacy_ledger import LedgerError
    from client.site_policy import PolicyError
    from simulations.faults import parse_faults
    from simulations.federation import build_federation
    from simulations.simulate import budget_for, prepare_sites, run_simulation, site_folders, site_policy_for

    try:
        faults = parse_faults(args.fault)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    if args.data_root:
        sites = site_folders(Path(args.data_root))
    else:
        root = build_federation(Path(args.cache_dir), args.sites, args.seed, args.size)
        print(f"built-in federation: {root}")
        sites = site_folders(root)
    run_dir = Path(args.resume or args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S"))
    min_sites = min(args.min_sites, len(sites)) if args.min_sites else (None if args.resume else len(sites))
    overrides = _run_overrides(args, min_sites, run_dir)
    budget = budget_for(float(overrides["target-epsilon"]), args.epsilon_budget)
    # Real site folders keep their policy and ledger beside the data, for every later run on the same
    # patients; the built-in synthetic sites get fresh ones in the run folder.
    state_root = Path(args.ledger_dir or (Path(args.data_root) / ".fedseg-sites" if args.data_root else run_dir / "sites"))
    try:
        guards = prepare_sites(sites, state_root, site_policy_for(overrides, budget))
        if args.data_root:  # foreign data: show each site's load report before spending minutes on Ray
            for guard in guards:
                print(guard.load(("background", *guard.policy.classes), int(overrides["image-size"])).report.format())
    except (PolicyError, LedgerError, ValueError, OSError) as err:
        raise SystemExit(f"cannot simulate: {err}") from err
    print(f"{'resuming ' + str(run_dir) if args.resume else 'simulating'}: {len(sites)} sites, {_describe(overrides)}, "
          f"site budget patient-level ε {budget}")
    for index, kinds in sorted(faults.items()):
        if index >= len(sites):
            raise SystemExit(f"--fault names site {index + 1}, but there are {len(sites)} sites")
        print(f"fault injection: {Path(sites[index]).name} sends {', '.join(kinds)} (one per round, in turn)")
    run_simulation(sites, run_dir, overrides, state_root, faults)
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from simulations.federation import build_federation
    from simulations.simulate import site_folders

    root = build_federation(Path(args.out), args.sites, args.seed, args.size)
    print("synthetic site folders (DICOM series + DICOM-SEG), one per hospital:\n" + "\n".join(f"  {s}" for s in site_folders(root)))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from common.credentials import create_server_certificates
    from server.superlink import ServerFolder

    names = list(dict.fromkeys([*args.hostname, "localhost", "127.0.0.1"]))
    certs = create_server_certificates(ServerFolder(Path(args.server_dir)).certs.folder, names)
    print(f"CA and server certificate for {', '.join(names)} in {certs.folder}\n"
          f"  give every site {certs.ca_cert} (public); keep {certs.ca_key} and {certs.server_key} private")
    return 0


def _server(args: argparse.Namespace) -> int:
    from common.processes import run_until_stopped
    from server.superlink import ServerFolder, local_address, start_server

    folder = ServerFolder(Path(args.server_dir))
    if args.insecure:
        print("WARNING: --insecure: TLS is OFF (model updates and metrics travel unencrypted) and site "
              "authentication is OFF (any process that reaches the port can join as a site). Local tests only.", flush=True)
    os.umask(0o077)  # state.db (model updates), logs and the Flower connection: the coordinator's alone
    server = start_server(folder, args.host, args.port, args.insecure, args.allow, args.local_port, args.verbose)
    allowed = f"from {', '.join(args.allow)} only" if args.allow else "from any address"
    print(f"aggregation server on {args.host}:{args.port} ({'INSECURE' if args.insecure else 'TLS, site authentication on'}; "
          f"Fleet API only, {allowed}); state {folder.root / 'state.db'}; logs {folder.log_file.parent}\n"
          f"  register a site: fedseg register {folder.root} site.pub --name SITE\n"
          f"  start a run:     fedseg run {folder.root} --rounds N\n"
          f"  (both use the SuperLink's Control API on this machine only: {folder.connection_file})\n"
          f"  sites reach it at {local_address(args.host, args.port)} (or this machine's name); Ctrl-C stops it", flush=True)
    try:
        return run_until_stopped(server.superlink, server.edge)
    finally:
        server.close()


def _register(args: argparse.Namespace) -> int:
    from server.control import register_site
    from server.superlink import ServerFolder

    return register_site(ServerFolder(Path(args.server_dir)), Path(args.public_key), args.name)


def _sites(args: argparse.Namespace) -> int:
    from server.control import list_sites
    from server.superlink import ServerFolder

    return list_sites(ServerFolder(Path(args.server_dir)))


def _run(args: argparse.Namespace) -> int:
    from server.control import start_run
    from server.superlink import ServerFolder

    folder = ServerFolder(Path(args.server_dir))
    run_dir = args.resume or args.run_dir or ""
    config = {**_run_overrides(args, args.min_sites, folder.root / run_dir), "run-dir": run_dir}
    print(f"{'resuming ' + run_dir if args.resume else 'run'}: {_describe(config)}", flush=True)
    return start_run(folder, config, args.verbose)


def _site_init(args: argparse.Namespace) -> int:
    from client.site_state import SiteState
    from client.site_policy import PolicyError
    from common.credentials import create_site_keys

    root = Path(args.site_dir)
    name = args.name or root.resolve().name
    values = {"epsilon_budget": args.epsilon_budget, "delta": args.delta, "min_noise_multiplier": args.min_noise_multiplier,
              "classes": tuple(c.strip() for c in args.classes.split(",") if c.strip())}
    state = SiteState(root)
    if state.policy_file.exists() or state.ledger_file.exists():
        raise SystemExit(f"{root} is already set up (site_policy.toml / privacy_ledger): fedseg never replaces them")
    try:
        policy, ledger, _ = state.open(name, values)
    except PolicyError as err:
        raise SystemExit(str(err)) from err
    keys = create_site_keys(root, name)
    root.chmod(0o700)  # policy, ledger and key: the site's alone
    print(f"site {name} set up in {root}:\n  {keys.private_key} stays here (owner-only); send {keys.public_key} to the coordinator\n"
          f"  {state.policy_file}: patient-level ε budget {policy.epsilon_budget:g}, δ {policy.delta:g}, noise multiplier ≥ "
          f"{policy.min_noise_multiplier:g}, classes {', '.join(policy.classes)} — review it with your privacy officer\n"
          f"  {ledger.path}: the privacy ledger and audit log (`fedseg audit {root}`); back it up, never delete it")
    return 0


def _site(args: argparse.Namespace) -> int:
    import torch

    from client.guard import budget_line, open_guard
    from client.isolation import IsolationError
    from client.privacy_ledger import LedgerError
    from client.site_policy import PolicyError
    from client.supernode import SiteError, SiteFolder, run_site
    from common.dicomweb import is_dicomweb

    folder = SiteFolder(Path(args.site_dir))
    name = args.name or folder.root.resolve().name
    data = _local_data(args.data, folder.root / "pacs", None, _pacs_session(args, [args.data]) if is_dicomweb(args.data) else None)
    if args.insecure:
        print("WARNING: --insecure: no TLS and no site authentication. Local tests only.", flush=True)
    elif not args.ca_cert:
        raise SystemExit("--ca-cert is required: the federation's ca.crt from the coordinator (or --insecure for a local test)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        guard, _ = open_guard(folder.state, name, data.resolve())
        classes = ("background", *guard.policy.classes)
        site_data = guard.load(classes, int(RUN_DEFAULTS["image-size"]))
        print(site_data.report.format())
        print(f"{name}: {len(site_data.train)} training patients ({site_data.train_slices} slices), {len(site_data.validation)} "
              f"validation patients; {budget_line(guard)}", flush=True)
        return run_site(folder, guard, args.server, None if args.insecure else Path(args.ca_cert), args.runtime_port, args.verbose)
    except (PolicyError, LedgerError, IsolationError, SiteError, ValueError, OSError) as err:
        raise SystemExit(f"site {name} cannot start: {err}") from err


def _audit(args: argparse.Namespace) -> int:
    from client.audit import audit_table
    from client.site_state import SiteState
    from client.privacy_ledger import LedgerError, PrivacyLedger
    from client.site_policy import PolicyError, SitePolicy

    state = SiteState(Path(args.site_dir))
    try:
        policy = SitePolicy.load(state.policy_file)
        ledger = PrivacyLedger.open(state.ledger_file, policy.ledger_genesis or None)
    except (PolicyError, LedgerError) as err:
        raise SystemExit(f"AUDIT FAILED: {err}") from err
    print(audit_table(ledger, policy))
    return 0


PACS_PASSWORD_ENV = "FEDSEG_PACS_PASSWORD"


def _study_options(parser: argparse.ArgumentParser) -> None:
    """Which studies `pull` and `predict` copy from a PACS: never all of them by default."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--study", action="append", metavar="UID", help="this StudyInstanceUID (repeatable)")
    which.add_argument("--all", action="store_true", help="every study on the server (never the default)")


def _pacs_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """How a command reaches a PACS: credentials and TLS (`prefix` where the plain names mean something
    else, as `fedseg site --ca-cert`). No flag turns TLS verification off."""
    parser.add_argument(f"--{prefix}token-file", dest="pacs_token_file", metavar="PATH",
                        help="bearer token for the PACS, read from this file (one line)")
    parser.add_argument(f"--{prefix}user", dest="pacs_user",
                        help=f"PACS user for HTTP basic auth; the password comes from ${PACS_PASSWORD_ENV}")
    parser.add_argument(f"--{prefix}ca-cert", dest="pacs_ca_cert", metavar="PATH",
                        help="CA certificate(s) (PEM) that signed the PACS' https certificate (default: the public CAs of certifi)")
    parser.add_argument("--allow-http", action="store_true",
                        help="allow plain http:// to another machine: images and credentials cross the network unencrypted")


def _chosen_studies(args: argparse.Namespace) -> list[str] | None:
    """--study UIDs, or None for --all; neither is an error, as copying a whole PACS is never a default."""
    if args.all:
        return None
    if not args.study:
        raise SystemExit("say which studies to copy from the PACS: --study UID (repeatable), or --all for every study on it")
    return args.study


def _pacs_session(args: argparse.Namespace, urls: list[str]):
    """A requests session with the credentials and CA given; plain http:// to another machine refused
    unless --allow-http (then a warning), since it would carry images and credentials in clear."""
    from common.dicomweb import PacsAccess, is_plain_http_to_another_host, read_token, session

    for url in filter(is_plain_http_to_another_host, urls):
        if not args.allow_http:
            raise SystemExit(f"refusing plain http:// to {url}: use https:// (--ca-cert for the hospital's CA), "
                             "or --allow-http on a network you trust")
        print(f"WARNING: plain http:// to {url}: images{' and credentials' if args.pacs_token_file or args.pacs_user else ''} "
              "cross the network unencrypted", file=sys.stderr, flush=True)
    if args.pacs_token_file and args.pacs_user:
        raise SystemExit("give a token file or a user, not both")
    if args.pacs_user and PACS_PASSWORD_ENV not in os.environ:
        raise SystemExit(f"PACS user {args.pacs_user}: put the password in the environment variable {PACS_PASSWORD_ENV}")
    if args.pacs_ca_cert and not Path(args.pacs_ca_cert).is_file():
        raise SystemExit(f"PACS CA certificate {args.pacs_ca_cert}: no such file")
    try:
        token = read_token(Path(args.pacs_token_file)) if args.pacs_token_file else None
    except (OSError, ValueError) as err:
        raise SystemExit(f"PACS token file: {err}") from err
    return session(PacsAccess(token=token, user=args.pacs_user, password=os.environ.get(PACS_PASSWORD_ENV) if args.pacs_user else None,
                              ca_cert=Path(args.pacs_ca_cert) if args.pacs_ca_cert else None))


def _local_data(source: str, cache: Path, studies: list[str] | None = None, http=None) -> Path:
    """A folder as given, or a DICOMweb URL pulled into the site's `cache` folder first
    (`studies` None: every study, which `fedseg site --data URL` trains on)."""
    from common.dicomweb import is_dicomweb, pull

    if not is_dicomweb(source):
        return Path(source)
    try:
        pull(source, cache, studies, http)
    except ConnectionError as err:
        raise SystemExit(str(err)) from err
    return cache


def _pull(args: argparse.Namespace) -> int:
    from common.dicomweb import is_dicomweb

    if not is_dicomweb(args.url):
        raise SystemExit(f"{args.url} is not a DICOMweb URL (https://... or http://...)")
    studies = _chosen_studies(args)
    _local_data(args.url, Path(args.folder), studies, _pacs_session(args, [args.url]))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from common.dicomweb import is_dicomweb

    from_pacs = is_dicomweb(args.source)
    studies = _chosen_studies(args) if from_pacs else None
    http = _pacs_session(args, [u for u in (args.source if from_pacs else None, args.store) if u])

    import torch

    from client.predict import predict_folder
    from common.model import load_global_model, pick_device

    try:
        global_model = load_global_model(args.model)
    except (FileNotFoundError, KeyError, RuntimeError) as err:
        raise SystemExit(f"cannot load the global model from {args.model}: {err}") from err
    device = torch.device(args.device) if args.device else pick_device()
    print(f"global model {global_model.path} (round {global_model.round}, sha256 {global_model.sha256[:16]}) on {device}", flush=True)
    source = _local_data(args.source, Path(args.out) / "pacs", studies, http)
    try:
        results, report = predict_folder(global_model, source, Path(args.out), device, args.nifti, not args.no_png)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from err
    if args.store:
        from common.dicomweb import push

        try:
            print(f"stored {push(args.store, [r.seg for r in results], http)} DICOM-SEG objects on {args.store}")
        except ConnectionError as err:
            raise SystemExit(str(err)) from err
    if report.skipped:
        print("\n".join(f"  skipped {s['path']}: {s['reason']}" for s in report.skipped))
    print(f"{len(results)} series segmented; DICOM-SEG{' + NIfTI' if args.nifti else ''}{'' if args.no_png else ' + PNG'} under {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from server.report import write_report
    from simulations.simulate import site_folders

    if not (Path(args.run_dir) / "history.json").is_file():
        raise SystemExit(f"{args.run_dir} holds no run (no history.json)")
    sites = site_folders(Path(args.data_root)) if args.data_root else []
    print(f"report: {write_report(args.run_dir, sites)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from simulations.bench import run_bench, run_deployment_bench

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
    run_bench(plan, out, Path(args.cache_dir), deployment=not args.quick)
    print((out / "table.md").read_text())
    print(f"results: {out} (results.json, table.md, dice_vs_round.png, dice_vs_epsilon.png, cost.png; runs/ and logs/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedseg", description="Federated, differentially private medical image segmentation.")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="researcher: run N sites and the server locally on Flower's simulation engine")
    sim.add_argument("--sites", type=int, default=3, help="number of built-in synthetic sites (default 3)")
    sim.add_argument("--data-root", help="use existing site folders (each subfolder one site) instead of built-in data")
    _run_options(sim)
    sim.add_argument("--epsilon-budget", type=float, default=None, help="each site's patient-level ε budget (default: --epsilon)")
    sim.add_argument("--min-sites", type=int, default=None, help="sites needed per round (default: all)")
    sim.add_argument("--size", choices=("default", "tiny"), default="default", help="built-in federation size")
    sim.add_argument("--fault", action="append", default=[], metavar="SITE:KIND[,KIND...]",
                     help="make site number SITE faulty, one KIND per round in turn: crash, nan, shape, scale (100x update)")
    sim.add_argument("--out", help="run folder (default runs/simulate-<time>)")
    sim.add_argument("--ledger-dir", help="sites' policies and privacy ledgers (default: DATA_ROOT/.fedseg-sites with "
                     "--data-root, so every run on the same patients adds up; RUN_DIR/sites for built-in data)")
    sim.add_argument("--cache-dir", default=os.environ.get("FEDSEG_CACHE", str(Path.home() / ".cache" / "fedseg")),
                     help="where the built-in federation is generated once")
    sim.set_defaults(func=_simulate)

    demo = sub.add_parser("demo-data", help="researcher: write the built-in synthetic hospitals' DICOM folders")
    demo.add_argument("out", help="folder to write them under")
    demo.add_argument("--sites", type=int, default=3)
    demo.add_argument("--size", choices=("default", "tiny"), default="default")
    demo.add_argument("--seed", type=int, default=RUN_DEFAULTS["seed"])
    demo.set_defaults(func=_demo_data)

    certs = sub.add_parser("certs", help="coordinator: create the federation's CA and the server's TLS certificate")
    certs.add_argument("server_dir", help="server folder (certificates go to SERVER_DIR/certs)")
    certs.add_argument("--hostname", action="append", default=[],
                       help="name or IP the sites dial (repeatable); localhost and 127.0.0.1 are always included")
    certs.set_defaults(func=_certs)

    server = sub.add_parser("server", help="coordinator: start the aggregation server (Flower SuperLink)")
    server.add_argument("server_dir", help="server folder: certs/, state.db, runs/, logs/")
    server.add_argument("--host", default="127.0.0.1", help="address the sites dial (0.0.0.0: every interface); only "
                        "the Fleet API is served there, by nginx")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--allow", action="append", default=[], metavar="CIDR",
                        help="serve only sites in this network (repeatable; default: any address)")
    server.add_argument("--local-port", type=int, help="the SuperLink's own port on 127.0.0.1, for register/run/sites "
                        "and SSH tunnels (default: a free one, recorded in SERVER_DIR/.flwr/config.toml)")
    server.add_argument("--insecure", action="store_true", help="no TLS, no site authentication: local tests only")
    server.set_defaults(func=_server)

    register = sub.add_parser("register", help="coordinator: allow a site to join (registers its public key)")
    register.add_argument("server_dir")
    register.add_argument("public_key", help="the site's site.pub")
    register.add_argument("--name", required=True, help="the site's name")
    register.set_defaults(func=_register)

    sites = sub.add_parser("sites", help="coordinator: list registered sites and whether they are online")
    sites.add_argument("server_dir")
    sites.set_defaults(func=_sites)

    run = sub.add_parser("run", help="coordinator: start a training run on the server and follow it")
    run.add_argument("server_dir")
    _run_options(run)
    run.add_argument("--min-sites", type=int, help=f"sites needed per round (default {RUN_DEFAULTS['min-sites']})")
    run.add_argument("--run-dir", help="run folder, relative to the server folder (default runs/<time>)")
    run.set_defaults(func=_run)

    init = sub.add_parser("site-init", help="hospital IT: set up a site: key pair, site policy, privacy ledger")
    init.add_argument("site_dir", help="site folder (site.key, site.pub, site_policy.toml, privacy_ledger/)")
    init.add_argument("--name", help="site name (default: the folder name)")
    init.add_argument("--epsilon-budget", type=float, default=RUN_DEFAULTS["target-epsilon"],
                      help="the most patient-level ε this site will ever spend, over all runs")
    init.add_argument("--delta", type=float, default=RUN_DEFAULTS["delta"], help="the site's δ (below 1 / patients)")
    init.add_argument("--min-noise-multiplier", type=float, default=0.5, help="no round trains with less DP noise")
    init.add_argument("--classes", default=RUN_DEFAULTS["classes"], help="the classes runs may ask this site to segment")
    init.set_defaults(func=_site_init)

    audit = sub.add_parser("audit", help="privacy officer: every release and refusal of a site, with the ledger's hash chain checked")
    audit.add_argument("site_dir")
    audit.set_defaults(func=_audit)

    site = sub.add_parser("site", help="hospital IT: check this site's data, then connect to the server and train")
    site.add_argument("site_dir", help="site folder made by `fedseg site-init`: site.key, site_policy.toml, privacy_ledger/, logs/")
    site.add_argument("--data", required=True, help="the site's DICOM (+ DICOM-SEG / NIfTI masks) folder, or its PACS' "
                                                  "DICOMweb URL (pulled into SITE_DIR/pacs first)")
    site.add_argument("--server", required=True, help="the aggregation server, HOST:PORT")
    site.add_argument("--ca-cert", help="the federation's ca.crt, from the coordinator")
    site.add_argument("--name", help="site name (default: the site folder's name)")
    site.add_argument("--runtime-port", type=int, default=0, help="local port for the SuperNode's app runtime (default: a free one)")
    site.add_argument("--threads", type=int, default=0,
                      help="CPU threads for training (default: all cores; use 1 when several sites share one machine)")
    site.add_argument("--insecure", action="store_true", help="no TLS, no authentication: local tests only")
    _pacs_options(site, prefix="pacs-")
    site.set_defaults(func=_site)

    predict = sub.add_parser("predict", help="site: segment DICOM series with a global model; write DICOM-SEG (+ NIfTI, PNG)")
    predict.add_argument("model", help="global_model.pt, or a run folder holding one")
    predict.add_argument("source", help="a folder of DICOM (one series, a study, or many studies), or a DICOMweb URL "
                                        "(e.g. https://pacs:8042/dicom-web), pulled into OUT/pacs first (needs --study or --all)")
    predict.add_argument("--store", metavar="URL", help="store the DICOM-SEGs on this DICOMweb server (STOW-RS), "
                                                        "with the same credentials and CA")
    predict.add_argument("--out", required=True, help="output folder: OUT/<patient>/<series uid>.seg.dcm (+ .nii.gz, .png)")
    predict.add_argument("--nifti", action="store_true", help="also write each mask as NIfTI")
    predict.add_argument("--no-png", action="store_true", help="skip the PNG quick look")
    predict.add_argument("--device", help="cpu or cuda (default: the GPU when there is one)")
    _study_options(predict)
    _pacs_options(predict)
    predict.set_defaults(func=_predict)

    pull = sub.add_parser("pull", help="site: copy studies from the hospital's DICOMweb server (PACS) into a local folder")
    pull.add_argument("url", help="DICOMweb root, e.g. https://pacs:8042/dicom-web")
    pull.add_argument("folder", help="local folder (a site data folder); instances already there are not fetched again")
    _study_options(pull)
    _pacs_options(pull)
    pull.set_defaults(func=_pull)

    bench = sub.add_parser("bench", help="researcher: utility (pooled, local, federated, DP) and cost, measured side by side")
    bench.add_argument("--quick", action="store_true", help="a few minutes, tiny data: checks that every benchmark runs")
    bench.add_argument("--deployment-only", action="store_true",
                       help="only the real-process deployment row, 3 times: round wall time vs the sites' compute (~8 min)")
    bench.add_argument("--scan-only", action="store_true",
                       help="only the site scan: time and peak memory of loading a --files-file folder and the hostile files (~2 min)")
    bench.add_argument("--files", type=int, default=10_000, help="files in the --scan-only site folder (default 10000)")
    bench.add_argument("--out", help="results folder (default results/bench-<plan>-<time>)")
    bench.add_argument("--cache-dir", default=os.environ.get("FEDSEG_CACHE", str(Path.home() / ".cache" / "fedseg")))
    bench.set_defaults(func=_bench)

    report = sub.add_parser("report", help="anyone: an HTML page with the run's plots and final table")
    report.add_argument("run_dir")
    report.add_argument("--data-root", help="site folders (one per subfolder) to draw predictions on validation slices; "
                                            "only where the data is (a simulation, or at a site)")
    report.set_defaults(func=_report)
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
    try:
        return args.func(args)
    except FedsegError as err:  # library code says what is wrong and what to do; only the command ends the process
        raise SystemExit(str(err)) from err
    except FileExistsError as err:  # e.g. a refusal to overwrite a key: a message, not a traceback
        raise SystemExit(str(err)) from err


if __name__ == "__main__":
    sys.exit(main())
