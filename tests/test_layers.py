"""The layers point one way (issue 14): the CLI on top, then the roles' tooling, then the Flower apps,
then privacy / ML / data. By package:

- `common/` imports only `common` (the `fedseg` entry point in common/cli.py finds the roles'
  subcommands through the `fedseg.commands` entry points, never by importing them);
- `client/` (the site) and `server/` (the coordinator) import `common` and themselves, never each
  other nor `simulations`: a site installation needs no server code, and the reverse;
- `simulations/` may import all three (it runs sites and the server in one process).

Every import counts, at the top of a module or inside a function (a lazy import is still a
dependency), and so does `importlib.import_module("pkg...")` with a literal name."""

from __future__ import annotations

import argparse
import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PACKAGES = ("common", "client", "server", "simulations")
MAY_IMPORT = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "simulations": {"common", "client", "server", "simulations"},
}
# Justified upward or sideways imports, as {(importing module file, imported module)}, each with its reason
# beside it. None is needed today.
EXCEPTIONS: set[tuple[str, str]] = set()


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package`, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the module's own package
                found.append((node.lineno, package + (f".{node.module}" if node.module else "")))
            elif node.module:
                found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def layer_violations(root: Path) -> list[str]:
    """'file:line imports module' for every import of a package the importing package may not use."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imported_modules(path.read_text(encoding="utf-8"), package):
                top = module.split(".")[0]
                if top in PACKAGES and top not in MAY_IMPORT[package] and (rel, module) not in EXCEPTIONS:
                    bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_no_module_imports_a_higher_layer():
    assert layer_violations(REPO) == []


def test_exceptions_are_still_needed():
    """An exception that no longer matches an import is stale: remove it, so the list stays the truth."""
    used = {(path.relative_to(REPO).as_posix(), module) for package in PACKAGES for path in (REPO / package).rglob("*.py")
            for _, module in imported_modules(path.read_text(encoding="utf-8"), package)}
    assert EXCEPTIONS <= used


@pytest.mark.parametrize("plant, package", [
    ("def f():\n    from client.guard import open_guard\n", "common"),  # lazy, inside a function
    ("import server.control\n", "client"),
    ("from simulations import simulate\n", "server"),
    ("import importlib\nm = importlib.import_module('simulations.bench')\n", "client"),
])
def test_the_check_catches_a_planted_upward_import(tmp_path, plant, package):
    for name in PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "planted.py").write_text(plant)
    assert [v.split(" imports ")[0].split(":")[0] for v in layer_violations(tmp_path)] == [f"{package}/planted.py"]


def test_simulations_may_import_every_layer(tmp_path):
    for name in PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / "simulations" / "ok.py").write_text("import client.guard\nfrom server import control\nfrom . import bench\n")
    (tmp_path / "client" / "ok.py").write_text("from .guard import x\nfrom common.config import RUN_DEFAULTS\n")
    assert layer_violations(tmp_path) == []


def test_only_the_cli_raises_system_exit():
    """Library and command code raise FedsegError; common/cli.py alone turns it into an exit status."""
    raising = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                exc = node.exc.func if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) else getattr(node, "exc", None)
                if isinstance(node, ast.Raise) and getattr(exc, "id", None) == "SystemExit":
                    raising.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert all(r.startswith("common/cli.py:") for r in raising), raising


def test_command_entry_points_match_the_cli_order():
    """pyproject declares one `register` per role, under the names common/cli.py orders `--help` by."""
    from common.cli import COMMAND_GROUPS, COMMANDS_GROUP

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][COMMANDS_GROUP]
    assert set(declared) == set(COMMAND_GROUPS)
    assert all(target == f"{name}.commands:register" for name, target in declared.items())


def test_every_subcommand_is_assembled_in_role_order():
    from common.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["simulate", "demo-data", "bench",
                                 "certs", "server", "register", "sites", "run", "report",
                                 "site-init", "audit", "site", "predict", "pull"]


def test_missing_command_metadata_is_a_message_not_a_traceback(monkeypatch):
    """An installation whose metadata lacks the entry points (pyproject edited, not reinstalled) says so."""
    import common.cli as cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    with pytest.raises(SystemExit, match="not installed.*pip install -e"):
        cli.main(["--help"])


def test_the_cli_shows_fedsegs_log_as_plain_lines_on_stdout_and_flowers_once_only_with_verbose():
    """Library modules log (`logging.getLogger(__name__)`); the CLI alone decides where it shows."""
    import subprocess
    import sys

    script = ("import logging, sys; from common.cli import configure_logging; configure_logging(sys.argv[1] == 'verbose'); "
              "logging.getLogger('server.strategy').info('round 1: trained'); logging.getLogger('client.pacs').warning('plain http'); "
              "logging.getLogger('simulations.bench').debug('detail'); logging.getLogger('flwr').info('flower chatter')")
    quiet, verbose = (subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True, cwd=REPO)
                      for mode in ("quiet", "verbose"))
    assert quiet.stdout == "round 1: trained\nWARNING: plain http\n" and quiet.stderr == ""  # a warning says it is one
    assert verbose.stdout.startswith("round 1: trained\nWARNING: plain http\ndetail\n")
    assert (verbose.stdout + verbose.stderr).count("flower chatter") == 1
