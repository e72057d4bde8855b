"""Engine values: linear heads on the hidden states vLLM computes anyway while sampling.

vLLM 0.32 has two model runners and both are patched (the registry installs one patch for each):

| runner | where it runs | sampling call wrapped |
|---|---|---|
| V1 `vllm.v1.worker.gpu_model_runner.GPUModelRunner` | CPU (its `CPUModelRunner` subclasses it); GPU with `VLLM_USE_V2_MODEL_RUNNER=0` | `_sample(logits, ...)` |
| V2 `vllm.v1.worker.gpu.model_runner.GPUModelRunner` | GPU with Triton (vLLM's default there) | `sample(hidden_states, input_batch, ...)` |

Both reach the hidden states through what the runners maintain for EAGLE-3, never through a
replaced `forward` or `compute_logits` (a CUDA-graph wrapper's `__call__` bypasses those):

1. *Layers.* After `load_model`, the raw model (`runner.get_model()`, under any CUDA-graph wrapper)
   is told which layers to hand back (`SupportsEagle3.set_aux_hidden_state_layers`) and the runner's
   `use_aux_hidden_state_outputs` is set. The runner itself then unpacks `(hidden, aux)` from every
   forward, eager, compiled or replayed: CUDA graphs are captured after `load_model`, with the aux
   outputs (V1's `CUDAGraphWrapper` keeps the whole output; V2's capture takes the flag).
2. *The step.* `sample_tokens` is wrapped to read the step's state (`execute_model_state`: the
   final hidden states and the aux ones) before the runner clears it; the sampling call is wrapped
   to write each value request's head outputs into its logprob slots (`server.vllm_ext.wire`).
3. *Prompt positions.* A value request that asks for prompt logprobs instead (`prompt_logprobs=m-1`)
   gets its heads' outputs at every prompt position (V1 `_get_prompt_logprobs_dict`, V2's
   `PromptLogprobsWorker`, every prefill chunk): how `/v1/score` values a given response.

Where a request's layers are not exposed (the model has no aux outputs, speculative decoding uses
them, pipeline parallelism), its values are NaN, never a silent 0: the server values that step
with the scorer and counts it. The worker says what it exposes (`runner_report`), so the API
process sends heads only where they will be computed.

Under tensor parallelism the hidden states after each layer's all-reduce are the same on every
rank, so every rank computes the same values; the engine returns the driver rank's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.vllm_ext.registry import INSTALLED, PatchMismatch, check_fields, check_method, own
from server.vllm_ext.wire import VALUE_HEADS_ARG, request_heads

log = logging.getLogger(__name__)



@dataclass
class RunnerState:
    """What one model runner exposes to value heads, and the step being sampled."""

    layers: dict[int, int] = field(default_factory=dict)
    """Exposed residual-stream layer -> its index in the model's aux outputs."""
    layers_off: str = ""
    """Why no layer is exposed (empty when some are)."""
    hidden: Any = None
    """This step's final hidden states, every token (tokens, H)."""
    sample_hidden: Any = None
    """V1: this step's final hidden states of the sampled rows (rows, H)."""
    aux: list | None = None
    """This step's aux outputs, one (tokens, H) per exposed layer."""
    logits_indices: Any = None
    """V1: the rows of `hidden` that sample a token."""
    extra: dict[str, dict] = field(default_factory=dict)
    """V2: request id -> the `extra_args` of each request with value heads."""
    checked: bool = False
    """V1: whether `logits_indices` were checked against the runner's own sampled rows."""


_STATES: "weakref.WeakKeyDictionary[Any, RunnerState]" = weakref.WeakKeyDictionary()


def state_of(runner) -> RunnerState:
    state = _STATES.get(runner)
    if state is None:
        state = _STATES[runner] = RunnerState()
    return state


# --- layers ---------------------------------------------------------------------------------------

def configured_layers(runner) -> tuple[int, ...]:
    """The layers this engine was asked to expose (`additional_config`, set by
    `common.engine_args.engine_kwargs`; unset: "auto")."""
    from common.engine_args import VALUE_LAYERS_KEY, resolve_value_layers

    extra = getattr(runner.vllm_config, "additional_config", None) or {}
    spec = extra.get(VALUE_LAYERS_KEY)
    return resolve_value_layers(spec, runner.model_config.hf_config.num_hidden_layers)


def expose_layers(runner) -> None:
    """Ask the model for the configured layers through vLLM's aux hidden-state outputs (after
    `load_model`, before any compilation or CUDA-graph capture). Records why not in the state."""
    from vllm.model_executor.models.interfaces import supports_eagle3

    state = state_of(runner)
    layers = configured_layers(runner)
    model = runner.get_model()
    parallel = runner.vllm_config.parallel_config
    if not layers:
        state.layers_off = "no layers configured"
    elif not hasattr(runner, "use_aux_hidden_state_outputs"):
        state.layers_off = "the runner has no use_aux_hidden_state_outputs switch"
    elif getattr(runner, "speculative_config", None) is not None or runner.use_aux_hidden_state_outputs:
        state.layers_off = "speculative decoding uses vLLM's auxiliary hidden states"
    elif parallel.pipeline_parallel_size > 1:
        state.layers_off = "pipeline parallel: the layers live on other ranks"
    elif not supports_eagle3(model):
        state.layers_off = f"{type(model).__name__} has no auxiliary hidden-state outputs (vLLM's SupportsEagle3)"
    else:
        model.set_aux_hidden_state_layers(layers)
        runner.use_aux_hidden_state_outputs = True
        state.layers, state.layers_off = {k: i for i, k in enumerate(layers)}, ""


def _load_exposing_layers(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        try:
            expose_layers(self)
        except Exception as exc:  # noqa: BLE001 - a worker must never die of an optional feature
            state_of(self).layers_off = f"{type(exc).__name__}: {exc}"
            log.warning("engine value layers are off (%s: %s); values on them use the scorer", type(exc).__name__, exc)
        return out

    return load_model


# --- the head products ------------------------------------------------------------------------------

def head_values(heads: list, x):
    """(rows, m) outputs of each row's heads (m, D + 1) on its features x (rows, D): one product
    when every row has the same heads (one value), else row by row in one batched product."""
    import torch

    first = heads[0]
    if all(h is first for h in heads):
        w = first.to(x.device)
        return x @ w[:, :-1].T + w[:, -1]
    w = torch.stack(heads).to(x.device)  # (rows, m, D + 1)
    return torch.einsum("rmd,rd->rm", w[:, :, :-1], x) + w[:, :, -1]


def features(final, aux, positions, layers: tuple[int, ...] | None, exposed: dict[int, int]):
    """(rows, D) float32 inputs of the heads: `final` (rows, H) when `layers` is None, else the
    residual stream at `layers` of the token `positions` (RMS-normalised, concatenated:
    valuefn.model.rms_normalise); None when the engine does not expose those layers."""
    import torch

    if layers is None:
        return final.float()
    if aux is None or positions is None or any(k not in exposed for k in layers):
        return None
    parts = []
    for k in layers:
        x = aux[exposed[k]][positions.to(aux[exposed[k]].device)].float()  # (rows, H)
        parts.append(x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6))
    return torch.cat(parts, dim=-1).to(final.device)


def group_rows(heads_of_rows: list, slots: int) -> dict[tuple, tuple[list[int], list]]:
    """(head count, layers) -> (batch rows, their heads), for the rows with heads that fit `slots`."""
    groups: dict[tuple, tuple[list[int], list]] = {}
    for i, parsed in enumerate(heads_of_rows):
        if parsed is not None and parsed[0].shape[0] <= slots:
            rows, hs = groups.setdefault((parsed[0].shape[0], parsed[1]), ([], []))
            rows.append(i)
            hs.append(parsed[0])
    return groups


def write_values(logprobs, groups, final, aux, positions, exposed) -> None:
    """Put each group's head outputs in its rows' first m logprob slots ("token ids" 0..m-1)."""
    import torch

    for (m, layers), (rows, heads) in groups.items():
        index = torch.tensor(rows, device=final.device)
        pos = positions[index.to(positions.device)] if positions is not None else None
        x = features(final[index], aux, pos, layers, exposed)  # (rows, D)
        if x is None:  # layers this engine does not expose: NaN, never a silent 0
            values = torch.full((len(rows), m), float("nan"), device=final.device)
        else:
            values = head_values(heads, x)  # (rows, m)
        target = index.to(logprobs.logprobs.device)
        logprobs.logprobs[target, :m] = values.to(logprobs.logprobs)
        logprobs.logprob_token_ids[target, :m] = torch.arange(m, dtype=logprobs.logprob_token_ids.dtype,
                                                              device=logprobs.logprob_token_ids.device)


def _probe_logprobs_tensors() -> None:
    from vllm.v1.outputs import LogprobsTensors

    if LogprobsTensors._fields[:3] != ("logprob_token_ids", "logprobs", "selected_token_ranks"):
        raise PatchMismatch(f"LogprobsTensors has fields {LogprobsTensors._fields}")


# --- V1 runner ------------------------------------------------------------------------------------

def _keep_step(original: Callable, fields: dict[str, str]) -> Callable:
    """Wrap a runner's `sample_tokens` to copy `fields` (step-state field -> `RunnerState` attribute)
    of its `execute_model_state` before the runner clears it, and to drop them after the step."""
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        step = self.execute_model_state
        state = _STATES.get(self)
        if step is not None and state is not None:
            for name, attr in fields.items():
                setattr(state, attr, getattr(step, name))
        try:
            return original(self, *args, **kwargs)
        finally:
            if state is not None:
                for attr in fields.values():
                    setattr(state, attr, None)

    return sample_tokens


V1_STEP = {"hidden_states": "hidden", "sample_hidden_states": "sample_hidden", "aux_hidden_states": "aux"}
V2_STEP = {"aux_hidden_states": "aux"}


def _v1_keep_indices(original: Callable) -> Callable:
    @functools.wraps(original)
    def _prepare_inputs(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        state_of(self).logits_indices = out[0]  # the rows of the forward's output that sample a token
        return out

    return _prepare_inputs


def _v1_check_indices(runner, state: RunnerState) -> None:
    """Once: the kept `logits_indices` must select exactly the runner's own sampled rows (a
    behaviour check of what `_prepare_inputs` returns); if not, layers go off (values NaN)."""
    import torch

    state.checked = True
    li, hidden, rows = state.logits_indices, state.hidden, state.sample_hidden
    ok = li is not None and hidden is not None and li.shape[0] == rows.shape[0] and torch.equal(hidden[li], rows)
    if not ok:
        state.layers, state.layers_off = {}, "the runner's logits indices do not select its sampled rows"
        log.warning("engine value layers are off: %s; values on layers use the scorer", state.layers_off)


def _v1_sample_with_values(original: Callable) -> Callable:
    @functools.wraps(original)
    def _sample(self, *args, **kwargs):
        import torch
        from vllm.v1.outputs import LogprobsTensors

        state = _STATES.get(self)
        batch = self.input_batch
        meta = batch.sampling_metadata
        if state is None or state.sample_hidden is None or meta.max_num_logprobs is None or meta.max_num_logprobs < 0:
            return original(self, *args, **kwargs)
        slots = meta.max_num_logprobs + 1
        hidden_size = state.sample_hidden.shape[-1]
        parsed = []
        for req_id in batch.req_ids:
            req = self.requests.get(req_id)
            params = req.sampling_params if req is not None else None
            parsed.append(request_heads(params.extra_args if params is not None else None, hidden_size))
        groups = group_rows(parsed, slots)
        if not groups:
            return original(self, *args, **kwargs)
        if state.layers and not state.checked:
            _v1_check_indices(self, state)
        value_req_ids = {batch.req_ids[i] for rows, _ in groups.values() for i in rows}
        only_values = not meta.logprob_token_ids and all(r in value_req_ids for r in batch.num_logprobs)
        if only_values:  # no vocabulary-wide log-softmax, top-k or rank for anyone: slots from the heads alone
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
        write_values(output.logprobs_tensors, groups, state.sample_hidden, state.aux, state.logits_indices,
                     state.layers)
        return output

    return _sample


def _prompt_values(state: RunnerState, heads, layers, hidden, positions):
    """(rows, m) head values at prompt `positions` (each the value of the next prompt token, as a
    sampled token's value is at the position that sampled it); NaN for layers not exposed."""
    import torch

    x = features(hidden[positions], state.aux, positions, layers, state.layers)
    if x is None:
        return torch.full((positions.shape[0], heads.shape[0]), float("nan"), device=hidden.device)
    return head_values([heads], x)


def _put_values(target, rows: slice, values) -> None:
    """Write (rows, m) values into the first m slots of a LogprobsTensors' `rows` ("token ids" 0..m-1).
    A blocking copy: it lands after the runner's own (non-blocking) copies of the same rows."""
    import torch

    m = values.shape[1]
    target.logprobs[rows, :m] = values.to(target.logprobs.device, target.logprobs.dtype)
    target.logprob_token_ids[rows, :m] = torch.arange(m, dtype=target.logprob_token_ids.dtype,
                                                      device=target.logprob_token_ids.device)


def _v1_prompt_values(original: Callable) -> Callable:
    """Prompt positions of a value request (`prompt_logprobs=m-1`) carry its heads' values: how the
    engine values a given response (`/v1/score`) with no second model."""
    @functools.wraps(original)
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens, *args, **kwargs):
        import torch

        state = _STATES.get(self)
        plan = []
        for req_id in (self.num_prompt_logprobs if state is not None else ()):
            req, n = self.requests.get(req_id), num_scheduled_tokens.get(req_id)
            if req is None or n is None or req.prompt_token_ids is None or req.sampling_params is None:
                continue
            parsed = request_heads(req.sampling_params.extra_args, hidden_states.shape[-1])
            start = req.num_computed_tokens
            num = min(n, len(req.prompt_token_ids) - start - 1)
            if parsed is not None and num > 0:
                offset = int(self.query_start_loc.np[self.input_batch.req_id_to_index[req_id]])
                plan.append((req_id, req, parsed, start, num, offset, req.in_progress_prompt_logprobs_cpu))
        out = original(self, hidden_states, num_scheduled_tokens, *args, **kwargs)
        for req_id, req, (heads, layers), start, num, offset, before in plan:
            target = out.get(req_id) or req.in_progress_prompt_logprobs_cpu or before
            if target is not None:
                positions = torch.arange(offset, offset + num, device=hidden_states.device)
                _put_values(target, slice(start, start + num), _prompt_values(state, heads, layers, hidden_states,
                                                                             positions))
        return out

    return _get_prompt_logprobs_dict


def v1_targets() -> tuple:
    """V1's runner, its step state, and the runners with a `load_model` of their own (the CPU one)."""
    import torch
    from vllm.v1.worker.gpu_model_runner import ExecuteModelState, GPUModelRunner

    loaders: tuple = ()
    if not torch.cuda.is_available():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        loaders = (CPUModelRunner,)
    return GPUModelRunner, ExecuteModelState, loaders


def probe_v1(runner_cls: type, step_cls: type, loaders: tuple = ()) -> None:
    check_method(runner_cls, "_sample", ("logits",))
    check_method(runner_cls, "sample_tokens", ("grammar_output",))
    check_method(runner_cls, "_prepare_inputs", ("scheduler_output",))
    check_method(runner_cls, "_get_prompt_logprobs_dict", ("hidden_states", "num_scheduled_tokens"))
    for cls in (runner_cls, *loaders):
        check_method(cls, "load_model")
        check_method(cls, "get_model")
    check_fields(step_cls, tuple(V1_STEP))
    _probe_logprobs_tensors()


def apply_v1(runner_cls: type, step_cls: type, loaders: tuple = ()) -> None:
    """Let V1 requests read value heads (module docstring). Idempotent.

    A request whose `extra_args` carry heads and that asks for `logprobs=m-1` gets the m heads'
    outputs in place of its logprob entries. When no other request of the batch wants logprobs,
    the sampler is told to compute none and the slots are built from the heads alone."""
    for cls in (runner_cls, *loaders):
        if "load_model" in cls.__dict__ and not own(cls, "_iro_exposes_layers"):
            cls.load_model = _load_exposing_layers(cls.load_model)
            cls._iro_exposes_layers = True
    if not own(runner_cls, "_iro_value_heads"):
        runner_cls._sample = _v1_sample_with_values(runner_cls._sample)
        runner_cls.sample_tokens = _keep_step(runner_cls.sample_tokens, V1_STEP)
        runner_cls._prepare_inputs = _v1_keep_indices(runner_cls._prepare_inputs)
        runner_cls._get_prompt_logprobs_dict = _v1_prompt_values(runner_cls._get_prompt_logprobs_dict)
        runner_cls._iro_value_heads = "v1"


# --- V2 runner ------------------------------------------------------------------------------------

def _v2_keep_heads(original: Callable) -> Callable:
    @functools.wraps(original)
    def add_requests(self, scheduler_output, *args, **kwargs):
        out = original(self, scheduler_output, *args, **kwargs)
        for new in scheduler_output.scheduled_new_reqs:
            extra = getattr(new.sampling_params, "extra_args", None) or {}
            if VALUE_HEADS_ARG in extra:
                state_of(self).extra[new.req_id] = extra
        return out

    return add_requests


def _v2_drop_heads(original: Callable) -> Callable:
    @functools.wraps(original)
    def _remove_request(self, req_id, *args, **kwargs):
        state = _STATES.get(self)
        if state is not None:
            state.extra.pop(req_id, None)
        return original(self, req_id, *args, **kwargs)

    return _remove_request


def _v2_sample_with_values(original: Callable) -> Callable:
    @functools.wraps(original)
    def sample(self, hidden_states, input_batch, *args, **kwargs):
        out = original(self, hidden_states, input_batch, *args, **kwargs)
        state = _STATES.get(self)
        logprobs = out[0].logprobs_tensors
        if state is None or not state.extra or logprobs is None or input_batch.num_draft_tokens:
            return out
        hidden_size = hidden_states.shape[-1]
        parsed = [request_heads(state.extra.get(r), hidden_size) for r in input_batch.req_ids]
        groups = group_rows(parsed, logprobs.logprobs.shape[-1])
        if groups:
            indices = input_batch.logits_indices  # (rows,) positions of the sampled tokens
            write_values(logprobs, groups, hidden_states[indices], state.aux, indices, state.layers)
        return out

    return sample


def _v2_prompt_values(runner, compute: Callable) -> Callable:
    """V2's `PromptLogprobsWorker.compute_prompt_logprobs` of `runner`, with value requests' rows
    (this step's prompt positions) carrying their heads' values (`_v1_prompt_values`' purpose)."""
    @functools.wraps(compute)
    def compute_prompt_logprobs(logits_fn, hidden_states, input_batch, *args, **kwargs):
        import torch

        worker, state = runner.prompt_logprobs_worker, _STATES.get(runner)
        value_rows = [(i, r) for i, r in enumerate(input_batch.req_ids) if state is not None and r in state.extra
                      and r in worker.in_progress_prompt_logprobs]
        before = {r: len(worker.in_progress_prompt_logprobs[r]) for _, r in value_rows}
        out = compute(logits_fn, hidden_states, input_batch, *args, **kwargs)
        starts = input_batch.query_start_loc_np
        for i, req_id in value_rows:
            chunks = worker.in_progress_prompt_logprobs.get(req_id, [])
            if req_id in out:  # the prompt's last chunk: this step's rows are the returned tensor's last ones
                target, num = out[req_id], int(starts[i + 1] - starts[i]) - 1
                rows = slice(target.logprobs.shape[0] - num, None)
            elif len(chunks) > before[req_id]:  # a chunk of a longer prompt
                target = chunks[-1]
                num = target.logprobs.shape[0]
                rows = slice(0, num)
            else:
                continue
            if num <= 0:
                continue
            heads, layers = request_heads(state.extra[req_id], hidden_states.shape[-1])
            positions = torch.arange(int(starts[i]), int(starts[i]) + num, device=hidden_states.device)
            _put_values(target, rows, _prompt_values(state, heads, layers, hidden_states, positions))
        return out

    return compute_prompt_logprobs


def _v2_load_wrapping_prompt_worker(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        worker = getattr(self, "prompt_logprobs_worker", None)
        if worker is not None and not getattr(worker.compute_prompt_logprobs, "_iro_values", False):
            worker.compute_prompt_logprobs = _v2_prompt_values(self, worker.compute_prompt_logprobs)
            worker.compute_prompt_logprobs._iro_values = True
        return out

    return load_model


def v2_targets() -> tuple:
    """V2's runner (importing it needs no Triton; running it does) and its step state."""
    from vllm.v1.worker.gpu.model_runner import ExecuteModelState, GPUModelRunner

    return GPUModelRunner, ExecuteModelState


def probe_v2(runner_cls: type, step_cls: type) -> None:
    check_method(runner_cls, "sample", ("hidden_states", "input_batch", "grammar_output"))
    check_method(runner_cls, "sample_tokens", ("grammar_output",))
    check_method(runner_cls, "add_requests", ("scheduler_output",))
    check_method(runner_cls, "_remove_request", ("req_id",))
    check_method(runner_cls, "load_model")
    check_method(runner_cls, "get_model")
    check_fields(step_cls, (*V2_STEP, "hidden_states", "input_batch"))
    from vllm.v1.worker.gpu.sample.prompt_logprob import PromptLogprobsWorker

    check_method(PromptLogprobsWorker, "compute_prompt_logprobs", ("logits_fn", "hidden_states", "input_batch"))
    _probe_logprobs_tensors()


def apply_v2(runner_cls: type, step_cls: type) -> None:
    """Let V2 requests read value heads (module docstring). Idempotent. The sampler computes the
    requests' logprobs as usual (a top-k on the GPU) and the value rows' slots are overwritten."""
    if own(runner_cls, "_iro_value_heads"):
        return
    runner_cls.load_model = _v2_load_wrapping_prompt_worker(_load_exposing_layers(runner_cls.load_model))
    runner_cls.add_requests = _v2_keep_heads(runner_cls.add_requests)
    runner_cls._remove_request = _v2_drop_heads(runner_cls._remove_request)
    runner_cls.sample_tokens = _keep_step(runner_cls.sample_tokens, V2_STEP)
    runner_cls.sample = _v2_sample_with_values(runner_cls.sample)
    runner_cls._iro_value_heads = "v2"


# --- what the worker reports ----------------------------------------------------------------------

def runner_report(runner, status: dict[str, str]) -> dict:
    """What this runner computes for value heads: {"runner", "value_heads" ("installed" or why
    not), "value_layers", "value_layers_off"}; read by the API process (`server.vllm_ext.worker`)."""
    kind = getattr(type(runner), "_iro_value_heads", None)
    name = f"{type(runner).__module__}.{type(runner).__qualname__}"
    config = runner.vllm_config
    if kind is None:
        why = next((why for patch, why in status.items() if patch.startswith("value_heads") and why != INSTALLED),
                   "the runner is neither of the patched ones")
        return {"runner": name, "runner_kind": None, "value_heads": why, "value_layers": [],
                "value_layers_off": "no value heads"}
    heads = INSTALLED
    if config.speculative_config is not None:
        heads = "speculative decoding samples several tokens per step"
    elif config.parallel_config.pipeline_parallel_size > 1:
        heads = "pipeline parallel: untested, values use the scorer"
    state = state_of(runner)
    return {"runner": name, "runner_kind": kind, "value_heads": heads,
            "value_layers": sorted(state.layers) if heads == INSTALLED else [],
            "value_layers_off": state.layers_off}
