"""The vLLM worker patches: 16-token KV blocks on the CPU attention backend (the seed fix is
tested end to end in tests/e2e/test_openai_api.py; every integration test serves with block 16)."""

from __future__ import annotations

from server.engine_patches import allow_block_size_16, register


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


def test_plugin_entry_point_patches_the_cpu_backend():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa

    register()
    (size,) = CPUAttentionBackend.get_supported_kernel_block_sizes()
    assert size.base == 16
    import torch

    assert _get_attn_isa(torch.bfloat16, 16, 64) in ("vec16", "neon")  # the kernels that handle 16-token blocks
