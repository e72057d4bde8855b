"""Tiny random-weight models of common decoder families, made locally from transformers configs.

The architecture matrix (tests/e2e/test_arch_matrix.py, bench/arch_matrix.py) serves each of these
through the real engine: a model family works end to end when its tiny model does, at a cost of
seconds instead of downloading a checkpoint (nothing is ever downloaded). Every model uses the
embedded default model's tokenizer and chat template (`common.model_store`), so prompts, token ids
and special tokens are the ones the rest of the suite knows.

    >>> sorted(FAMILIES)[:3]
    ['gemma2', 'gemma3', 'llama']
    >>> FAMILIES["qwen3-moe"].config_class
    'Qwen3MoeConfig'

Shapes: hidden size 64, 4 decoder layers, 2 attention heads of 32 (one key/value head, so grouped
queries are exercised): vLLM's CPU attention kernels take head sizes 32, 64, 80, ... 256 (not 16),
and 4 layers give the default engine-value layers (1, 2) two distinct residual streams.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from common.paths import staged_dir

HIDDEN = 64
LAYERS = 4
HEADS, KV_HEADS, HEAD_DIM = 2, 1, 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
"""What is copied from the embedded model's folder (those that exist)."""
MARKER = "iro-tiny-model.json"


@dataclass(frozen=True)
class Family:
    """One decoder family: the transformers config class and its family-specific arguments."""

    config_class: str
    """Name of the `transformers` config class (imported lazily)."""
    kwargs: dict = field(default_factory=dict)
    """Arguments on top of the shared tiny shape (`config_kwargs`)."""
    note: str = ""


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig"),
    "qwen2": Family("Qwen2Config", note="q/k/v biases"),
    "qwen3": Family("Qwen3Config", note="q/k norms"),
    "mistral": Family("MistralConfig", {"sliding_window": None}),
    "gemma2": Family("Gemma2Config", {"query_pre_attn_scalar": HEAD_DIM, "sliding_window": 32,
                                      "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                      "hidden_activation": "gelu_pytorch_tanh"},
                     note="alternating 32-token sliding window, logit soft-capping"),
    "gemma3": Family("Gemma3TextConfig", {"query_pre_attn_scalar": HEAD_DIM, "sliding_window": 32,
                                          "layer_types": ["sliding_attention", "sliding_attention",
                                                          "sliding_attention", "full_attention"],
                                          "hidden_activation": "gelu_pytorch_tanh"},
                     note="3 sliding-window layers (32 tokens) + 1 global, q/k norms"),
    "phi3": Family("Phi3Config", {"pad_token_id": 2}, note="fused qkv_proj and gate_up_proj"),
    "qwen3-moe": Family("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                           "moe_intermediate_size": HIDDEN, "decoder_sparse_step": 1},
                        note="mixture of experts: 4 experts, top 2"),
    "mixtral": Family("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
                      note="mixture of experts: 4 experts, top 2"),
}
"""Family name -> how to configure it. Keys are what `iro model tiny FAMILY` takes."""


def config_kwargs(family: str, tokenizer_dir: Path) -> dict:
    """The config arguments of `family`'s tiny model (shared shape + the family's own), with the
    special token ids of the tokenizer in `tokenizer_dir`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: expected one of {', '.join(sorted(FAMILIES))}")
    config = json.loads((tokenizer_dir / "config.json").read_text())
    shape = dict(vocab_size=config["vocab_size"], hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                 max_position_embeddings=2048, bos_token_id=config.get("bos_token_id"),
                 eos_token_id=config.get("eos_token_id"), pad_token_id=config.get("pad_token_id"),
                 tie_word_embeddings=True, initializer_range=0.1)
    return shape | FAMILIES[family].kwargs


def build_tiny_model(family: str, target: str | Path, *, seed: int = 0, dtype: str = "bfloat16",
                     tokenizer_dir: str | Path | None = None, force: bool = False) -> Path:
    """Write a tiny random `family` model into `target` (a Hugging Face folder: config, safetensors
    weights in `dtype`, the tokenizer and chat template of `tokenizer_dir`, default the embedded
    model); return `target`. Reuses a folder this function wrote with the same arguments unless
    `force`. The weights are a pure function of (family, seed).

    `initializer_range` 0.1 (transformers' default is 0.02) makes the next-token distribution
    peaked enough that sampling, adapters and values visibly change it."""
    import torch
    import transformers

    from common.model_store import prepare_default_model

    target = Path(target)
    source = Path(tokenizer_dir) if tokenizer_dir is not None else prepare_default_model()
    kwargs = config_kwargs(family, source)
    recipe = {"family": family, "seed": seed, "dtype": dtype, "config": kwargs,
              "transformers": transformers.__version__}
    marker = target / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text()) == recipe:
        return target
    config = getattr(transformers, FAMILIES[family].config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = kwargs["eos_token_id"]
    model.generation_config.pad_token_id = kwargs["pad_token_id"]

    with staged_dir(target, f".{target.name}-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        (tmp / MARKER).write_text(json.dumps(recipe, indent=2))
    return target


__all__ = ["FAMILIES", "Family", "build_tiny_model", "config_kwargs"]
