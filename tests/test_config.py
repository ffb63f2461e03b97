import argparse
import ast
import math
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from common.config import RUN_DEFAULTS, SITE_KEYS, TrainSettings, class_names, class_spec, class_weights, run_config
from server.run_options import add_run_options, run_overrides


def test_pyproject_run_config_mirrors_defaults():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RUN_DEFAULTS


def test_unknown_keys_and_strategies_are_rejected():
    with pytest.raises(KeyError, match="num-rounds"):
        run_config({"num-rounds": 3})
    with pytest.raises(ValueError, match="strategy"):
        run_config({"strategy": "fedsgd"})
    assert run_config({"num-server-rounds": "4"})["num-server-rounds"] == 4
    assert run_config({"resume": "false"})["resume"] is False and run_config({"round-timeout": 5})["round-timeout"] == 5.0
    with pytest.raises(ValueError, match="resume"):
        run_config({"resume": "no"})


def _parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    return parser.parse_args(argv)


def test_the_flags_set_their_keys_and_unset_flags_give_the_defaults():
    defaults = run_overrides(_parsed(), None)
    assert defaults == {k: RUN_DEFAULTS[k] for k in defaults} and {"num-server-rounds", "target-epsilon", "min-sites"} <= set(defaults)
    config = run_overrides(_parsed("--rounds", "3", "--epsilon", "inf", "--strategy", "krum", "--byzantine-sites", "1",
                                   "--classes", "liver", "--round-timeout", "60"), 5)
    assert config["num-server-rounds"] == 3 and math.isinf(config["target-epsilon"]) and config["strategy"] == "krum"
    assert config["byzantine-sites"] == 1 and config["classes"] == "liver" and config["round-timeout"] == 60.0
    assert config["min-sites"] == 5
    with pytest.raises(SystemExit):
        _parsed("--strategy", "fedsgd")


def test_a_site_trains_from_what_it_is_sent():
    sent = {k: run_config({"num-server-rounds": 7, "learning-rate": 0.2})[k] for k in SITE_KEYS}
    settings = TrainSettings.from_config({**sent, "server-round": "3"})
    assert (settings.server_round, settings.num_rounds, settings.learning_rate) == (3, 7, 0.2)
    assert settings.proximal_mu == 0.0  # not sent unless the strategy is FedProx, which sends it itself
    assert TrainSettings.from_config({**sent, "server-round": 3, "proximal-mu": "0.5"}).proximal_mu == 0.5
    with pytest.raises(TypeError):
        TrainSettings.from_config({k: v for k, v in sent.items() if k != "batch-size"} | {"server-round": 3})


def test_class_names_put_background_first():
    assert class_names({"classes": "liver, tumour"}) == ["background", "liver", "tumour"]


def test_each_class_carries_its_loss_weight_to_the_sites():
    """The weights are the task's (the coordinator's `classes`), not a rule on the list's order: a
    class without one weighs 1, as background does, so another task's classes start unweighted."""
    assert class_weights(RUN_DEFAULTS) == [1.0, 1.0, 10.0] and class_names(RUN_DEFAULTS) == ["background", "organ", "lesion"]
    assert class_weights({"classes": "grey-matter,white-matter"}) == [1.0, 1.0, 1.0]
    sent = {k: run_config({"classes": "liver:3, tumour : 12.5"})[k] for k in SITE_KEYS}
    assert TrainSettings.from_config({**sent, "server-round": 1}).class_weights == [1.0, 3.0, 12.5]
    for bad in ("liver:0", "liver:1e-50", "liver:-1", "liver:nan", "liver:inf", "liver:1e9", "liver:heavy", ":3", "liver:3:4",
                "", ",", "liver:2,liver:3", ["liver"]):
        with pytest.raises(ValueError, match="NAME"):
            class_spec({"classes": bad})
    with pytest.raises(ValueError, match="NAME"):
        run_config({"classes": "liver,liver"})
    # A run's record writes every weight: a weightless list is then a run from before the weights.
    assert run_config({"classes": "liver, tumour:12.5"})["classes"] == "liver:1,tumour:12.5"
    flags = run_overrides(_parsed("--classes", "liver:3,tumour:12"), 2)
    assert class_weights(flags) == [1.0, 3.0, 12.0] and class_names(flags)[1:] == ["liver", "tumour"]



def test_a_site_policy_lists_class_names_only(tmp_path, fedseg_here):
    """Loss weights are the coordinator's choice for a run, not a site's to keep: site-init refuses
    them (it did drop them silently), and a malformed list, before anything is written."""
    for classes, said in (("organ:2,lesion", "class names only"), ("organ,organ", "each name once"), (",", "at least one")):
        result = fedseg_here("site-init", "site", "--classes", classes, cwd=tmp_path)
        assert result.returncode != 0 and said in result.stderr and "Traceback" not in result.stderr, classes
        assert not (tmp_path / "site").exists()


REPO = Path(__file__).parents[1]


def _project_imports(module: str) -> set[str]:
    """Every fedseg module `module` imports, directly or not, at the top or inside a function."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((REPO / f"{name.replace('.', '/')}.py").read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            todo += [n for n in names if n.split(".")[0] in ("common", "client", "server", "simulations")]
    return seen


@pytest.mark.slow  # real processes: `flwr build`
def test_the_app_bundle_carries_the_apps_and_what_they_import_and_nothing_else(tmp_path):
    """What `flwr run` ships to every site is code those sites run: no operator tools (CLI, certificates,
    process control, reports), which would run nowhere but could be read or swapped."""
    built = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(REPO)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    with zipfile.ZipFile(next(tmp_path.glob("*.fab"))) as fab:
        shipped = {n for n in fab.namelist() if n.endswith(".py")}
    needed = _project_imports("server.server_app") | _project_imports("client.client_app")
    packages = {f"{m.split('.')[0]}/__init__.py" for m in needed}
    assert shipped == {f"{m.replace('.', '/')}.py" for m in needed} | packages
