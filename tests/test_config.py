import tomllib
from pathlib import Path

import pytest

from common.config import RUN_DEFAULTS, class_names, run_config


def test_pyproject_run_config_mirrors_defaults():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RUN_DEFAULTS


def test_unknown_keys_and_strategies_are_rejected():
    with pytest.raises(KeyError, match="num-rounds"):
        run_config({"num-rounds": 3})
    with pytest.raises(ValueError, match="strategy"):
        run_config({"strategy": "fedsgd"})
    assert run_config({"num-server-rounds": "4"})["num-server-rounds"] == 4


def test_class_names_put_background_first():
    assert class_names({"classes": "liver, tumour"}) == ["background", "liver", "tumour"]
