"""The value-head wire format, shared by the engine client (API process) and the worker.

A chunk request that wants engine values carries, in `SamplingParams.extra_args`:
- `VALUE_HEADS_ARG`: m linear heads, each D weights and a bias, as float32 bytes (`encode_heads`).
  Bytes because vLLM walks every element of `extra_args` in Python each time it builds or receives
  the params (`_verify_extra_args`, in the API, engine-core and worker processes): with 1,729
  floats per head (three 576-wide layers) that walk was about a tenth of a guided search's time.
- `VALUE_LAYERS_ARG` (optional): the residual-stream layers the heads read (D = H x layers, each
  layer RMS-normalised); absent: the final normed hidden state (D = H).
and asks for `logprobs=m-1`. The worker hands back, in place of each sampled token's m logprob
entries, the m heads' outputs keyed by the "token ids" 0..m-1 (`token_values` reads them back).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

VALUE_HEADS_ARG = "iro_value_heads"
VALUE_LAYERS_ARG = "iro_value_layers"


def encode_heads(heads) -> bytes:
    """`VALUE_HEADS_ARG`'s value: m heads (rows of D weights and a bias) as float32 bytes."""
    return np.asarray(heads, dtype=np.float32).tobytes()


def decode_heads(raw: bytes, width: int):
    """(m, width) float32 tensor of `VALUE_HEADS_ARG`'s value (`encode_heads`)."""
    import torch

    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(-1, width)


@functools.lru_cache(maxsize=256)
def _decoded(raw: bytes, layers: tuple[int, ...] | None, hidden_size: int):
    # One tensor per distinct (heads, layers): the requests of one value share it, so a step
    # values all their rows with one matrix product (`value_heads.head_values`).
    import torch

    width = hidden_size * (len(layers) if layers else 1) + 1
    if not raw or len(raw) % (4 * width):  # heads of another model: NaN values (the server then uses the
        return torch.full((1, width), float("nan"))  # scorer), never an exception in the engine's worker
    return decode_heads(raw, width)


def request_heads(extra_args: dict | None, hidden_size: int) -> tuple[Any, tuple[int, ...] | None] | None:
    """A request's heads as ((m, D + 1) float32 tensor, layers or None), or None when it has none."""
    if not extra_args or VALUE_HEADS_ARG not in extra_args:
        return None
    layers = extra_args.get(VALUE_LAYERS_ARG)
    layers = tuple(int(k) for k in layers) if layers else None
    return _decoded(extra_args[VALUE_HEADS_ARG], layers, hidden_size), layers


def token_values(logprobs: Any, m: int) -> list[list[float]]:
    """The m value-head outputs of each sampled token, from the logprob slots they travel in
    ("token ids" 0..m-1, in order): vLLM's flat logprobs (one list of floats per request), or its
    per-token dicts."""
    from vllm.logprobs import FlatLogprobs

    if isinstance(logprobs, FlatLogprobs):
        flat = logprobs.logprobs
        return [flat[start:min(end, start + m)] for start, end in zip(logprobs.start_indices, logprobs.end_indices)]
    return [[step[j].logprob for j in range(m)] for step in logprobs]
