"""The coordinator's `fedseg` subcommands: certs, server, register, sites, run, report.

`register(subparsers)` adds them to the `fedseg` parser (common/cli.py finds it through the
`fedseg.commands` entry point "server"). Only argument wiring lives here; each handler imports the
server module that does the work when it runs, so `fedseg --help` stays instant."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common.config import RUN_DEFAULTS
from server.run_options import add_run_options, describe, run_overrides


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

    node_id = register_site(ServerFolder(Path(args.server_dir)), Path(args.public_key), args.name)
    print(f"registered site {args.name} (node {node_id}); it can now connect with its site.key")
    return 0


def _sites(args: argparse.Namespace) -> int:
    from server.control import list_sites
    from server.superlink import ServerFolder

    nodes = list_sites(ServerFolder(Path(args.server_dir)))
    print(f"{'site':<20} {'node id':<22} {'status':<12} online since")
    for node in nodes:
        print(f"{node['site']:<20} {node['node-id']:<22} {node['status']:<12} {node['online-at']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from server.control import start_run
    from server.superlink import ServerFolder

    folder = ServerFolder(Path(args.server_dir))
    run_dir = args.resume or args.run_dir or ""
    config = {**run_overrides(args, args.min_sites, folder.root / run_dir), "run-dir": run_dir}
    print(f"{'resuming ' + run_dir if args.resume else 'run'}: {describe(config)}", flush=True)
    return start_run(folder, config, args.verbose)


def _report(args: argparse.Namespace) -> int:
    from common.site_files import site_folders
    from server.report import ReportError, write_report

    if not (Path(args.run_dir) / "history.json").is_file():
        raise ReportError(f"{args.run_dir} holds no run (no history.json)")
    sites = site_folders(Path(args.data_root)) if args.data_root else []
    print(f"report: {write_report(args.run_dir, sites)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the coordinator's subcommands, in the order `fedseg --help` lists them."""
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

    reg = sub.add_parser("register", help="coordinator: allow a site to join (registers its public key)")
    reg.add_argument("server_dir")
    reg.add_argument("public_key", help="the site's site.pub")
    reg.add_argument("--name", required=True, help="the site's name")
    reg.set_defaults(func=_register)

    sites = sub.add_parser("sites", help="coordinator: list registered sites and whether they are online")
    sites.add_argument("server_dir")
    sites.set_defaults(func=_sites)

    run = sub.add_parser("run", help="coordinator: start a training run on the server and follow it")
    run.add_argument("server_dir")
    add_run_options(run)
    run.add_argument("--min-sites", type=int, help=f"sites needed per round (default {RUN_DEFAULTS['min-sites']})")
    run.add_argument("--run-dir", help="run folder, relative to the server folder (default runs/<time>)")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="anyone: an HTML page with the run's plots and final table")
    report.add_argument("run_dir")
    report.add_argument("--data-root", help="site folders (one per subfolder) to draw predictions on validation slices; "
                                            "only where the data is (a simulation, or at a site)")
    report.set_defaults(func=_report)
