"""The hospital site's `fedseg` subcommands: site-init, audit, site, predict, pull.

`register(subparsers)` adds them to the `fedseg` parser (common/cli.py finds it through the
`fedseg.commands` entry point "client"). Only argument wiring lives here; each handler imports the
site module that does the work when it runs, so `fedseg --help` stays instant and a site never
imports the server or the simulation engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from client.pacs import PACS_PASSWORD_ENV
from client.site_policy import SitePolicy
from common.config import RUN_DEFAULTS, class_names
from common.errors import FedsegError


class SiteCommandError(FedsegError):
    """A site command cannot do what its options ask (a missing option, a model or source it cannot use)."""


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
        raise SiteCommandError("say which studies to copy from the PACS: --study UID (repeatable), or --all for every study on it")
    return args.study


def _pacs_session(args: argparse.Namespace, urls: list[str]):
    """The PACS session from the `_pacs_options` flags."""
    from client.pacs import pacs_session

    return pacs_session(urls, args.pacs_token_file, args.pacs_user, args.pacs_ca_cert, args.allow_http)


def _site_init(args: argparse.Namespace) -> int:
    from client.site_setup import init_site

    root = Path(args.site_dir)
    name = args.name or root.resolve().name
    if ":" in args.classes:
        raise SiteCommandError(f"--classes lists class names only (a run's loss weights are the coordinator's): got {args.classes!r}")
    try:
        classes = tuple(class_names({"classes": args.classes})[1:])
    except ValueError as err:
        raise SiteCommandError(f"--classes: {err}") from err
    values = {"epsilon_budget": args.epsilon_budget, "delta": args.delta, "min_noise_multiplier": args.min_noise_multiplier,
              "min_spacing_mm": args.min_spacing, "classes": classes}
    site = init_site(root, name, values)
    policy, keys = site.policy, site.keys
    print(f"site {name} set up in {root}:\n  {keys.private_key} stays here (owner-only); send {keys.public_key} to the coordinator\n"
          f"  {site.state.policy_file}: patient-level ε budget {policy.epsilon_budget:g}, δ {policy.delta:g}, noise multiplier ≥ "
          f"{policy.min_noise_multiplier:g}, classes {', '.join(policy.classes)} — review it with your privacy officer\n"
          f"  {site.ledger.path}: the privacy ledger and audit log (`fedseg audit {root}`); back it up, never delete it")
    return 0


def _site(args: argparse.Namespace) -> int:
    import torch

    from client.guard import budget_line, open_guard
    from client.isolation import IsolationError
    from client.pacs import local_data
    from client.privacy_ledger import LedgerError
    from client.site_policy import PolicyError
    from client.supernode import SiteError, SiteFolder, run_site
    from common.dataset import Preprocessing
    from common.dicomweb import is_dicomweb

    folder = SiteFolder(Path(args.site_dir))
    name = args.name or folder.root.resolve().name
    data = local_data(args.data, folder.root / "pacs", None, _pacs_session(args, [args.data]) if is_dicomweb(args.data) else None)
    if args.insecure:
        print("WARNING: --insecure: no TLS and no site authentication. Local tests only.", flush=True)
    elif not args.ca_cert:
        raise SiteCommandError("--ca-cert is required: the federation's ca.crt from the coordinator (or --insecure for a local test)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        guard, _ = open_guard(folder.state, name, data.resolve())
        classes = ("background", *guard.policy.classes)
        site_data = guard.load(classes, Preprocessing.from_config(RUN_DEFAULTS))
        print(site_data.report.format())
        print(f"{name}: {len(site_data.train)} training patients ({site_data.train_slices} slices), {len(site_data.validation)} "
              f"validation patients; {budget_line(guard)}", flush=True)
        return run_site(folder, guard, args.server, None if args.insecure else Path(args.ca_cert), args.runtime_port, args.verbose,
                        args.external_courier)
    except (PolicyError, LedgerError, IsolationError, SiteError, ValueError, OSError) as err:
        raise SiteCommandError(f"site {name} cannot start: {err}") from err


def _audit(args: argparse.Namespace) -> int:
    from client.audit import audit_table
    from client.privacy_ledger import LedgerError, PrivacyLedger
    from client.site_policy import PolicyError
    from client.site_state import SiteState

    state = SiteState(Path(args.site_dir))
    try:
        policy = SitePolicy.load(state.policy_file)
        ledger = PrivacyLedger.open(state.ledger_file, policy.ledger_genesis or None)
    except (PolicyError, LedgerError) as err:
        raise SiteCommandError(f"AUDIT FAILED: {err}") from err
    print(audit_table(ledger, policy))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from client.pacs import local_data
    from common.dicomweb import is_dicomweb

    if not is_dicomweb(args.url):
        raise SiteCommandError(f"{args.url} is not a DICOMweb URL (https://... or http://...)")
    studies = _chosen_studies(args)
    local_data(args.url, Path(args.folder), studies, _pacs_session(args, [args.url]))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from common.dicomweb import is_dicomweb

    from_pacs = is_dicomweb(args.source)
    studies = _chosen_studies(args) if from_pacs else None
    http = _pacs_session(args, [u for u in (args.source if from_pacs else None, args.store) if u])

    import torch

    from client.pacs import PacsError, local_data
    from client.predict import predict_folder
    from common.model import load_global_model, pick_device

    try:
        global_model = load_global_model(args.model)
    except (FileNotFoundError, KeyError, RuntimeError) as err:
        raise SiteCommandError(f"cannot load the global model from {args.model}: {err}") from err
    device = torch.device(args.device) if args.device else pick_device()
    print(f"global model {global_model.path} (round {global_model.round}, sha256 {global_model.sha256[:16]}) on {device}", flush=True)
    source = local_data(args.source, Path(args.out) / "pacs", studies, http)
    try:
        results, report = predict_folder(global_model, source, Path(args.out), device, args.nifti, not args.no_png)
    except (FileNotFoundError, ValueError) as err:
        raise SiteCommandError(str(err)) from err
    if args.store:
        from common.dicomweb import push

        try:
            print(f"stored {push(args.store, [r.seg for r in results], http)} DICOM-SEG objects on {args.store}")
        except ConnectionError as err:
            raise PacsError(str(err)) from err
    if report.skipped:
        print("\n".join(f"  skipped {s['path']}: {s['reason']}" for s in report.skipped))
    print(f"{len(results)} series segmented; DICOM-SEG{' + NIfTI' if args.nifti else ''}{'' if args.no_png else ' + PNG'} under {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the site's subcommands, in the order `fedseg --help` lists them."""
    init = sub.add_parser("site-init", help="hospital IT: set up a site: key pair, site policy, privacy ledger")
    init.add_argument("site_dir", help="site folder (site.key, site.pub, site_policy.toml, privacy_ledger/)")
    init.add_argument("--name", help="site name (default: the folder name)")
    init.add_argument("--epsilon-budget", type=float, default=RUN_DEFAULTS["target-epsilon"],
                      help="the most patient-level ε this site will ever spend, over all runs")
    init.add_argument("--delta", type=float, default=RUN_DEFAULTS["delta"], help="the site's δ (below 1 / patients)")
    init.add_argument("--min-noise-multiplier", type=float, default=0.5, help="no round trains with less DP noise")
    init.add_argument("--min-spacing", type=float, default=SitePolicy.min_spacing_mm, metavar="MM",
                      help="the finest in-plane pixel spacing a run may ask (the site's images take memory as its inverse square)")
    init.add_argument("--classes", default=",".join(class_names(RUN_DEFAULTS)[1:]), help="the classes runs may ask this site to segment")
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
    site.add_argument("--external-courier", metavar="USER",
                      help="you start the courier (Flower's SuperExec, which runs the coordinator's app bundle) as USER "
                           "yourself, e.g. when fedseg does not run as root or the courier runs in another container: "
                           "the guard's socket is opened to USER and the command to run is printed")
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
