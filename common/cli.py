"""The `fedseg` command: the shared plumbing only. The subcommands belong to their roles
(`client/commands.py`: the site's; `server/commands.py`: the coordinator's; `simulations/commands.py`:
the researcher's), each adding its own with a `register(subparsers)` function. This module, at the
bottom of the layers, never imports them: it finds them through the package's entry-point group
`fedseg.commands` (pyproject.toml, `[project.entry-points."fedseg.commands"]`), so a role's
dependencies are imported only when its commands run and `fedseg --help` is instant.

Order of `fedseg --help`: the roles in COMMAND_GROUPS order (researcher, coordinator, site), each
role's subcommands in the order its `register` adds them. Only those three are loaded: another
distribution's entry point in the group is ignored (`fedseg site` runs as root).

Errors: library and command code raise `common.errors.FedsegError` (and subclasses) for what the
operator must act on; `main` alone turns them into their message and exit status 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from common.errors import FedsegError

COMMANDS_GROUP = "fedseg.commands"
# The roles' entry-point names, in the order `fedseg --help` lists their subcommands.
COMMAND_GROUPS = ("simulations", "server", "client")
# fedseg's top-level packages: their modules' loggers are the ones `configure_logging` shows.
PACKAGES = ("client", "server", "common", "simulations")


def command_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Each role's `register(subparsers)`, in COMMAND_GROUPS order."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=COMMANDS_GROUP):
        found.setdefault(ep.name, ep)  # the first distribution on sys.path wins, as for imports
    missing = [name for name in COMMAND_GROUPS if name not in found]
    if missing:
        raise FedsegError(f"fedseg's {', '.join(missing)} commands are not installed (no entry point in the group "
                          f"{COMMANDS_GROUP}): reinstall the package, e.g. pip install -e .")
    try:  # only fedseg's own roles: `fedseg site` runs as root, and a stray plugin could replace a command
        return [found[name].load() for name in COMMAND_GROUPS]
    except (ImportError, AttributeError) as err:
        raise FedsegError(f"fedseg's commands cannot be loaded ({err}): reinstall the package, e.g. pip install -e .") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedseg", description="Federated, differentially private medical image segmentation.")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log and fedseg's debug lines")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in command_registrars():
        register(sub)
    return parser


class ConsoleFormat(logging.Formatter):
    """Progress as plain lines, as a person reads them; warnings and errors say that they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname}: {message}" if record.levelno >= logging.WARNING else message


def configure_logging(verbose: bool) -> None:
    """fedseg's own log (each module's `logging.getLogger(__name__)`, under PACKAGES) as plain lines on
    stdout, INFO and up (DEBUG with --verbose); Flower's own log, through Flower's handler, only with
    --verbose. Done before any import of opacus, whose import-time basicConfig would otherwise print
    every Flower line twice."""
    import flwr.common.logger  # noqa: F401  (sets its own level on import; ours must come after)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(ConsoleFormat())
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h.formatter, ConsoleFormat)]  # once, however often called
        logger.addHandler(console)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False  # shown once, not again by the root's handler
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except FedsegError as err:  # an installation without its commands' metadata
        raise SystemExit(str(err)) from err
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except FedsegError as err:  # library code says what is wrong and what to do; only the command ends the process
        raise SystemExit(str(err)) from err
    except FileExistsError as err:  # e.g. a refusal to overwrite a key: a message, not a traceback
        raise SystemExit(str(err)) from err


if __name__ == "__main__":
    sys.exit(main())
