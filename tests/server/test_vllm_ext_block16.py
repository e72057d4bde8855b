"""16-token KV blocks on the CPU attention backend (`server.vllm_ext.block16`) and the engine
recipe's fallback to 32 when the patch is missing."""

from __future__ import annotations

import logging

from server.vllm_ext.block16 import apply as allow_block_size_16


def test_block16_patch_widens_the_declared_sizes_and_is_idempotent():
    from vllm.v1.attention.backend import MultipleOf

    class Backend:
        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return [MultipleOf(32)]

    allow_block_size_16(Backend)
    first = Backend.get_supported_kernel_block_sizes
    allow_block_size_16(Backend)
    assert Backend.get_supported_kernel_block_sizes is first
    (size,) = Backend.get_supported_kernel_block_sizes()
    assert isinstance(size, MultipleOf) and size.base == 16


def test_the_cpu_engine_falls_back_to_32_token_blocks_without_the_patch(monkeypatch, caplog):
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from common.engine_args import cpu_block_size, supported_block_size

    monkeypatch.setattr(CPUAttentionBackend, "get_supported_kernel_block_sizes",
                        staticmethod(lambda kv_cache_spec=None: [MultipleOf(32)]))
    with caplog.at_level(logging.WARNING, logger="common.engine_args"):
        assert cpu_block_size(16) == 32
    assert "using 32" in caplog.text
    assert cpu_block_size(64) == 64
    assert supported_block_size(16, [MultipleOf(16)]) == 16 and supported_block_size(48, [MultipleOf(32)]) == 64
    assert supported_block_size(16, [128]) == 128


def test_the_engine_recipe_asks_vllm_for_the_fallback_block_size(monkeypatch, vllm_patches):
    """What the engine is built with when the 16-token patch is missing (server and Ray jobs alike)."""
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from common.engine_args import EngineSettings, engine_kwargs

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    settings = EngineSettings()
    assert vllm_patches["block16"] == "installed" and engine_kwargs(settings)["block_size"] == 16
    monkeypatch.setattr(CPUAttentionBackend, "get_supported_kernel_block_sizes",
                        staticmethod(lambda kv_cache_spec=None: [MultipleOf(32)]))
    assert engine_kwargs(settings)["block_size"] == 32
