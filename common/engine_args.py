"""One recipe for the vLLM engine of the base model, shared by the server and offline batch jobs.

`EngineSettings` holds the engine's knobs (each settable as `IRO_<FIELD>`); the server's settings
extend it, and the trainer's Ray rollouts read it on their own. `engine_kwargs` turns them into
vLLM engine arguments (and, on CPU, the environment vLLM's CPU worker reads before it starts).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.dtype import resolve_dtype

log = logging.getLogger(__name__)


VALUE_LAYERS_ENV = "IRO_ENGINE_VALUE_LAYERS"
"""The residual-stream layers the engine's worker hands to value heads (`resolve_value_layers`;
server.engine_patches): `engine_kwargs` sets it before the engine starts, the worker inherits it."""


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

    model_config = SettingsConfigDict(env_prefix="IRO_", extra="ignore")

    max_model_len: int = Field(2048, ge=64)
    kv_cache_gib: int = Field(2, ge=1)
    """vLLM KV cache size (VLLM_CPU_KVCACHE_SPACE on CPU)."""
    block_size: int = Field(16, ge=16, multiple_of=16)
    """vLLM KV block size. vLLM's prefix cache reuses full blocks only, so each chunk request of a
    search re-prefills the partial last block of its prefix: small blocks make that short
    (16 on CPU through server.engine_patches; CBS took 1.31x plain sampling at 16, 1.60x at 32).
    Where the installed vLLM does not take the patch, the engine uses 32."""
    max_num_batched_tokens: int | None = Field(None, ge=64)
    """Tokens per engine step (vLLM's default when None)."""
    enforce_eager: bool = False
    """Skip torch.compile of the engine's model: start ~2x faster, ~10% less throughput (measured on
    CPU: plain sampling 1398 vs 1271 tok/s, guided 12.9 vs 14.6 s). The tests run eager."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """The engine's dtype; "auto" is the machine's choice (`common.dtype`: bf16 only where the CPU has
    AVX512-BF16 or AMX, or the GPU supports it; float32 elsewhere), not the checkpoint's."""
    engine_threads: str | None = "all"
    """CPU cores for the engine worker ("all", a vLLM bind spec like "0-1", or None for vLLM's default)."""
    engine_value_layers: str = "auto"
    """Residual-stream layers the engine hands to engine values ("auto": `default_value_layers`,
    "none", or "8,15"); a value on other layers is scored by the scorer instead."""

    def engine_options(self) -> dict:
        """The engine's part of these settings (the keyword arguments of `engine_kwargs`)."""
        return self.model_dump(include=set(EngineSettings.model_fields))


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_cpu_threads(engine_threads: str | None) -> None:
    """Choose the cores vLLM's CPU worker binds its OpenMP threads to (before the engine starts)."""
    if engine_threads is None or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    if engine_threads == "all":
        engine_threads = f"0-{(os.cpu_count() or 1) - 1}"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = engine_threads


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
    `block16` worker patch) or, where the installed vLLM did not take the patch, the next size its
    CPU attention backend declares (32), with a warning."""
    try:
        from vllm.plugins import load_general_plugins
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # not a CPU build of vLLM: let vLLM judge the size
        return requested
    load_general_plugins()  # idempotent; the patches install here (and again in the worker)
    size = supported_block_size(requested, list(CPUAttentionBackend.get_supported_kernel_block_sizes()))
    if size != requested:
        log.warning("the CPU attention backend does not take %d-token KV blocks (the engine patch was not "
                    "installed): using %d", requested, size)
    return size


def engine_kwargs(*, max_model_len: int, kv_cache_gib: int, block_size: int, enforce_eager: bool, dtype: str,
                  engine_threads: str | None, max_num_batched_tokens: int | None = None,
                  engine_value_layers: str = "auto") -> dict[str, Any]:
    """vLLM engine arguments for the base model (and, on CPU, the environment vLLM's CPU worker
    reads before it starts): one recipe for the server's engine and offline batch jobs.

    `block_size` is passed on CPU only (a GPU engine keeps vLLM's choice), as the CPU attention
    backend accepts it once vLLM's plugins are loaded (`cpu_block_size`)."""
    resolve_value_layers(engine_value_layers, 1 << 16)  # a malformed spec fails here, not in the worker
    os.environ[VALUE_LAYERS_ENV] = engine_value_layers
    on_cpu = not on_cuda()
    dtype = resolve_dtype(dtype)  # vLLM's own "auto" would take the checkpoint's dtype
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        configure_cpu_threads(engine_threads)
        block_size = cpu_block_size(block_size)
    return dict(max_model_len=max_model_len, dtype=dtype, enforce_eager=enforce_eager, enable_prefix_caching=True,
                block_size=block_size if on_cpu else None, max_num_batched_tokens=max_num_batched_tokens)
