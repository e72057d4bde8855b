"""`iro frontier`: the options reach `trainer.frontier.run` parsed;
bad ones are refused before it runs (no server: `run` is replaced)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import trainer.frontier
from iro.cli import app


@pytest.fixture
def calls(monkeypatch, tmp_path):
    seen = []

    def fake_run(**kw):
        seen.append(kw)
        md = tmp_path / "eval.md"
        md.write_text("| arm | reward |\n")
        return {"md": md}

    monkeypatch.setattr(trainer.frontier, "run", fake_run)
    return seen


def test_iro_frontier_reaches_the_sweep_with_the_parsed_options(calls, tmp_path):
    out = CliRunner().invoke(app, ["frontier", "--task", "json-extract", "--value", "extract@2", "-o", str(tmp_path),
                                   "--budgets", "16,1,4", "--modes", "pf, dvts", "--n-prompts", "8", "--max-tokens",
                                   "24", "-c", "2", "--seed", "3", "--no-oracle", "--no-progress",
                                   "--server", "http://srv:9", "--api-key", "k"])
    assert out.exit_code == 0, out.output
    assert calls == [{"task": "json-extract", "out": tmp_path, "value": "extract@2", "server": "http://srv:9",
                      "api_key": "k", "n_prompts": 8, "budgets": [16, 1, 4], "modes": ["pf", "dvts"],
                      "max_tokens": 24, "concurrency": 2, "seed": 3, "oracle": False, "progress": False}]
    assert "| arm | reward |" in out.output and "eval.md" in out.output


def test_the_defaults_sweep_every_chunked_mode_from_1x_to_32x(calls, tmp_path):
    out = CliRunner().invoke(app, ["frontier", "--value", "review", "-o", str(tmp_path)])
    assert out.exit_code == 0, out.output
    (kw,) = calls
    assert kw["task"] == "review-sentiment" and kw["budgets"] == [1, 2, 4, 8, 16, 32]
    assert kw["modes"] == ["cbs", "pf", "dvts"] and kw["oracle"] and kw["n_prompts"] == 16


@pytest.mark.parametrize("args,says", [(["--modes", "cbs,beam"], "unknown modes ['beam']"),
                                       (["--budgets", "1,0"], "integers >= 1"),
                                       (["--budgets", "4x"], "comma-separated integers")])
def test_bad_options_are_refused_before_the_sweep(calls, tmp_path, args, says):
    out = CliRunner().invoke(app, ["frontier", "--value", "v", "-o", str(tmp_path), *args])
    assert out.exit_code == 2 and says in out.output and calls == []


def test_a_value_is_required(calls, tmp_path):
    out = CliRunner().invoke(app, ["frontier", "-o", str(tmp_path)])
    assert out.exit_code == 2 and "--value" in out.output and calls == []
