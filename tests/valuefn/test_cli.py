"""`iro values ls | show | rollback | prune | init` through typer, on the tiny model and a temp registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.engine_args import default_value_layers

from valuefn.cli import app
from valuefn.registry import Registry


def iro_values(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def values(tmp_path):
    return tmp_path / "values"


def test_init_publishes_versions_that_ls_and_show_describe(tiny_model_dir, values):
    for expected in (1, 2, 3):
        out = iro_values("init", "demo", "--model", tiny_model_dir, "--values-dir", values, "--layers", 1, "--lora")
        assert out.exit_code == 0, out.output
        assert out.stdout.strip() == f"published demo v{expected}"
    rows = json.loads(iro_values("ls", "--json", "--values-dir", values).stdout)
    assert rows == [{"name": "demo", "current": 3, "versions": [1, 2, 3]}]
    table = iro_values("ls", "--values-dir", values).stdout
    assert "demo" in table and "v3" in table and "1, 2, 3" in table
    manifest = json.loads(iro_values("show", "demo@2", "--values-dir", values).stdout)
    assert manifest["version"] == 2 and manifest["model"]["num_layers"] == 1
    assert json.loads(iro_values("show", "demo", "--values-dir", values).stdout)["version"] == 3  # CURRENT


def test_init_engine_value_publishes_a_head_on_the_base_model(tiny_model_dir, values):
    out = iro_values("init", "head", "--model", tiny_model_dir, "--values-dir", values)
    assert out.exit_code == 0, out.output
    model = Registry(values).manifest("head", 1).model
    total = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    # by default the layers an engine exposes by default, read from the residual stream
    layers = list(default_value_layers(total))
    assert model.engine_value and (model.value_layers, model.lora_r, model.pooling) == (layers, 0, "mean_before")
    assert model.num_layers == max(layers)  # the scorer's copy of the backbone stops there
    out = iro_values("init", "head", "--engine-value", "--value-layers", "none", "--model", tiny_model_dir,
                     "--values-dir", values)
    assert out.exit_code == 0, out.output
    model = Registry(values).manifest("head", 2).model  # the final normed hidden state, all layers
    assert model.engine_value and (model.value_layers, model.num_layers) == (None, None)
    out = iro_values("init", "head", "--engine-value", "--value-layers", "99", "--model", tiny_model_dir,
                     "--values-dir", values)
    assert out.exit_code != 0 and "--value-layers" in out.output


@pytest.mark.parametrize("args, flag", [(["--layers", "2"], "--layers"), (["--pooling", "last"], "--pooling"),
                                        (["--lora", "--value-layers", "1"], "--value-layers")])
def test_init_refuses_an_option_of_the_other_kind(tiny_model_dir, values, args, flag):
    """`--layers 2` without `--lora` used to publish an engine value on every layer, silently."""
    out = iro_values("init", "v", *args, "--model", tiny_model_dir, "--values-dir", values)
    assert out.exit_code == 2 and flag in out.output and "applies to" in out.output
    assert not (values / "v").exists()


def test_rollback_and_prune_move_current_and_keep_its_chain(tiny_model_dir, values):
    for _ in range(4):
        assert iro_values("init", "r", "--model", tiny_model_dir, "--values-dir", values, "--lora", "--layers", 1).exit_code == 0
    out = iro_values("rollback", "r", "--values-dir", values)
    assert out.exit_code == 0 and out.stdout.strip() == "r: CURRENT -> v3"
    assert Registry(values).current("r") == 3
    out = iro_values("prune", "r", "--keep", 1, "--values-dir", values)
    assert out.exit_code == 0 and out.stdout.strip() == "removed v1, v2"  # v4 is the newest, v3 is CURRENT
    assert Registry(values).versions("r") == [3, 4]


def test_the_registry_comes_from_the_environment_when_not_given(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    out = iro_values("init", "env", "--model", tiny_model_dir, "--lora", "--layers", 1, env={"IRO_HOME": str(home)})
    assert out.exit_code == 0, out.output
    assert Registry(home / "values").current("env") == 1  # $IRO_HOME/values
    other = tmp_path / "elsewhere"
    rows = iro_values("ls", "--json", env={"IRO_HOME": str(home), "IRO_VALUES_DIR": str(other)}).stdout
    assert json.loads(rows) == []  # $IRO_VALUES_DIR wins


@pytest.mark.parametrize("args, message", [
    (["rollback", "nothing"], "has no version before"),
    (["show", "nothing"], "has no published version"),
    (["show", "../x"], "invalid value name"),
    (["init", "bad", "--lora", "--pooling", "max"], "expected mean, last or mean_before"),
])
def test_refusals_are_one_line_not_a_traceback(values, args, message):
    out = CliRunner().invoke(app, [*args, "--values-dir", str(values)])
    assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output
