"""`fedseg run` from a non-editable install: the Flower app folder it hands to `flwr run` is built from
what `pip install` put in site-packages, and the real `flwr build` accepts it, shipping what a build from
the checkout ships."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PACKAGES = ("common", "client", "server", "simulations")

# Run by the throwaway venv's python, outside the checkout: locate/build the app, `flwr build` it.
_BUILD = """
import json, subprocess, sys, zipfile
from pathlib import Path
import server
from server.control import flower_app

with flower_app() as app:
    built = subprocess.run([sys.argv[1], "build", "--app", str(app)], cwd=sys.argv[2], capture_output=True, text=True)
    left = [str(p.relative_to(app)) for p in app.rglob("*") if p.is_file()]
fab = next(Path(sys.argv[2]).glob("*.fab"), None)
print(json.dumps({"server": server.__file__, "app": str(app), "app_removed": not app.exists(), "files": left,
                  "build": built.returncode, "output": built.stdout + built.stderr,
                  "fab": sorted(zipfile.ZipFile(fab).namelist()) if fab else None}))
"""


@pytest.mark.slow
def test_an_installed_fedseg_builds_the_flower_app_without_the_checkout(tmp_path):
    # A copy of the sources (pip builds in the source folder: not in the shared checkout).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    # A venv of its own that sees this environment's packages (torch, flwr, ...) as a plain path entry:
    # their .pth files, this checkout's editable-install finder among them, are not run.
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "main_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
                                "--no-index", str(source)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shutil.rmtree(source)  # nothing may come from the sources any more

    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([python, "-I", "-c", _BUILD, str(Path(sys.executable).parent / "flwr"), str(work)],
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert Path(result["server"]).is_relative_to(site)  # the installed package, not the checkout
    assert result["build"] == 0, result["output"]
    assert result["app_removed"]  # the temporary app folder does not outlive its use
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    assert sorted(result["files"]) == sorted(["pyproject.toml", *include])
    assert [n for n in result["fab"] if n.endswith(".py")] == sorted(include)
