"""16-token KV blocks on the CPU attention backend (`block16`, CPU only).

The backend declares multiples of 32 only, but its kernel selection already routes block sizes
that are not multiples of 32 to its `vec16` kernels (whose C++ side checks for a multiple of 16:
block 8 fails that check), and the CPU platform only warns about them ("prefers multiples of 32").
Why we want it: vLLM's prefix cache reuses full blocks only, so every chunk request of a search
re-prefills the partial last block of its prefix, once per sampled continuation. Measured
(bench.profile_guided, 16 prompts, CBS w4 k4 l8, 48 tokens): CBS with a free scorer took 1.31x
plain n=16 sampling at block 16 against 1.60x at 32; plain sampling itself was not slower (1257
vs 1228 tok/s); greedy text was identical over 6 prompts x 150 tokens, with and without
prefix-cache hits.
"""

from __future__ import annotations

from server.vllm_ext.registry import PatchMismatch, check_method, own


def targets() -> tuple:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return (CPUAttentionBackend,)


def probe(backend: type) -> None:
    """Behaviour: the backend's kernel selection must pick its 16-token (`vec16`) kernel for 16."""
    from vllm.v1.attention.backend import MultipleOf

    check_method(backend, "get_supported_kernel_block_sizes")
    sizes = backend.get_supported_kernel_block_sizes()
    if not all(isinstance(s, MultipleOf) and s.base % 16 == 0 for s in sizes):
        raise PatchMismatch(f"{backend.__name__} declares block sizes {sizes}, not multiples of 16")
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(__import__("torch").bfloat16, 16, 64)
    except (ImportError, TypeError) as exc:
        raise PatchMismatch(f"cannot ask the CPU attention backend which kernel takes 16-token blocks: {exc}") from None
    if isa not in ("vec16", "neon"):
        raise PatchMismatch(f"the CPU attention kernel for 16-token blocks is {isa!r}, not vec16")


def apply(backend) -> None:
    """Let `backend` (vLLM's CPU attention backend) take 16-token KV blocks. Idempotent."""
    if own(backend, "_iro_block16"):
        return
    from vllm.v1.attention.backend import MultipleOf

    backend.get_supported_kernel_block_sizes = staticmethod(lambda kv_cache_spec=None: [MultipleOf(16)])
    backend._iro_block16 = True
