"""Seeded sampling on the CPU engine (`seed_fix`, CPU only).

When a seeded request is batched with a request whose prompt is still being prefilled in chunks,
vLLM's V1 runner "un-draws" the discarded sample by rewinding the request's torch generator with
`gen.set_offset(gen.get_offset() - 4)`. That is the CUDA (Philox) generator's API; the CPU
generator (mt19937) has no offset, raises "CPU Generator does not use offset" and the engine dies.
The equivalent on CPU is to snapshot the generator state before sampling and restore it for the
discarded rows: a discarded draw leaves the generator exactly where it was, so equal seeds give
equal text whatever else is in the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from server.vllm_ext.registry import PatchMismatch, check_method, own


def _discarded_rows(runner) -> list[int]:
    num_reqs = runner.input_batch.num_reqs
    return [int(i) for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]]


def _seeded_sample(original: Callable) -> Callable:
    @functools.wraps(original)
    def _sample(self, *args, **kwargs):
        generators = self.input_batch.generators
        saved = {i: generators[i].get_state() for i in _discarded_rows(self) if i in generators}
        output = original(self, *args, **kwargs)
        for i, state in saved.items():
            generators[i].set_state(state)
        return output

    return _sample


def _bookkeeping_without_rewind(original: Callable) -> Callable:
    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        # Hide the discarded rows' generators from the CUDA-only offset rewind: _sample already
        # restored their state.
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in _discarded_rows(self) if i in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    return _bookkeeping_sync


def targets() -> tuple:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return (CPUModelRunner,)


def cpu_generators_have_offsets() -> bool:
    """Behaviour, not source text: does this torch's CPU generator take `set_offset`?"""
    import torch

    try:
        torch.Generator(device="cpu").set_offset(0)
    except RuntimeError:
        return False
    return True


def probe(cls: type) -> None:
    check_method(cls, "_sample", ("logits",))
    check_method(cls, "_bookkeeping_sync", ("sampler_output",))
    if cpu_generators_have_offsets():
        raise PatchMismatch("this torch's CPU generators take offsets: vLLM's rewind works, nothing to fix")


def apply(cls) -> None:
    """Make seeded sampling safe in `cls` (vLLM's CPUModelRunner). Idempotent."""
    if own(cls, "_iro_seed_fix"):
        return
    cls._sample = _seeded_sample(cls._sample)
    cls._bookkeeping_sync = _bookkeeping_without_rewind(cls._bookkeeping_sync)
    cls._iro_seed_fix = True
