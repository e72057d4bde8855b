"""The vLLM worker patches: 16-token KV blocks on the CPU attention backend (the seed fix is
tested end to end in tests/e2e/test_openai_api.py; every integration test serves with block 16)."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("plain_logprobs", [False, True])
def test_value_heads_replace_the_logprob_slots_of_the_rows_that_ask_for_them(plain_logprobs):
    """The worker-side logic of patch_value_heads on a stand-in runner (the real engine is
    checked end to end in tests/e2e/test_guided.py). When only value rows want logprobs the
    sampler computes none; when another request wants real ones, they are kept for it."""
    from dataclasses import dataclass, field
    from types import SimpleNamespace

    import torch

    from server.engine_patches import VALUE_HEADS_ARG, patch_value_heads

    H = 4

    @dataclass
    class Meta:
        max_num_logprobs: int | None
        logprob_token_ids: dict = field(default_factory=dict)

    class Runner:
        def load_model(self):
            self.model = SimpleNamespace(compute_logits=lambda h: h.sum(-1, keepdim=True))

        def _sample(self, logits):
            n = logits.shape[0]
            self.asked = self.input_batch.sampling_metadata.max_num_logprobs
            real = None if self.asked is None else SimpleNamespace(
                logprobs=torch.full((n, self.asked + 1), -1.0),
                logprob_token_ids=torch.full((n, self.asked + 1), 77, dtype=torch.int64))
            return SimpleNamespace(sampled_token_ids=torch.zeros((n, 1), dtype=torch.int32), logprobs_tensors=real)

    patch_value_heads(Runner)
    patch_value_heads(Runner)  # idempotent
    runner = Runner()
    runner.load_model()
    heads = [[1.0, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 2.0, -1.0]]
    params = lambda extra: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))  # noqa: E731
    runner.requests = {"a": params(None), "b": params({VALUE_HEADS_ARG: heads}), "c": params({"other": 1}),
                       "d": params({VALUE_HEADS_ARG: heads[1:]})}
    meta = Meta(max_num_logprobs=2)
    num_logprobs = {"b": 1, "d": 0} | ({"a": 2} if plain_logprobs else {})
    runner.input_batch = SimpleNamespace(req_ids=["a", "b", "c", "d"], sampling_metadata=meta, num_logprobs=num_logprobs)
    hidden = torch.arange(4 * H, dtype=torch.float32).reshape(4, H)
    out = runner._sample(runner.model.compute_logits(hidden))
    assert runner.asked == (2 if plain_logprobs else None)  # no vocabulary-wide logprobs unless someone wants them
    assert runner.input_batch.sampling_metadata is meta  # restored
    lp = out.logprobs_tensors
    assert lp.logprobs[1, :2].tolist() == [hidden[1, 0] + 0.5, 2 * hidden[1, 3] - 1.0]  # w . h + b per head
    assert lp.logprobs[3, :1].tolist() == [2 * hidden[3, 3] - 1.0]
    assert lp.logprob_token_ids[1, :2].tolist() == [0, 1] and lp.logprob_token_ids[3, 0] == 0
    if plain_logprobs:  # the real logprobs of the other rows are untouched
        assert lp.logprob_token_ids[1, 2] == 77
        assert lp.logprobs[0].tolist() == [-1.0] * 3 and lp.logprobs[2].tolist() == [-1.0] * 3
