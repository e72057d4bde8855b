"""One recipe for the vLLM engine of the base model, shared by the server and offline batch jobs.

`EngineSettings` holds the engine's knobs (each settable as `IRO_<FIELD>`); the server's settings
extend it, and the trainer's Ray rollouts read it on their own. `engine_kwargs` turns them into
vLLM engine arguments, with no side effect, refusing before anything starts what cannot run
(`check_parallel`); `prepare_engine_process` is the one place that changes the process before an
engine starts (vLLM's plugins, the core binding vLLM's CPU worker reads from the environment);
`value_memory_bytes` plans the GPU memory the engine leaves to the value scorer.

    settings = EngineSettings()
    prepare_engine_process(settings)
    llm = LLM(model=path, **engine_kwargs(settings))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.dtype import resolve_dtype

log = logging.getLogger(__name__)


GiB = 1 << 30
GPU_MARGIN_BYTES = 1 * GiB
"""GPU memory the value budget leaves unplanned: the API process's own CUDA context (0.3-0.6 GiB) and
the scorer's activations and allocator slack."""

VALUE_LAYERS_KEY = "iro_value_layers"
"""`VllmConfig.additional_config` key of the residual-stream layers the engine's workers hand to value
heads (`EngineSettings.engine_value_layers`, read by `server.vllm_ext.value_heads`)."""
LORA_COMPILE_KEY = "iro_lora_compile"
"""`VllmConfig.additional_config` key of `EngineSettings.lora_compile` (read by
`server.vllm_ext.lora_patches`)."""


def default_value_layers(num_layers: int) -> tuple[int, ...]:
    """The residual-stream layers an engine exposes unless told otherwise: vLLM's own default for
    EAGLE-3 (`SupportsEagle3.get_eagle3_default_aux_hidden_state_layers`: 2, L/2, L-3), kept to
    1..L-1. Chosen by measurement: heads trained by the value trainer on 800 review-sentiment
    rollouts of SmolLM2-135M ranked 256 held-out ones with Spearman 0.68 on layers (2, 15, 27),
    0.66 on (8, 15, 22), 0.65 on (15, 22), 0.60-0.62 on one layer or the final state, and 0.59
    for the 4-layer LoRA value (bench/results/engine-value-probe.md).

    >>> default_value_layers(30), default_value_layers(2)
    ((2, 15, 27), (1,))
    """
    return tuple(sorted(k for k in {2, num_layers // 2, num_layers - 3} if 1 <= k < num_layers))


def resolve_value_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """`spec` ("auto" or unset: `default_value_layers`; "none": no layer; "8,15": those) ->
    layers in 1..num_layers-1, sorted. Raises ValueError on anything else.

    >>> resolve_value_layers("auto", 30), resolve_value_layers("none", 30), resolve_value_layers("20, 8", 30)
    ((2, 15, 27), (), (8, 20))
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return default_value_layers(num_layers)
    if spec in ("none", ""):
        return ()
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"value layers must be 'auto', 'none' or layer numbers like '8,15', not {spec!r}") from None
    bad = [k for k in layers if not 1 <= k < num_layers]
    if bad:
        raise ValueError(f"value layers {bad} are outside 1..{num_layers - 1}")
    return tuple(layers)


class EngineSettings(BaseSettings):
    """The base model's vLLM engine. Each field can be set as `IRO_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="IRO_", extra="ignore", use_attribute_docstrings=True)

    max_model_len: int = Field(2048, ge=64)
    """Context length of the engine (prompt + response tokens)."""
    kv_cache_gib: int = Field(2, ge=1)
    """vLLM KV cache in GiB on CPU (vLLM's `kv_cache_memory_bytes`; a `VLLM_CPU_KVCACHE_SPACE` set in
    the environment still wins, as vLLM reads it). A GPU engine sizes its cache from
    `gpu_memory_utilization`."""
    block_size: int = Field(16, ge=16, multiple_of=16)
    """vLLM KV block size. vLLM's prefix cache reuses full blocks only, so each chunk request of a
    search re-prefills the partial last block of its prefix: small blocks make that short
    (16 on CPU through the `block16` engine patch; CBS took 1.31x plain sampling at 16, 1.60x at 32).
    Where the installed vLLM does not take the patch, the engine uses 32."""
    max_num_batched_tokens: int | None = Field(None, ge=64)
    """Tokens per engine step (unset: vLLM's default)."""
    enforce_eager: bool = Field(False, json_schema_extra={"flag": "--enforce-eager/--compile"})
    """Skip torch.compile of the engine's model: start ~2x faster, ~10% less throughput (measured on
    CPU: plain sampling 1398 vs 1271 tok/s, guided 12.9 vs 14.6 s). The tests run eager."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """The engine's dtype; "auto" is the machine's choice (`common.dtype`: bf16 only where the CPU has
    AVX512-BF16 or AMX, or the GPU supports it; float32 elsewhere), not the checkpoint's."""
    engine_threads: str | None = "all"
    """CPU cores of the engine: "all", or a vLLM bind spec like "0-1" (one list per engine rank,
    joined by "|")."""
    engine_value_layers: str = "auto"
    """Residual-stream layers the engine hands to engine values: "auto" (layers 2, L/2 and L-3 of an
    L-layer model, vLLM's EAGLE-3 default), "none", or a list like "8,15"; a value on other layers is
    scored by the scorer instead."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """The engine's share of each GPU's memory (weights, activations, KV cache; vLLM's own default is
    0.92). What it leaves, less a 1 GiB margin, is the value scorer's: its backbones and their KV cache
    (`value_memory_bytes`), planned before the engine starts; a value that does not fit is refused with
    the reason. GPU only (vLLM's CPU engine takes `kv_cache_gib` instead)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Devices each layer is split across (vLLM tensor parallelism: attention heads, KV heads and the
    vocabulary must divide by it). Engine values keep working: hidden states are whole on every rank."""
    pipeline_parallel_size: int = Field(1, ge=1)
    """Stages the layers are split into, one device group each (vLLM pipeline parallelism). On CPU it
    needs the compiled engine (vLLM 0.32's eager CPU worker dies on the first request)."""
    data_parallel_size: int = Field(1, ge=1)
    """Engine replicas behind this one server, each with its own devices (vLLM data parallelism in one
    AsyncLLM: a coordinator balances requests across them). A guided search's chunks may land on
    different replicas, each with its own prefix cache."""
    lora_compile: bool = True
    """CPU with a policy registry: keep the engine compiled with LoRA on (the `lora_compiled` patch;
    ~1.05x the base model's time per request instead of vLLM's uncompiled 1.3-1.4x). False: vLLM's
    own default, uncompiled whenever LoRA is on."""
    value_cache_gib: float | None = Field(None, gt=0)
    """Key/value pool of the value scorer in GiB, shared by every loaded value (the least recently
    used give way). None: on a GPU a quarter of what the engine leaves to values (total x (1 -
    gpu_memory_utilization) less 1 GiB), the rest holding value backbones; 1 GiB on the CPU."""

    def engine_options(self) -> dict:
        """The engine's part of these settings (`EngineSettings(**options)` rebuilds them)."""
        return self.model_dump(include=set(EngineSettings.model_fields))


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def split_cores(cores: list[int], ranks: int) -> str:
    """A vLLM CPU bind spec giving each of `ranks` engine ranks its own cores (groups joined by "|").

    >>> split_cores([0, 1], 1), split_cores([0, 1], 2), split_cores([0, 1, 2, 3, 4], 2)
    ('0-1', '0|1', '0,1,2|3,4')
    """
    if ranks > len(cores):
        raise ValueError(f"{ranks} engine ranks need a core each; this process may use {len(cores)}")
    if ranks == 1 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    per, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        size = per + (rank < extra)
        groups.append(",".join(map(str, cores[start:start + size])))
        start += size
    return "|".join(groups)


def cpu_threads_bind(engine_threads: str | None, ranks: int = 1, environ: dict | None = None) -> str | None:
    """The cores vLLM's CPU worker binds its OpenMP threads to (`VLLM_CPU_OMP_THREADS_BIND`): with
    several engine ranks (tensor x pipeline x data parallel), one core list per rank, joined by "|".
    None: leave vLLM's choice (`engine_threads` None) or the variable already set in `environ`."""
    environ = os.environ if environ is None else environ
    if engine_threads is None or "VLLM_CPU_OMP_THREADS_BIND" in environ:
        spec = environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if spec not in (None, "auto", "nobind") and len(spec.split("|")) != ranks:
            raise ValueError(f"VLLM_CPU_OMP_THREADS_BIND={spec!r} names {len(spec.split('|'))} core lists; "
                             f"the engine has {ranks} ranks (one list per rank, joined by '|')")
        return None
    if engine_threads == "all":
        return split_cores(_cpu_cores(), ranks)
    if len(engine_threads.split("|")) != ranks:
        raise ValueError(f"engine_threads {engine_threads!r} names {len(engine_threads.split('|'))} core lists; "
                         f"the engine has {ranks} ranks (tensor x pipeline x data parallel): give one list per "
                         "rank joined by '|', like 0-3|4-7, or 'all'")
    return engine_threads


def check_parallel(*, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                   cuda: bool, enforce_eager: bool = False, devices: int | None = None) -> int:
    """Refuse, before the engine starts, a parallel layout this machine cannot run; return the number
    of engine ranks (tensor x pipeline x data parallel). `devices`: GPUs (on CUDA) or usable cores.

    >>> check_parallel(tensor_parallel_size=2, data_parallel_size=2, cuda=True, devices=4)
    4
    """
    sizes = {"tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
             "data_parallel_size": data_parallel_size}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1, not {size!r}")
    ranks = tensor_parallel_size * pipeline_parallel_size * data_parallel_size
    layout = " x ".join(f"{n.split('_')[0]} {s}" for n, s in sizes.items() if s > 1) or "one rank"
    if devices is None:
        if cuda:
            import torch

            devices = torch.cuda.device_count()
        else:
            devices = len(_cpu_cores())
    if ranks > devices:
        what = "GPUs" if cuda else "CPU cores (one per engine rank)"
        raise ValueError(f"the engine's parallel layout ({layout}) needs {ranks} {what}; this machine has {devices}")
    if not cuda and pipeline_parallel_size > 1 and enforce_eager:
        raise ValueError("pipeline parallelism on CPU needs the compiled engine (--compile): vLLM 0.32's CPU "
                         "worker skips its warm-up when eager, and the last stage dies on the first request")
    if data_parallel_size > 1:
        log.info("data parallel %d: %d engine replicas, each with its own prefix cache; a guided search sends "
                 "all its chunks to one of them (server.engine.EngineRequest.affinity)",
                 data_parallel_size, data_parallel_size)
    return ranks


def value_memory_bytes(total_bytes: int, gpu_memory_utilization: float, margin: int = GPU_MARGIN_BYTES) -> int:
    """GPU bytes the API process may use for values (the scorer's backbones and their KV cache): what
    the engine leaves, total x (1 - gpu_memory_utilization), less `margin`; never below 0. It depends
    on the device's total, not its free memory, so it is the same before and after the engine starts.

    >>> value_memory_bytes(80 * GiB, 0.85) / GiB
    11.0
    """
    return max(0, int(total_bytes * (1 - gpu_memory_utilization)) - margin)


def device_value_memory(gpu_memory_utilization: float, device: Any = None) -> int:
    """`value_memory_bytes` of a CUDA device (default: the current one) at the engine's share
    `gpu_memory_utilization`. Reads the device's total memory without creating a CUDA context."""
    import torch

    total = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device()).total_memory
    return value_memory_bytes(total, gpu_memory_utilization)


DEFAULT_GPU_MEMORY_UTILIZATION: float = EngineSettings.model_fields["gpu_memory_utilization"].default


MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
"""Where transformers configs of mixture-of-experts families count their experts (Qwen-MoE, Mixtral,
DeepSeek)."""


def check_lora_on_cpu(model_path: str | Path) -> None:
    """Refuse policy adapters (LoRA) for a mixture-of-experts model on the CPU engine, before it starts:
    with LoRA on, vLLM 0.32 runs every fused-MoE layer with its Triton kernel whatever the platform,
    and the CPU engine dies at the first request (measured with tiny Qwen3-MoE and Mixtral models).
    """
    import json

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # vLLM reports an unreadable model itself
    config = {**config, **(config.get("text_config") or {})}
    experts = next((config[k] for k in MOE_KEYS if isinstance(config.get(k), int) and config[k] > 1), None)
    if experts is not None:
        raise ValueError(f"policy adapters (--policies-dir) cannot be served on the CPU engine for a mixture-of-experts "
                         f"model ({experts} experts): with LoRA on, vLLM 0.32 runs its fused-MoE layers with a Triton "
                         "kernel the CPU has not; serve this model without --policies-dir, or on a GPU")


def supported_block_size(requested: int, sizes: list) -> int:
    """`requested` if one of a backend's declared sizes (ints, or vLLM `MultipleOf`s) allows it, else
    the smallest size they allow at or above it.

    >>> from vllm.v1.attention.backend import MultipleOf
    >>> supported_block_size(16, [MultipleOf(16)]), supported_block_size(16, [MultipleOf(32)])
    (16, 32)
    """
    bases = [getattr(s, "base", None) for s in sizes]
    if any(b is not None and requested % b == 0 for b in bases) or requested in sizes:
        return requested
    candidates = [-(-requested // b) * b for b in bases if b] + [s for s in sizes if isinstance(s, int) and s >= requested]
    return min(candidates) if candidates else requested


def cpu_block_size(requested: int) -> int:
    """The KV block size the CPU engine will take: `requested` (16 by default, which needs the
    `block16` worker patch, installed in this process by `prepare_engine_process`) or, where the
    installed vLLM did not take the patch, the next size its CPU attention backend declares (32),
    with a warning."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # not a CPU build of vLLM: let vLLM judge the size
        return requested
    size = supported_block_size(requested, list(CPUAttentionBackend.get_supported_kernel_block_sizes()))
    if size != requested:
        log.warning("the CPU attention backend does not take %d-token KV blocks (the engine patch was not "
                    "installed): using %d", requested, size)
    return size


def check_gpu_dtype(dtype: str) -> None:
    """Refuse bf16 on a GPU that does not compute it natively (vLLM would refuse it at start, later)."""
    import torch

    from common.dtype import CUDA_BF16_CAPABILITY, cuda_dtype

    capability = tuple(torch.cuda.get_device_capability())
    if dtype == "bfloat16" and capability < CUDA_BF16_CAPABILITY:
        raise ValueError(f"dtype bfloat16: {cuda_dtype(torch.cuda.get_device_name(), capability).reason}; "
                         "use --dtype auto (float16 there) or float16")


def prepare_engine_process(settings: EngineSettings) -> None:
    """Everything starting an engine changes in this process, in one place (`engine_kwargs` changes
    nothing): vLLM's general plugins loaded (our patches; the CPU attention backend then takes
    16-token blocks, which `engine_kwargs` asks it about), and on CPU the cores vLLM's CPU worker
    binds to, which it reads from the environment only (`VLLM_CPU_OMP_THREADS_BIND`)."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # idempotent; vLLM loads them again in each process it starts
    if not on_cuda():
        ranks = settings.tensor_parallel_size * settings.pipeline_parallel_size * settings.data_parallel_size
        bind = cpu_threads_bind(settings.engine_threads, ranks)
        if bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind


def engine_kwargs(settings: EngineSettings) -> dict[str, Any]:
    """vLLM engine arguments for the base model: one recipe for the server's engine and offline batch
    jobs. No side effects (`prepare_engine_process` has them); run it after that.

    `block_size` and `kv_cache_memory_bytes` are passed on CPU only (a GPU engine keeps vLLM's
    block size and sizes its cache from `gpu_memory_utilization`, passed on GPU only). Our knobs
    reach the engine's workers through vLLM's `additional_config` (`VALUE_LAYERS_KEY`,
    `LORA_COMPILE_KEY`). A parallel layout the machine cannot run raises ValueError here
    (`check_parallel`), as do malformed value layers."""
    s = settings
    resolve_value_layers(s.engine_value_layers, 1 << 16)  # a malformed spec fails here, not in the worker
    on_cpu = not on_cuda()
    ranks = check_parallel(tensor_parallel_size=s.tensor_parallel_size, pipeline_parallel_size=s.pipeline_parallel_size,
                           data_parallel_size=s.data_parallel_size, cuda=not on_cpu, enforce_eager=s.enforce_eager)
    dtype = resolve_dtype(s.dtype)  # vLLM's own "auto" would take the checkpoint's dtype
    if on_cpu:
        cpu_threads_bind(s.engine_threads, ranks)  # refused here when it cannot serve `ranks`
    else:
        check_gpu_dtype(dtype)
        log.info("GPU memory: the engine takes %.0f%% of each of its %d GPUs; the value scorer plans with %.1f GiB "
                 "(the rest, less a %.0f GiB margin)", 100 * s.gpu_memory_utilization, ranks,
                 device_value_memory(s.gpu_memory_utilization) / GiB, GPU_MARGIN_BYTES / GiB)
    kwargs = dict(max_model_len=s.max_model_len, dtype=dtype, enforce_eager=s.enforce_eager, enable_prefix_caching=True,
                  block_size=cpu_block_size(s.block_size) if on_cpu else None,
                  max_num_batched_tokens=s.max_num_batched_tokens, tensor_parallel_size=s.tensor_parallel_size,
                  pipeline_parallel_size=s.pipeline_parallel_size, data_parallel_size=s.data_parallel_size,
                  additional_config={VALUE_LAYERS_KEY: s.engine_value_layers, LORA_COMPILE_KEY: s.lora_compile})
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = s.kv_cache_gib * GiB
    else:
        kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
    return kwargs
