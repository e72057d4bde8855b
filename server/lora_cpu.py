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


_ZERO_SLOTS: dict[int, tuple[int, dict[int, bool]]] = {}
"""id(stacked weights) -> (their torch version counter, slot -> all zero): vLLM wraps every linear
layer of the model, so an adapter on q/k/v/o leaves the MLP layers' slots zero; those are skipped.
The version counter moves whenever vLLM writes a slot (loading or removing an adapter)."""


def _weights(stacked: torch.Tensor, slot: int) -> torch.Tensor | None:
    """Slot `slot` of stacked LoRA weights as (out, in), or None when it is all zero."""
    version, zero = _ZERO_SLOTS.get(id(stacked), (None, None))
    if version != stacked._version:
        zero = {}
        _ZERO_SLOTS[id(stacked)] = (stacked._version, zero)
    if slot not in zero:
        zero[slot] = not bool(stacked[slot].any())
    if zero[slot]:
        return None
    w = stacked[slot]
    return w.squeeze(0) if w.dim() == 3 else w


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


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
    r = lora_a_weights.shape[-2]
    out = output_tensor[:, :r]
    for slot, rows in lora_groups(lora_indices_tensor[: inputs.shape[0]]):
        w = _weights(lora_a_weights, slot) if slot >= 0 else None
        if w is None:
            _zero(out, rows)
            continue
        value = _rows(inputs, rows).to(w.dtype) @ w.T
        if scaling != 1.0:
            value = value * scaling
        if rows is None:
            out.copy_(value)
        else:
            out.index_copy_(0, rows, value.to(out.dtype))


def _expand_into(out: torch.Tensor, inputs: torch.Tensor, lora_b_weights: torch.Tensor,
                 lora_indices_tensor: torch.Tensor, add_inputs: bool) -> None:
    width = out.shape[1]
    for slot, rows in lora_groups(lora_indices_tensor[: inputs.shape[0]]):
        w = _weights(lora_b_weights, slot) if slot >= 0 else None
        if w is None:
            if not add_inputs:
                _zero(out, rows)
            continue
        value = (_rows(inputs, rows).to(w.dtype) @ w[:width].T).to(out.dtype)
        if rows is None and add_inputs:
            out.add_(value)  # broadcasts a single input row over every output row, as the torch op does
        elif rows is None:
            out.copy_(value)
        elif add_inputs:
            out.index_add_(0, rows, value)
        else:
            out.index_copy_(0, rows, value)


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
