"""`iro reward`, `iro train`, `iro publish` through typer, on the tiny backbone and a temp registry."""

from __future__ import annotations

import doctest
import importlib
import json

import pytest
import typer
from typer.testing import CliRunner

from trainer.value_cli import register
from valuefn.registry import Registry

from .conftest import synthetic_records


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def invoke(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_iro_has_the_trainer_commands():
    from iro.cli import app as iro_app

    names = {c.name for c in iro_app.registered_commands}
    assert {"reward", "train", "publish"} <= names


def test_reward_labels_every_record(app, tmp_path):
    records = synthetic_records(n_prompts=3, samples=2)
    for r in records:
        r["reward"] = None
    src = write_jsonl(tmp_path / "rollouts.jsonl", records)
    result = invoke(app, "reward", src, "--reward", "length:4", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [r["id"] for r in records]
    assert [r["reward"] for r in out] == [min(len(r["response"].split()), 4) / 4 for r in records]
    assert "labelled 6 responses" in result.output
    result = invoke(app, "reward", src, "--task", "review-sentiment", "-o", src)  # in place
    assert result.exit_code == 0 and all(isinstance(json.loads(l)["reward"], float) for l in src.read_text().splitlines())


@pytest.mark.parametrize("args, message", [
    (["--reward", "vibes"], "unknown reward 'vibes'"),
    ([], "exactly one of --reward"),
    (["--task", "nope"], "unknown task"),
])
def test_reward_errors_are_short_and_clear(app, tmp_path, args, message):
    src = write_jsonl(tmp_path / "rollouts.jsonl", synthetic_records(n_prompts=1, samples=1))
    result = invoke(app, "reward", src, *args, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_train_publishes_then_trains_aside_and_publishes_later(app, tmp_path, tiny_backbone):
    data = write_jsonl(tmp_path / "labelled.jsonl", synthetic_records(n_prompts=10, samples=2))
    values = tmp_path / "values"
    common = ["--model", tiny_backbone, "--values-dir", values, "--preset", "smoke", "--set", "max_steps=2",
              "--set", "dtype=float32", "--set", "progress=false"]
    result = invoke(app, "train", data, "--name", "demo", *common)
    assert result.exit_code == 0, result.output
    assert "published demo v1 (chain [1])" in result.output and "warning" not in result.output
    result = invoke(app, "train", data, "--name", "demo", *common, "--no-publish", "--out", tmp_path / "ckpt")
    assert result.exit_code == 0, result.output
    assert Registry(values).versions("demo") == [1]
    assert "20 rollouts came from the base model, but V_t follows demo [1]" in result.output
    result = invoke(app, "publish", tmp_path / "ckpt", "--values-dir", values)
    assert result.exit_code == 0, result.output
    assert "published demo v2 (chain [1, 2])" in result.output
    assert Registry(values).manifest("demo", 2).training["init_from"] == 1
    again = invoke(app, "publish", tmp_path / "ckpt", "--values-dir", values)
    assert again.exit_code == 2 and "CURRENT is v2" in again.output


@pytest.mark.parametrize("args, message", [
    (["--no-publish"], "--no-publish keeps nothing"),
    (["--set", "lrr=1"], "unknown value-training option"),
    (["--set", "lr"], "KEY=VALUE"),
    (["--preset", "huge"], "unknown preset"),
    (["--name", "../evil"], "invalid value name"),
])
def test_train_errors_are_short_and_clear(app, tmp_path, tiny_backbone, args, message):
    data = write_jsonl(tmp_path / "labelled.jsonl", synthetic_records(n_prompts=2, samples=1))
    name = [] if "--name" in args else ["--name", "demo"]
    result = invoke(app, "train", data, *name, "--model", tiny_backbone, "--values-dir", tmp_path / "v", *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_train_refuses_unlabelled_rollouts(app, tmp_path, tiny_backbone):
    records = synthetic_records(n_prompts=2, samples=1)
    for r in records:
        r["reward"] = None
    data = write_jsonl(tmp_path / "rollouts.jsonl", records)
    result = invoke(app, "train", data, "--name", "demo", "--model", tiny_backbone, "--values-dir", tmp_path / "v")
    assert result.exit_code == 2 and "no labelled responses" in result.output


@pytest.mark.parametrize("module", ["trainer.rewards", "trainer.returns", "trainer.tasks.spec", "trainer.tasks.json_extract",
                                    "trainer.tasks.review_sentiment", "trainer.value_config",
                                    "trainer.value_trainer", "trainer.rollout_config", "trainer.rollout_records",
                                    "trainer.rollout_ray", "trainer.evaluate", "trainer.loop_config",
                                    "trainer.loop_report"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("flag", ["progress=false", "iterations=2", "name=x"])
def test_loop_refuses_a_set_that_repeats_one_of_its_flags(tmp_path, flag):
    from iro.cli import app as iro_app

    result = invoke(iro_app, "loop", "--task", "review-sentiment", "--run-dir", tmp_path / "run", "--set", flag)
    key = flag.split("=")[0]
    assert result.exit_code == 2 and f"--set {key}=... repeats an option of its own: use --{key}" in result.output
    assert not (tmp_path / "run").exists()
