"""Grouped LoRA ops for vLLM's CPU punica wrapper (the `lora_grouped` worker patch).

vLLM's CPU LoRA path (`vllm.lora.ops.torch_ops`, used by `PunicaWrapperCPU`) computes every token's
LoRA product as a batched matrix-vector product over a per-token copy of its adapter's weights:
`lora_weights[token_indices]` gathers a (tokens, out, in) tensor in every LoRA layer, for every
projection, at every step, and `einsum("bi,boi->bo")` multiplies row by row. Batches on a server
hold one or a few adapters, so the same products are a few dense matrix products: group the
tokens by adapter and multiply each group once. These functions keep the torch ops' signatures
and semantics, with one correction: a token with index -1 ("no LoRA", a base-model request) gets no
LoRA contribution. The torch ops index the weights with -1, which is the last adapter slot, zero
only while fewer than `max_loras` adapters are loaded.

Measured (`iro bench --adapter`, bench/results/): see `BENCHMARKS.md`, "Serving a policy adapter".
"""

from __future__ import annotations

import weakref

import torch


def lora_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(adapter slot, token rows) per adapter in `indices`; rows None means every token.

    >>> lora_groups(torch.tensor([1, 1, 1]))
    [(1, None)]
    >>> [(slot, rows.tolist()) for slot, rows in lora_groups(torch.tensor([0, -1, 0]))]
    [(-1, [1]), (0, [0, 2])]
    """
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [(first, None)]
    return [(int(slot), (indices == slot).nonzero().squeeze(1)) for slot in torch.unique(indices).tolist()]


def _remember(cache: dict, key, owner: torch.Tensor, value):
    """cache[key] = value, dropped when `owner` is garbage-collected: the caches are keyed by the
    id of vLLM's weight stacks, and a freed tensor's id may be given to a new one."""
    if key not in cache:
        weakref.finalize(owner, cache.pop, key, None)
    cache[key] = value
    return value


_ZERO_SLOTS: dict[int, tuple[int, dict[int, bool]]] = {}
"""id(stacked weights) -> (their torch version counter, slot -> all zero): vLLM wraps every linear
layer of the model, so an adapter on q/k/v/o leaves the MLP layers' slots zero; those are skipped.
The version counter moves whenever vLLM writes a slot (loading or removing an adapter)."""


def _weights(stacked: torch.Tensor, slot: int) -> torch.Tensor | None:
    """Slot `slot` of stacked LoRA weights as (out, in), or None when it is all zero."""
    version, zero = _ZERO_SLOTS.get(id(stacked), (None, None))
    if version != stacked._version:
        zero = _remember(_ZERO_SLOTS, id(stacked), stacked, (stacked._version, {}))[1]
    if slot not in zero:
        zero[slot] = not bool(stacked[slot].any())
    if zero[slot]:
        return None
    w = stacked[slot]
    return w.squeeze(0) if w.dim() == 3 else w


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _put(out: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor, *, add: bool, dim: int = 0) -> None:
    """out (+)= value (broadcast over out when value has one row, as the torch ops do), or only out's
    `rows` along `dim`."""
    if rows is None:
        out.add_(value) if add else out.copy_(value)
    elif add:
        out.index_add_(dim, rows, value.to(out.dtype))
    else:
        out.index_copy_(dim, rows, value.to(out.dtype))


def _zero(out: torch.Tensor, rows: torch.Tensor | None) -> None:
    if rows is None:
        out.fill_(0)
    else:
        out.index_fill_(0, rows, 0)


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    """output[:, :r] = scaling * inputs @ A[slot].T per token (0 for tokens without LoRA). The
    product runs in the weights' dtype (bf16 on a bf16 engine: the native kernels) and lands in the
    output's (the punica buffers are float32)."""
    _shrink(inputs, lora_a_weights, output_tensor, lora_groups(lora_indices_tensor[: inputs.shape[0]]), scaling)


def _shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor, groups, scaling: float):
    r = lora_a_weights.shape[-2]
    out = output_tensor[:, :r]
    for slot, rows in groups:
        w = _weights(lora_a_weights, slot) if slot >= 0 else None
        if w is None:
            _zero(out, rows)
            continue
        value = _rows(inputs, rows).to(w.dtype) @ w.T
        if scaling != 1.0:
            value = value * scaling
        _put(out, rows, value, add=False)


def _expand_into(out: torch.Tensor, inputs: torch.Tensor, lora_b_weights: torch.Tensor,
                 lora_indices_tensor: torch.Tensor, add_inputs: bool) -> None:
    _expand_groups(out, inputs, lora_b_weights, lora_groups(lora_indices_tensor[: inputs.shape[0]]), add_inputs)


def _expand_groups(out: torch.Tensor, inputs: torch.Tensor, lora_b_weights: torch.Tensor, groups,
                   add_inputs: bool) -> None:
    width = out.shape[1]
    for slot, rows in groups:
        w = _weights(lora_b_weights, slot) if slot >= 0 else None
        if w is None:
            if not add_inputs:
                _zero(out, rows)
            continue
        _put(out, rows, _rows(inputs, rows).to(w.dtype) @ w[:width].T, add=add_inputs)


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    """output[:, :o] (+)= inputs @ B[slot].T per token (o: the narrower of the two widths)."""
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _expand_into(output_tensor[:, :common], inputs, lora_b_weights, lora_indices_tensor, add_inputs)


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    """output[:, offset:offset + size] (+)= inputs @ B[slot].T per token."""
    _expand_into(output_tensor[:, slice_offset: slice_offset + slice_size], inputs, lora_b_weights,
                 lora_indices_tensor, add_inputs)


def _tokens(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _tokens(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _tokens(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _tokens(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
"""The torch ops `vllm.lora.punica_wrapper.punica_cpu` imports by name, all replaced."""


# --- the punica wrapper as opaque ops (the `lora_compiled` patch) --------------------------------
#
# vLLM's CPU platform turns torch.compile off whenever LoRA is enabled (so a server with a policy
# registry serves even base requests uncompiled): the CPU engine traces its model once
# (DYNAMO_TRACE_ONCE), and the punica wrapper decides in Python, from per-step state (prefill or
# decode, which adapter each token uses), what to compute; a trace would freeze the first step's
# decisions. Here every wrapper method the model's forward calls is one custom op: the trace keeps
# an opaque call, and the op reads the wrapper's state of the step being run (`_ACTIVE`, set by
# `update_metadata`, which the runner calls before every forward).

_ACTIVE: list = [None]
"""The worker's punica wrapper, as of its last `update_metadata` (one per worker process)."""


def _step_groups(n: int) -> list[tuple[int, torch.Tensor | None]]:
    """`lora_groups` of the step's tokens, for an op over `n` rows (computed once per step)."""
    wrapper = _ACTIVE[0]
    indices = wrapper.token_lora_indices
    if indices.shape[0] != n:  # not the step's token count: group these rows afresh
        pad = torch.full((max(0, n - indices.shape[0]),), -1, dtype=indices.dtype)
        return lora_groups(torch.cat([indices[:n], pad]))
    groups = wrapper.__dict__.get("_iro_groups")
    if groups is None:
        groups = wrapper._iro_groups = lora_groups(indices)
    return groups


class Gemm:
    """x @ weight.T for a fixed (N, K) weight: vLLM's prepacked oneDNN GEMM (what its CPU linear
    layers run) where this vLLM build has it, else torch's matmul. For the small LoRA products the
    prepacked kernel is ~2x faster (T=256: 16 vs 29 us for 576 -> 48, 29 vs 55 us for 48 -> 960)."""

    def __init__(self, weight: torch.Tensor):
        self.handler, self.weight_t = None, None
        try:
            from vllm import _custom_ops as ops

            if ops._supports_onednn and weight.dtype in (torch.bfloat16, torch.float32):
                self.handler = ops.create_onednn_mm(weight.t(), 32)
        except Exception:  # noqa: BLE001 - no oneDNN in this build: torch's matmul
            self.handler = None
        if self.handler is None:
            self.weight_t = weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.handler is None:
            return x.to(self.weight_t.dtype) @ self.weight_t
        from vllm import _custom_ops as ops

        return ops.onednn_mm(self.handler, x.contiguous(), None)


_FUSED: dict[tuple[int, str], tuple[tuple[int, ...], dict[int, Gemm | None]]] = {}
"""(id(a layer's first stack), "a" | "b") -> (the stacks' version counters, slot -> product or None)."""


def _fused(stacks: list[torch.Tensor], slot: int, kind: str) -> Gemm | None:
    """Slot `slot` of a layer's LoRA slices as one product: "a", x -> every slice's x @ A_i^T side by
    side (in -> slices x r); "b", the block-diagonal B (slices x r -> sum of out_i). None when the
    slot is all zero (an adapter that does not touch this layer). Built once and cached until vLLM
    writes a slot (the version counters move)."""
    versions = tuple(t._version for t in stacks)
    cached = _FUSED.get((id(stacks[0]), kind))
    if cached is None or cached[0] != versions:
        cached = _remember(_FUSED, (id(stacks[0]), kind), stacks[0], (versions, {}))
    if slot not in cached[1]:
        mats = [t[slot].reshape(t.shape[-2], t.shape[-1]) for t in stacks]  # A_i (r, in) / B_i (out_i, r)
        live = any(bool(m.any()) for m in mats)
        cached[1][slot] = Gemm(torch.cat(mats) if kind == "a" else torch.block_diag(*mats)) if live else None
    return cached[1][slot]


@torch.library.custom_op("iro::lora_linear", mutates_args=("y",), device_types="cpu")
def lora_linear(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], scale: float,
                slices: list[int]) -> None:
    """y[:, slice i] += scale * x @ A_i[slot].T @ B_i[slot].T for each token's adapter slot: two
    matrix products per adapter (`_fused`), in the weights' dtype."""
    if [w.shape[-2] for w in b] != list(slices):  # slices narrower than their B: the two-op path
        buffer = torch.zeros(len(a), x.shape[0], a[0].shape[-2], dtype=torch.float32)
        lora_shrink(buffer, x, a, scale)
        lora_expand(y, list(buffer), b, slices, 0, True)
        return
    out = y[:, :sum(slices)]
    for slot, rows in _step_groups(x.shape[0]):
        shrink = _fused(a, slot, "a") if slot >= 0 else None
        expand = _fused(b, slot, "b") if shrink is not None else None
        if expand is None:
            continue
        h = shrink(_rows(x, rows))
        if scale != 1.0:
            h.mul_(scale)
        _put(out, rows, expand(h), add=True)


@torch.library.custom_op("iro::lora_shrink", mutates_args=("y",), device_types="cpu")
def lora_shrink(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], scale: float) -> None:
    """y[i] = scale * x @ A_i[slot].T per token (y: (slices, tokens, r)), one product per adapter."""
    n, rank = len(a), y.shape[-1]
    for slot, rows in _step_groups(x.shape[0]):
        shrink = _fused(a, slot, "a") if slot >= 0 else None
        if shrink is None:
            value = torch.zeros_like(y if rows is None else y[:, rows])
        else:
            value = shrink(_rows(x, rows)).view(-1, n, rank).transpose(0, 1)
            if scale != 1.0:
                value = value * scale
        _put(y, rows, value, add=False, dim=1)


@torch.library.custom_op("iro::lora_expand", mutates_args=("y",), device_types="cpu")
def lora_expand(y: torch.Tensor, x: list[torch.Tensor], b: list[torch.Tensor], slices: list[int], offset: int,
                add_inputs: bool) -> None:
    """y[:, slice i] (+)= x[i] @ B_i[slot].T per token, the slices side by side from `offset`, one
    product per adapter."""
    if [w.shape[-2] for w in b] != list(slices):  # slices narrower than their B: one product per slice
        groups = _step_groups(x[0].shape[0])
        for xi, w, width in zip(x, b, slices):
            _expand_groups(y[:, offset: offset + width], xi, w, groups, add_inputs)
            offset += width
        return
    out = y[:, offset: offset + sum(slices)]
    h = torch.cat(x, dim=1) if len(x) > 1 else x[0]
    for slot, rows in _step_groups(h.shape[0]):
        expand = _fused(b, slot, "b") if slot >= 0 else None
        if expand is None:
            if not add_inputs:
                _zero(out, rows)
            continue
        _put(out, rows, expand(_rows(h, rows).to(b[0].dtype)), add=add_inputs)


@torch.library.custom_op("iro::lora_embedding", mutates_args=("y",), device_types="cpu")
def lora_embedding(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor, add_inputs: bool) -> None:
    """y (+)= x @ B[slot].T per token (the embedding's LoRA)."""
    width = min(b.shape[-2], y.shape[1])
    _expand_groups(y[:, :width], x, b, _step_groups(x.shape[0]), add_inputs)


for _op in (lora_linear, lora_shrink, lora_expand, lora_embedding):
    _op.register_fake(lambda *args, **kwargs: None)


class CompiledPunica:
    """The methods of vLLM's `PunicaWrapperCPU` that the model's forward calls, as the ops above
    (`patch_compiled` copies them onto the class); same signatures and semantics."""

    def update_metadata(self, *args, **kwargs):
        type(self)._iro_update_metadata(self, *args, **kwargs)
        self._iro_groups = None
        _ACTIVE[0] = self

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        torch.ops.iro.lora_linear(y, x, list(lora_a_stacked), list(lora_b_stacked), float(scale), list(output_slices))

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        x = x.view(-1, x.shape[-1])
        if isinstance(y, torch.Tensor):
            torch.ops.iro.lora_shrink(y, x, list(lora_a_stacked), float(scale))
        else:
            for yi, a in zip(y, lora_a_stacked):
                torch.ops.iro.lora_shrink(yi.unsqueeze(0), x, [a], float(scale))

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        torch.ops.iro.lora_expand(y if y.dim() == 2 else y.view(-1, y.shape[-1]), list(x), list(lora_b_stacked),
                                  list(output_slices), int(offset_start), bool(add_inputs))

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        torch.ops.iro.lora_embedding(y, x, lora_b_stacked, bool(add_inputs))


COMPILED_METHODS = ("add_lora_linear", "add_shrink", "add_expand", "add_lora_embedding")
"""The wrapper methods `CompiledPunica` replaces (besides `update_metadata`, which it wraps)."""


def patch_compiled(wrapper_cls: type) -> None:
    """Make `wrapper_cls` (vLLM's PunicaWrapperCPU) run its model-side methods as custom ops. Idempotent."""
    if "_iro_update_metadata" in wrapper_cls.__dict__:
        return
    wrapper_cls._iro_update_metadata = wrapper_cls.update_metadata
    wrapper_cls.update_metadata = CompiledPunica.update_metadata
    for name in COMPILED_METHODS:
        setattr(wrapper_cls, name, getattr(CompiledPunica, name))
