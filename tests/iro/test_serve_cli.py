"""`iro serve`: a flag for every server setting, flags over `IRO_*` variables, and the README's
configuration page (docs/configuration.md) naming only flags that exist (no engine: uvicorn is replaced)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import iro.cli
from iro.settings_flags import flag_decls, flag_name
from server.settings import ServerSettings

README = Path(__file__).resolve().parents[2] / "README.md"
CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def serve_flags() -> set[str]:
    command = typer.main.get_command(iro.cli.app).commands["serve"]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def serve_options() -> dict[str, "click.Option"]:
    command = typer.main.get_command(iro.cli.app).commands["serve"]
    return {param.name: param for param in command.params}


def test_every_server_setting_has_a_flag_with_help():
    """The flags are generated from the settings (`iro.settings_flags`): none can be missing."""
    options = serve_options()
    assert set(options) == set(ServerSettings.model_fields)
    for name, option in options.items():
        assert option.help and len(option.help.split("(")[0].strip()) > 5, name
        assert f"env IRO_{name.upper()}" in option.help
        assert flag_name(name, ServerSettings.model_fields[name]) in option.opts
    assert {"--enforce-eager", "--compile", "--allow-open-admin"} <= serve_flags()
    assert "--no-allow-open-admin" not in serve_flags()
    assert "(>= 16, a multiple of 16; default 16; env IRO_BLOCK_SIZE)" in options["block_size"].help
    assert "middle layer" not in options["engine_value_layers"].help  # the hand-written help was wrong


EXPLICIT = {"host": "0.0.0.0", "engine_value_layers": "8,15", "engine_threads": "0-1", "model": "/tmp/model",
            "cors_origins": "http://a.test,http://b.test"}
"""Sample flag values where a generic one would not be valid (text fields with a format)."""


def sample(name: str, field) -> tuple[list[str], object]:
    """Command-line words setting `name` to a valid value other than its default, and that value as
    the model takes it (text for a flag the model parses)."""
    import json
    from typing import Literal, get_args, get_origin

    from iro.settings_flags import _base_type, _takes_json

    flag, default = flag_name(name, field), field.get_default(call_default_factory=True)
    base = _base_type(field.annotation)
    bounds = {attr: getattr(m, attr) for m in field.metadata for attr in ("ge", "gt", "multiple_of") if hasattr(m, attr)}
    if base is bool:
        decls = flag_decls(name, field).split("/")
        return ([decls[1]] if default and len(decls) > 1 else [decls[0]]), (not default if len(decls) > 1 else True)
    if name in EXPLICIT:
        return [flag, EXPLICIT[name]], EXPLICIT[name]
    if get_origin(base) is Literal:
        choice = next(c for c in get_args(base) if c != default)
        return [flag, choice], choice
    if _takes_json(field):
        if isinstance(default, dict):
            value = {k: v * 2 for k, v in default.items()} if default else {"sample": f"sample-{name}"}
        else:
            value = [*(default or []), "x"]
        return [flag, json.dumps(value)], value
    if base is float:
        value = default / 2 if default else 1.0
        return [flag, str(value)], value
    if base is int:  # one step down, or up where that leaves the bounds
        step = bounds.get("multiple_of", 1)
        low = bounds.get("ge", bounds.get("gt", -10**9) + 1)
        value = max(low, step) if default is None else default - step if default - step >= low else default + step
        return [flag, str(value)], value
    return [flag, f"sample-{name}"], f"sample-{name}"  # str, Path, SecretStr


def test_every_flag_value_reaches_the_settings(served):
    """One run of `iro serve` with every flag set to a value other than its default: each field ends
    up as the model builds it from that value (a new setting needs no test change, only a valid sample)."""
    fields = ServerSettings.model_fields
    args, expected = [], {}
    for name, field in fields.items():
        words, value = sample(name, field)
        args += words
        expected[name] = value
    result, settings, _ = served(*args, "--api-key", "k")  # a non-loopback host needs a key
    assert result.exit_code == 0, result.output
    direct = ServerSettings(**{**expected, "api_key": "k"})
    for name, field in fields.items():
        got = getattr(settings, name)
        assert got == getattr(direct, name), name
        if name != "api_key":
            assert got != field.get_default(call_default_factory=True), name


def test_the_environment_still_sets_what_was_read_deep_in_the_code(served):
    """`IRO_VALUE_CACHE_GIB`, `IRO_LORA_COMPILE` and `IRO_ENGINE_VALUE_LAYERS` are settings now: users'
    variables keep working, and the flags win over them."""
    env = {"IRO_VALUE_CACHE_GIB": "3", "IRO_LORA_COMPILE": "0", "IRO_ENGINE_VALUE_LAYERS": "8,15"}
    result, settings, _ = served(env=env)
    assert result.exit_code == 0, result.output
    assert (settings.value_cache_gib, settings.lora_compile, settings.engine_value_layers) == (3.0, False, "8,15")
    result, settings, _ = served("--value-cache-gib", "0.5", "--lora-compile", env=env)
    assert (settings.value_cache_gib, settings.lora_compile) == (0.5, True)


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
    monkeypatch.setattr(iro.cli, "_serve_replicas", lambda settings: seen.setdefault("settings", settings))  # Ray

    def run(*args, env=None):
        seen.clear()
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
    (["--enforce-eager", "--block-size", "20"], "--block-size"),
    (["--value-cache-gib", "0"], "--value-cache-gib"),
    (["--compile", "--host", "0.0.0.0"], "--allow-open-admin"),
    (["--block-size", "24"], "--block-size"),
    (["--dtype", "int8"], "--dtype"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--data-parallel-size", "-1"], "--data-parallel-size"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
])
def test_bad_flag_values_are_refused_naming_the_flag(served, args, message):
    result, settings, _ = served(*args)
    assert result.exit_code == 2 and message in result.output and settings is None
