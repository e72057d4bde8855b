"""`iro serve`: a flag for every server setting, flags over `IRO_*` variables, and the README's
configuration page (docs/configuration.md) naming only flags that exist (no engine: uvicorn is replaced)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import iro.cli
from server.settings import ServerSettings

README = Path(__file__).resolve().parents[2] / "README.md"
CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def serve_flags() -> set[str]:
    command = typer.main.get_command(iro.cli.app).commands["serve"]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def test_every_server_setting_has_a_flag():
    flags = serve_flags()
    missing = [name for name in ServerSettings.model_fields if f"--{name.replace('_', '-')}" not in flags
               and name != "enforce_eager"]
    assert missing == [] and {"--enforce-eager", "--compile"} <= flags


def test_the_readme_names_only_flags_that_exist():
    text = README.read_text() + CONFIGURATION.read_text()
    table = CONFIGURATION.read_text()
    named = set(re.findall(r"`(--[a-z][a-z-]*)", table)) | {f for s in re.findall(r"`(--[a-z-]+/--[a-z-]+)`", table)
                                                             for f in s.split("/")}
    assert named and named <= serve_flags(), sorted(named - serve_flags())
    mentioned = set(re.findall(r"`--([a-z][a-z-]*)`? flag", text)) | set(re.findall(r"over `--([a-z-]+)`", text))
    assert {f"--{m}" for m in mentioned} <= serve_flags()


@pytest.fixture
def served(monkeypatch):
    """Run `iro serve ARGS` up to uvicorn and return the settings the app was built with."""
    import server.app
    import uvicorn

    seen = {}
    monkeypatch.setattr(server.app, "build_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("run", kw))

    def run(*args, env=None):
        result = CliRunner().invoke(iro.cli.app, ["serve", *map(str, args)], env=env)
        return result, seen.get("settings"), seen.get("run")

    return run


def test_flags_reach_the_settings_and_win_over_the_environment(served):
    result, settings, run = served(
        "--port", 8123, "--max-guided-candidates", 8, "--max-n", 3, "--max-body-bytes", 4096, "--block-size", 32,
        "--kv-cache-gib", 3, "--scorer-threads", 1, "--engine-threads", "0-1", "--dtype", "float32",
        "--no-watch-values", "--log-prompts", "--cors-origins", "http://a.test,http://b.test", "--enforce-eager",
        env={"IRO_MAX_GUIDED_CANDIDATES": "99", "IRO_MAX_QUEUE": "7"})
    assert result.exit_code == 0, result.output
    assert (settings.max_guided_candidates, settings.max_n, settings.max_body_bytes) == (8, 3, 4096)
    assert (settings.block_size, settings.kv_cache_gib, settings.scorer_threads) == (32, 3, 1)
    assert (settings.engine_threads, settings.dtype, settings.enforce_eager) == ("0-1", "float32", True)
    assert not settings.watch_values and settings.log_prompts
    assert settings.cors_origins == ["http://a.test", "http://b.test"]
    assert settings.max_queue == 7  # not given as a flag: the environment's
    assert run["port"] == 8123


def test_multi_gpu_flags_reach_the_engine_settings(served):
    result, settings, _ = served("--tensor-parallel-size", 4, "--pipeline-parallel-size", 2, "--data-parallel-size", 2,
                                 "--gpu-memory-utilization", 0.7, env={"IRO_TENSOR_PARALLEL_SIZE": "8"})
    assert result.exit_code == 0, result.output
    assert (settings.tensor_parallel_size, settings.pipeline_parallel_size, settings.data_parallel_size) == (4, 2, 2)
    assert settings.engine_options()["gpu_memory_utilization"] == 0.7


@pytest.mark.parametrize("args, message", [
    (["--max-guided-candidates", "0"], "--max-guided-candidates"),
    (["--block-size", "24"], "--block-size"),
    (["--dtype", "int8"], "--dtype"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--data-parallel-size", "-1"], "--data-parallel-size"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
])
def test_bad_flag_values_are_refused_naming_the_flag(served, args, message):
    result, settings, _ = served(*args)
    assert result.exit_code == 2 and message in result.output and settings is None
