"""`iro model tiny FAMILY DIR`: a tiny random model folder that `iro serve --model DIR` takes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from iro.cli import app


def test_iro_model_tiny_writes_a_model_folder(tmp_path):
    out = CliRunner().invoke(app, ["model", "tiny", "qwen2", str(tmp_path / "q")])
    assert out.exit_code == 0, out.output
    assert out.output.strip().endswith(str(tmp_path / "q"))  # the path, after transformers' progress bar
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "qwen2"


def test_an_unknown_family_is_a_usage_error_naming_the_families(tmp_path):
    out = CliRunner().invoke(app, ["model", "tiny", "gpt-9", str(tmp_path / "x")])
    assert out.exit_code == 2 and "qwen3-moe" in out.output
    assert not (tmp_path / "x").exists()
