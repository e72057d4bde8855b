"""Engine arguments on a faked CUDA platform (issue 24, items 3-5): memory utilization, parallel sizes,
dtype by compute capability; and what the CPU engine is given for the same settings.

No GPU here: `common.engine_args.on_cuda` and the `torch.cuda` queries the recipe makes are faked."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from common import dtype as dtypes
from common import engine_args
from common.engine_args import (LORA_COMPILE_KEY, VALUE_LAYERS_KEY, GiB, EngineSettings, check_parallel,
                                cpu_threads_bind, engine_kwargs, prepare_engine_process, split_cores,
                                value_memory_bytes)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with `gpus` CUDA devices of `total` bytes and compute capability `capability`."""

    def install(capability=(9, 0), gpus=8, total=80 * GiB, name="NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(engine_args, "on_cuda", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=total))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (total // 100, total))  # the engine took it all
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts: never asked
        monkeypatch.setattr(dtypes, "_this_machine", dtypes._cuda_dtype)

    return install


def kwargs_for(**settings) -> dict:
    return engine_kwargs(EngineSettings(**settings))


def test_gpu_engine_gets_memory_utilization_and_parallel_sizes(fake_cuda):
    fake_cuda()
    assert kwargs_for()["gpu_memory_utilization"] == 0.85  # ours by default, not vLLM's 0.92
    kwargs = kwargs_for(gpu_memory_utilization=0.7, tensor_parallel_size=4, pipeline_parallel_size=2)
    assert kwargs["gpu_memory_utilization"] == 0.7
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"], kwargs["data_parallel_size"]) == (4, 2, 1)
    assert kwargs["block_size"] is None and kwargs["dtype"] == "bfloat16"


@pytest.mark.parametrize("capability, expected", [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((8, 6), "bfloat16"),
                                                  ((7, 5), "float16"), ((7, 0), "float16")])
def test_gpu_dtype_follows_compute_capability_never_float32(fake_cuda, caplog, capability, expected):
    fake_cuda(capability=capability, name="Tesla T4" if capability < (8, 0) else "NVIDIA A100")
    assert kwargs_for()["dtype"] == expected
    monkey_logged = dtypes._logged.copy()
    try:
        dtypes._logged.clear()
        with caplog.at_level(logging.INFO, logger="common.dtype"):
            dtypes.log_dtype("serve", "auto")
    finally:
        dtypes._logged.clear()
        dtypes._logged.update(monkey_logged)
    assert f"serve: dtype {expected} (CUDA " in caplog.text and f"{capability[0]}.{capability[1]}" in caplog.text
    assert kwargs_for(dtype="float32")["dtype"] == "float32"  # only when asked for


def test_bf16_on_a_pre_ampere_gpu_is_refused_before_the_engine_starts(fake_cuda):
    fake_cuda(capability=(7, 5), name="Tesla T4")
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7.5\) has no native bf16.*float16"):
        kwargs_for(dtype="bfloat16")
    assert kwargs_for(dtype="float16")["dtype"] == "float16"


@pytest.mark.parametrize("sizes, gpus", [(dict(tensor_parallel_size=4, data_parallel_size=2), 4),
                                         (dict(pipeline_parallel_size=3), 2)])
def test_a_layout_needing_more_gpus_than_present_is_refused(fake_cuda, sizes, gpus):
    fake_cuda(gpus=gpus)
    ranks = sizes.get("tensor_parallel_size", 1) * sizes.get("pipeline_parallel_size", 1) * sizes.get(
        "data_parallel_size", 1)
    with pytest.raises(ValueError, match=f"needs {ranks} GPUs; this machine has {gpus}"):
        kwargs_for(**sizes)


def test_value_memory_is_planned_from_what_the_engine_leaves_before_it_starts(fake_cuda):
    from valuefn.kv_pool import default_budget_bytes
    from valuefn.loader import default_memory_budget

    fake_cuda(total=80 * GiB)
    values = value_memory_bytes(80 * GiB, 0.7)
    assert values == int(80 * GiB * 0.3) - GiB  # 23 GiB: total x (1 - utilization) less the margin
    cuda = torch.device("cuda", 0)
    cache = default_budget_bytes(cuda, gpu_memory_utilization=0.7)
    assert cache == values // 4  # the key/value cache's share, not 1/4 of free memory
    assert default_memory_budget(cuda, cache, 0.7) == values - values // 4  # the backbones' share
    assert default_budget_bytes(cuda, value_cache_gib=3, gpu_memory_utilization=0.7) == 3 * GiB
    assert value_memory_bytes(24 * GiB, 0.99) == 0  # never negative: every value is then refused


def test_the_backbone_pool_plans_the_values_memory_from_the_settings_it_is_given(fake_cuda, tiny_model_dir):
    """The server hands its settings to the pool (no environment variable read on the way)."""
    from valuefn.loader import BackbonePool

    fake_cuda(total=80 * GiB)
    values = value_memory_bytes(80 * GiB, 0.7)
    pool = BackbonePool(tiny_model_dir, torch.device("cuda", 0), gpu_memory_utilization=0.7)
    assert (pool.cache_budget.max_bytes, pool.memory_budget) == (values // 4, values - values // 4)
    pool = BackbonePool(tiny_model_dir, torch.device("cuda", 0), gpu_memory_utilization=0.7, value_cache_gib=2)
    assert (pool.cache_budget.max_bytes, pool.memory_budget) == (2 * GiB, values - 2 * GiB)


def test_settings_come_from_the_environment_and_are_checked(monkeypatch):
    monkeypatch.setenv("IRO_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("IRO_GPU_MEMORY_UTILIZATION", "0.5")
    settings = EngineSettings()
    assert (settings.tensor_parallel_size, settings.gpu_memory_utilization) == (2, 0.5)
    options = settings.engine_options()
    assert (options["tensor_parallel_size"], options["data_parallel_size"]) == (2, 1)
    for field, bad in [("tensor_parallel_size", 0), ("data_parallel_size", -1), ("gpu_memory_utilization", 0)]:
        with pytest.raises(ValueError, match=field):
            EngineSettings(**{field: bad})


def test_cpu_engine_gets_no_gpu_share_and_one_core_list_per_rank(monkeypatch):
    import os

    monkeypatch.setattr(engine_args, "on_cuda", lambda: False)
    monkeypatch.setattr(engine_args, "_cpu_cores", lambda: [0, 1])
    monkeypatch.setattr(engine_args, "cpu_block_size", lambda requested: requested)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    kwargs = kwargs_for(tensor_parallel_size=2, dtype="float32", kv_cache_gib=3)
    assert "gpu_memory_utilization" not in kwargs and kwargs["tensor_parallel_size"] == 2
    assert kwargs["kv_cache_memory_bytes"] == 3 * GiB  # vLLM's engine argument, not VLLM_CPU_KVCACHE_SPACE
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # engine_kwargs changes nothing
    assert cpu_threads_bind("all", 2) == "0|1"  # vLLM's CPU worker binds rank i to list i
    monkeypatch.setattr("vllm.plugins.load_general_plugins", lambda: None)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # restored after the test
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    prepare_engine_process(EngineSettings(tensor_parallel_size=2))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"  # the one place that writes it


def test_our_knobs_reach_the_workers_through_vllms_config_not_the_environment(monkeypatch):
    import os

    monkeypatch.setattr(engine_args, "on_cuda", lambda: False)
    monkeypatch.setattr(engine_args, "cpu_block_size", lambda requested: requested)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    before = dict(os.environ)
    kwargs = kwargs_for(engine_value_layers="8,15", lora_compile=False)
    assert kwargs["additional_config"] == {VALUE_LAYERS_KEY: "8,15", LORA_COMPILE_KEY: False}
    assert dict(os.environ) == before
    with pytest.raises(ValueError, match="value layers"):
        kwargs_for(engine_value_layers="middle")


def test_cpu_layouts_the_cpu_engine_cannot_run_are_refused(caplog):
    assert check_parallel(tensor_parallel_size=2, cuda=False, devices=2) == 2
    with pytest.raises(ValueError, match=r"needs 4 CPU cores \(one per engine rank\); this machine has 2"):
        check_parallel(tensor_parallel_size=2, pipeline_parallel_size=2, cuda=False, devices=2)
    with pytest.raises(ValueError, match="pipeline parallelism on CPU needs the compiled engine"):
        check_parallel(pipeline_parallel_size=2, cuda=False, enforce_eager=True, devices=2)
    assert check_parallel(pipeline_parallel_size=2, cuda=False, devices=2) == 2  # compiled: measured to work
    with caplog.at_level(logging.INFO, logger="common.engine_args"):
        assert check_parallel(data_parallel_size=2, cuda=True, devices=2) == 2
    assert "own prefix cache" in caplog.text


def test_core_lists_per_rank(monkeypatch):
    assert split_cores([0, 1, 2, 3], 2) == "0,1|2,3" and split_cores([4, 5, 6], 1) == "4-6"
    with pytest.raises(ValueError, match="names 1 core lists; the engine has 2 ranks"):
        cpu_threads_bind("all", 2, environ={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    assert cpu_threads_bind("all", 1, environ={"VLLM_CPU_OMP_THREADS_BIND": "0-1"}) is None  # set: vLLM reads it
    with pytest.raises(ValueError, match="give one list per rank"):
        cpu_threads_bind("0-1", 2, environ={})
    assert cpu_threads_bind("0-1|2-3", 2, environ={}) == "0-1|2-3" and cpu_threads_bind(None, 2, environ={}) is None


@pytest.mark.parametrize("config,refused", [
    ({"num_local_experts": 8}, True),  # Mixtral
    ({"num_experts": 4, "model_type": "qwen3_moe"}, True),
    ({"text_config": {"n_routed_experts": 64}}, True),  # a multimodal wrapper of a MoE language model
    ({"num_experts": 1}, False), ({"hidden_size": 64}, False),
])
def test_policy_adapters_on_a_cpu_moe_model_are_refused_before_the_engine_starts(tmp_path, config, refused):
    import json

    from common.engine_args import check_lora_on_cpu

    (tmp_path / "config.json").write_text(json.dumps(config))
    if refused:
        with pytest.raises(ValueError, match="mixture-of-experts model .* serve this model without --policies-dir"):
            check_lora_on_cpu(tmp_path)
    else:
        check_lora_on_cpu(tmp_path)


def test_the_engine_refuses_it_before_building_vllm(tmp_path, monkeypatch):
    import json

    from server.engine import VllmEngine

    (tmp_path / "config.json").write_text(json.dumps({"num_local_experts": 8}))
    monkeypatch.setattr("vllm.plugins.load_general_plugins", lambda: None)  # no patches for the whole process
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        VllmEngine.start(str(tmp_path), "moe", enforce_eager=True, lora={"enable_lora": True})


@pytest.mark.parametrize("lora_compile, mode", [(True, 2), (False, 0)])  # VLLM_COMPILE, NONE
def test_the_settings_reach_vllms_own_config(monkeypatch, vllm_patches, tiny_model_dir, lora_compile, mode):
    """What vLLM builds from the recipe (no engine started): the CPU KV cache as its
    `kv_cache_memory_bytes`, 16-token blocks (the patch), our knobs in `additional_config`, and
    `lora_compile` deciding whether a CPU engine with LoRA stays compiled (was `IRO_LORA_COMPILE`)."""
    import vllm.engine.arg_utils
    from vllm.engine.arg_utils import AsyncEngineArgs

    monkeypatch.setattr(engine_args, "on_cuda", lambda: False)
    monkeypatch.setattr(vllm.engine.arg_utils, "load_general_plugins", lambda: None)  # the fixture installed them
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    settings = EngineSettings(max_model_len=256, kv_cache_gib=1, dtype="float32", engine_value_layers="1",
                              enforce_eager=False, lora_compile=lora_compile)  # the tests' IRO_ENFORCE_EAGER aside
    config = AsyncEngineArgs(model=str(tiny_model_dir), **engine_kwargs(settings), enable_lora=True, max_lora_rank=8,
                             max_loras=1).create_engine_config()
    assert (config.cache_config.kv_cache_memory_bytes, config.cache_config.block_size) == (GiB, 16)
    assert config.additional_config == {VALUE_LAYERS_KEY: "1", LORA_COMPILE_KEY: lora_compile}
    assert int(config.compilation_config.mode) == mode
