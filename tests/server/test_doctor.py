"""`iro doctor`: the report's rules (which runner vLLM picks, where values are computed) and the
command on this machine."""

from __future__ import annotations

import json

import pytest

from server import doctor


@pytest.mark.parametrize("env,cuda,triton,runner", [
    (None, False, False, "V1"),  # the CPU worker
    (None, True, True, "V2"),  # vLLM's GPU default
    (None, True, False, "V1"),
    ("0", True, True, "V1"),
    ("1", True, True, "V2"),
])
def test_the_runner_vllm_will_pick(monkeypatch, env, cuda, triton, runner):
    import vllm.triton_utils

    monkeypatch.setattr(vllm.triton_utils, "HAS_TRITON", triton)
    if env is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", env)
    picked, why = doctor.model_runner(cuda)
    assert picked == runner and why


def test_value_kinds_follow_the_workers_report():
    on = doctor.value_kinds({"value_heads": "installed", "value_layers": [2, 15, 27], "value_layers_off": ""})
    assert on["engine value (default)"].startswith("engine") and "2,15,27" in on["engine value (default)"]
    off = doctor.value_kinds({"value_heads": "pipeline parallel: untested, values use the scorer"})
    assert off["engine value (default)"] == "scorer (pipeline parallel: untested, values use the scorer)"
    assert off["LoRA value"].startswith("scorer")


@pytest.mark.slow  # installs vLLM's patches and probes this machine: seconds
def test_the_report_on_this_machine_names_its_sources(vllm_patches):
    data = doctor.collect()
    assert data["platform"]["device"] in ("cpu", "cuda")
    assert data["dtype"]["dtype"] in ("bfloat16", "float32", "float16") and data["dtype"]["why"]
    assert data["patches"]["source"].startswith("this process's probe")
    assert data["patches"]["value_heads_v1"] == "installed"
    worker = {"runner": "vllm.v1.worker.cpu_model_runner.CPUModelRunner", "value_heads": "installed",
              "value_layers": [2], "patches": {"block16": "installed"}, "workers": 1}
    data = doctor.collect(worker_report=worker)
    assert data["patches"] == {"source": "the engine's workers (1)", "block16": "installed"}
    assert data["model_runner"]["runner"] == worker["runner"]
    text = doctor.format_text(data)
    assert "model_runner:" in text and "block16" in text


def test_iro_doctor_json(vllm_patches):
    from typer.testing import CliRunner

    from iro.cli import app

    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    assert set(data) == {"versions", "platform", "dtype", "model_runner", "parallel", "patches", "values", "memory"}


def test_the_smoke_check_skips_what_this_machine_cannot_run():
    from bench.gpu_smoke import configurations, table

    rows = {name: skip for name, _, _, skip in configurations(cuda=False, gpus=0)}
    assert rows["V1 eager"] is None and rows["V1 compiled (CUDA graphs on GPU)"] is None
    assert "Triton" in rows["V2 (GPU default)"] and rows["V1 compiled, TP=2"] == "needs a CUDA GPU"
    assert all(skip is None for _, _, _, skip in configurations(cuda=True, gpus=2))
    assert "| V1 eager | engine |" in table([{"configuration": "V1 eager", "engine_value": "engine"}])
