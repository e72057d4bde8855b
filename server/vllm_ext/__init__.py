"""The vLLM extension layer: every change this project makes to vLLM, in one registry.

vLLM runs the `vllm.general_plugins` entry point `iro_worker_patches` (`install_worker_patches`) in
every process it starts (API, engine core, workers). Each patch is probed against the installed
vLLM before it is applied (`registry.Patch`); a patch whose probe fails is skipped with one
warning and its feature falls back instead of failing at run time:

| patch | changes (vLLM 0.32) | where | feature | fallback |
|---|---|---|---|---|
| `value_heads_v1` | V1 `GPUModelRunner` (the CPU runner subclasses it) | any | engine values (`value_heads`) | the scorer |
| `value_heads_v2` | V2 `gpu.model_runner.GPUModelRunner` (vLLM's GPU default) | any | engine values | the scorer |
| `block16` | the CPU attention backend | CPU | 16-token KV blocks (`block16`) | blocks of 32 |
| `seed_fix` | `CPUModelRunner` | CPU | seeded sampling with chunked prefill (`seed_fix`) | none (the engine may die) |
| `lora_grouped` | vLLM's CPU punica ops | CPU | policy adapters at near base cost (`lora_ops`) | vLLM's per-token ops |
| `lora_compiled` | CPU punica wrapper and platform | CPU | a compiled engine with a policy registry | uncompiled with a registry |
| `grammar_prefix` | `StructuredOutputManager` (engine core) | any | `response_format` on guided requests | such requests refused (400) |

Modules: `registry` (the `Patch` type, probing helpers, the per-process record), `wire` (the
value-head format shared by the engine client and the worker), one module per patch, and
`worker` (what the workers report back: `collective_rpc` through vLLM's worker extension).
"""

from __future__ import annotations

from server.vllm_ext import block16, grammar_prefix, lora_patches, seed_fix, value_heads
from server.vllm_ext.registry import STATUS, Patch, install_all

PATCHES: list[Patch] = [
    # value heads first: the seed fix wraps the CPU runner's (inherited, by then wrapped) _sample
    Patch("value_heads_v1", value_heads.v1_targets, value_heads.probe_v1, value_heads.apply_v1,
          "the scorer values candidates instead of engine heads (V1 runner)"),
    Patch("value_heads_v2", value_heads.v2_targets, value_heads.probe_v2, value_heads.apply_v2,
          "the scorer values candidates instead of engine heads (V2 runner)"),
    Patch("block16", block16.targets, block16.probe, block16.apply, "KV blocks of 32 tokens instead of 16",
          platform="cpu"),
    Patch("seed_fix", seed_fix.targets, seed_fix.probe, seed_fix.apply,
          "seeded requests may crash the CPU engine when batched with a chunked prefill", platform="cpu"),
    Patch("lora_grouped", lora_patches.grouped_targets, lora_patches.probe_grouped, lora_patches.apply_grouped,
          "vLLM's per-token CPU LoRA ops (policy adapters serve slower)", platform="cpu"),
    Patch("lora_compiled", lora_patches.compiled_targets, lora_patches.probe_compiled, lora_patches.apply_compiled,
          "with a policy registry the engine runs uncompiled (vLLM's CPU default; every request slower)",
          platform="cpu"),
    Patch("grammar_prefix", grammar_prefix.targets, grammar_prefix.probe, grammar_prefix.apply,
          "guided requests with response_format are refused (400)"),
]
FALLBACKS = {p.name: p.fallback for p in PATCHES}


def install_worker_patches() -> dict[str, str]:
    """vLLM general-plugin entry point: probe and install the patches this vLLM takes. Returns (and
    keeps in `STATUS`) each patch's outcome; logs one warning naming every patch skipped."""
    try:
        import torch
        import vllm
    except ImportError as exc:
        STATUS.update({p.name: f"vLLM cannot be imported: {exc}" for p in PATCHES})
        return dict(STATUS)
    return install_all(PATCHES, cpu=not torch.cuda.is_available(), version=vllm.__version__)


register = install_worker_patches

__all__ = ["FALLBACKS", "PATCHES", "STATUS", "install_worker_patches"]
