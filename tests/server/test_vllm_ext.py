"""The vLLM extension layer: the patch registry probed against vLLM's real runner classes, the
value-head path on V1 stand-ins (under a real `CUDAGraphWrapper`) and V2 stand-ins that follow
the real runners' contracts, what the workers report, and the probes' fallbacks.

Neither GPU runner can run here (V2 needs Triton's GPU backend, V1 on GPU needs CUDA), so the
stand-ins call the patched methods the way the real `execute_model` / `sample_tokens` do; the
CPU engine (which runs the V1 code) is checked end to end in tests/e2e/test_guided.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from common.engine_args import VALUE_LAYERS_KEY
from server import vllm_ext
from server.vllm_ext import registry, value_heads
from server.vllm_ext.registry import INSTALLED, Patch, PatchMismatch
from server.vllm_ext.wire import VALUE_HEADS_ARG, VALUE_LAYERS_ARG, encode_heads, request_heads
from valuefn.model import rms_normalise

H = 4


# --- the registry against the installed vLLM ----------------------------------------------------

def test_every_patch_installs_on_this_vllm_and_each_runner_gets_its_own(vllm_patches):
    """The outcome pinned per runner: V1 (CPU and GPU with VLLM_USE_V2_MODEL_RUNNER=0) and V2
    (vLLM's GPU default) both take the value-head patch. Importing V2's runner needs no Triton:
    vLLM's `triton_utils` stands in for it when its CPU backend is missing."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

    status = vllm_patches
    assert status == {name: INSTALLED for name in ("value_heads_v1", "value_heads_v2", "block16", "seed_fix",
                                                   "lora_grouped", "lora_compiled", "grammar_prefix")}
    assert V1.__dict__["_iro_value_heads"] == "v1" and V2.__dict__["_iro_value_heads"] == "v2"
    assert CPUModelRunner.__dict__.get("_iro_exposes_layers")  # its own load_model exposes the layers too
    assert CPUModelRunner.__dict__.get("_iro_seed_fix") and "_iro_seed_fix" not in V1.__dict__
    value_heads.probe_v1(*value_heads.v1_targets())  # the probes pass on the real classes
    value_heads.probe_v2(*value_heads.v2_targets())


def test_the_patches_are_undone_after_a_test_that_installed_them():
    """The fixture above scopes them: a later test sees vLLM as shipped (`tests/conftest.py`)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

    from tests.conftest import vllm_patches_installed

    with vllm_patches_installed():
        assert V1.__dict__.get("_iro_value_heads") == "v1" and registry.STATUS["seed_fix"] == INSTALLED
    assert "_iro_value_heads" not in V1.__dict__ and "_iro_seed_fix" not in CPUModelRunner.__dict__
    assert registry.STATUS.get("seed_fix") != INSTALLED


@pytest.fixture
def fresh_status(monkeypatch):
    """An empty patch record, so a test sees its own outcomes (the real patches stay installed)."""
    monkeypatch.setattr(registry, "STATUS", {})
    monkeypatch.setattr(registry, "_warned", {})
    return registry.STATUS


def test_a_runner_without_what_a_patch_wraps_keeps_its_methods_and_the_record_says_why(fresh_status):
    class Runner:  # a renamed sampling step: V2's probe refuses, nothing is replaced
        def sample_tokens(self, grammar_output):
            return "sampled"

    original = Runner.sample_tokens
    patch = Patch("value_heads_v2", lambda: (Runner, SimpleNamespace(_fields=())), value_heads.probe_v2,
                  value_heads.apply_v2, "the scorer")
    assert not registry.install(patch, cpu=True, version="0.32.0")
    assert fresh_status["value_heads_v2"] == "Runner.sample is missing"
    assert Runner.sample_tokens is original


def test_another_vllm_line_gets_no_patches_and_one_warning(fresh_status, monkeypatch, caplog):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with caplog.at_level(logging.WARNING, logger="server.vllm_ext"):
        status = vllm_ext.install_worker_patches()
        vllm_ext.install_worker_patches()  # vLLM loads plugins once per process, but twice must not warn twice
    assert all("not the tested 0.32.x line" in why for why in status.values()) and len(status) == 7
    (record,) = [r for r in caplog.records if r.name == "server.vllm_ext"]
    assert "value_heads_v2" in record.message and "the scorer values candidates" in record.message
    assert "KV blocks of 32" in record.message


def test_cpu_only_patches_are_not_here_on_a_cuda_process_and_are_not_warned_about(fresh_status, caplog):
    patch = Patch("block16", lambda: (object,), lambda *a: None, lambda *a: None, "blocks of 32", platform="cpu")
    with caplog.at_level(logging.WARNING, logger="server.vllm_ext"):
        registry.install_all([patch], cpu=False, version="0.32.1")
    assert fresh_status["block16"] == registry.NOT_HERE and not caplog.records


def test_a_patch_that_raises_or_cannot_import_is_recorded_not_propagated(fresh_status):
    """vLLM calls plugins unguarded: an exception there would kill every engine process."""
    def boom(*targets):
        raise RuntimeError("internal layout changed")

    def missing():
        raise ImportError("No module named 'vllm.v1.worker.gpu'")

    assert not registry.install(Patch("a", lambda: (), lambda: None, boom, "x"), cpu=True, version="0.32.0")
    assert not registry.install(Patch("b", missing, lambda: None, lambda: None, "x"), cpu=True, version="0.32.0")
    assert fresh_status == {"a": "RuntimeError: internal layout changed",
                            "b": "not available in this vLLM build: No module named 'vllm.v1.worker.gpu'"}


def test_the_seed_fix_probes_the_generator_not_the_source(monkeypatch):
    from server.vllm_ext import seed_fix

    class Runner:
        def _sample(self, logits, spec_decode_metadata=None): ...
        def _bookkeeping_sync(self, scheduler_output, sampler_output): ...

    assert not seed_fix.cpu_generators_have_offsets()  # this torch: the CPU generator has no offset
    seed_fix.probe(Runner)
    monkeypatch.setattr(seed_fix, "cpu_generators_have_offsets", lambda: True)
    with pytest.raises(PatchMismatch, match="nothing to fix"):
        seed_fix.probe(Runner)


# --- stand-ins ------------------------------------------------------------------------------------

class AuxModel(torch.nn.Module):
    """A model with vLLM's EAGLE-3 interface: after `set_aux_hidden_state_layers`, its forward
    returns (final, [residual stream after each layer]); the stream after layer k is x*k + 1."""

    supports_eagle3 = True  # vLLM's SupportsEagle3 protocol (a runtime-checkable isinstance)
    has_own_lm_head = False
    has_own_embed_tokens = False

    def __init__(self):
        super().__init__()
        self.aux_layers: tuple[int, ...] = ()

    def set_aux_hidden_state_layers(self, layers):
        self.aux_layers = tuple(layers)

    def get_eagle3_default_aux_hidden_state_layers(self):
        return (1,)

    def forward(self, x):
        if self.aux_layers:
            return x, [x * k + 1 for k in self.aux_layers]
        return x


def _config(layers="3", pp=1, spec=None):
    return SimpleNamespace(additional_config={VALUE_LAYERS_KEY: layers}, speculative_config=spec,
                           parallel_config=SimpleNamespace(pipeline_parallel_size=pp, tensor_parallel_size=1))


def _graph_wrapper(model, monkeypatch):
    """vLLM's real CUDAGraphWrapper around `model` (its __call__ runs the model itself outside a
    forward context: no graph here, but the same object and call path as on a GPU)."""
    from vllm.compilation.cuda_graph import CUDAGraphWrapper
    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "get_global_graph_pool", lambda self: None, raising=False)
    return CUDAGraphWrapper(model, SimpleNamespace(compilation_config=SimpleNamespace()), CUDAGraphMode.FULL)


def _logprobs(n, width, fill=-1.0):
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors(torch.full((n, width), 77, dtype=torch.int32), torch.full((n, width), fill),
                           torch.zeros(n, dtype=torch.int64))


def _v1_runner_class(monkeypatch, *, wrap=True, layers="3", pp=1):
    """A stand-in for V1's GPUModelRunner: `execute_model` and `sample_tokens` do what the real ones
    do with the model's output, the aux flag and the step state."""
    from vllm.v1.worker.gpu_model_runner import ExecuteModelState

    class Runner:
        speculative_config = None

        def __init__(self):
            self.use_aux_hidden_state_outputs = False
            self.vllm_config = _config(layers, pp)
            self.model_config = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=6))
            self.execute_model_state = None
            self.num_prompt_logprobs = {}  # request id -> prompt logprobs asked (vLLM's runner attribute)

        def load_model(self):
            model = AuxModel()
            self.model = _graph_wrapper(model, monkeypatch) if wrap else model  # wrapped inside load_model

        def get_model(self):
            return self.model.unwrap() if hasattr(self.model, "unwrap") else self.model

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens=None):
            return scheduler_output["logits_indices"], None, 1

        def execute_model(self, scheduler_output):
            logits_indices, _, _ = self._prepare_inputs(scheduler_output)
            out = self.model(scheduler_output["x"])
            hidden, aux = out if self.use_aux_hidden_state_outputs else (out, None)
            sample_hidden = hidden[logits_indices]
            self.execute_model_state = ExecuteModelState(None, sample_hidden.sum(-1, keepdim=True), None, None,
                                                         hidden, sample_hidden, aux, None, None, None)

        def sample_tokens(self, grammar_output):
            logits, hidden = self.execute_model_state.logits, self.execute_model_state.hidden_states
            self.execute_model_state = None
            out = self._sample(logits, None)
            self.prompt_out = self._get_prompt_logprobs_dict(hidden, getattr(self, "num_scheduled", {}))
            return out

        def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
            """vLLM's contract: each prompt-logprob request's CPU tensor of (prompt - 1) rows, filled
            chunk by chunk from row `num_computed_tokens`; returned once the prompt is done."""
            from vllm.v1.outputs import LogprobsTensors

            done = {}
            for req_id, k in self.num_prompt_logprobs.items():
                req = self.requests[req_id]
                if req.in_progress_prompt_logprobs_cpu is None:
                    req.in_progress_prompt_logprobs_cpu = LogprobsTensors.empty_cpu(len(req.prompt_token_ids) - 1, k + 1)
                    req.in_progress_prompt_logprobs_cpu.logprobs.fill_(-1.0)
                start = req.num_computed_tokens
                if start + num_scheduled_tokens[req_id] >= len(req.prompt_token_ids):
                    done[req_id] = req.in_progress_prompt_logprobs_cpu
                    req.in_progress_prompt_logprobs_cpu = None
            return done

        def _sample(self, logits, spec_decode_metadata=None):
            n = logits.shape[0]
            self.asked = self.input_batch.sampling_metadata.max_num_logprobs
            real = None if self.asked is None else _logprobs(n, self.asked + 1)
            return SimpleNamespace(sampled_token_ids=torch.zeros((n, 1), dtype=torch.int32), logprobs_tensors=real)

    value_heads.apply_v1(Runner, ExecuteModelState)
    value_heads.apply_v1(Runner, ExecuteModelState)  # idempotent
    return Runner


def _v1_batch(runner, extras: dict, num_logprobs: dict, max_num_logprobs):
    from dataclasses import dataclass, field

    @dataclass
    class Meta:
        max_num_logprobs: int | None
        logprob_token_ids: dict = field(default_factory=dict)

    runner.requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=e)) for r, e in extras.items()}
    runner.input_batch = SimpleNamespace(req_ids=list(extras), sampling_metadata=Meta(max_num_logprobs),
                                         num_logprobs=num_logprobs)


HEAD = [1.0, 0.0, 0.0, 2.0, 0.5]


def _expected(x, head=HEAD):
    w = torch.tensor(head[:-1])
    return float(x @ w + head[-1])


@pytest.mark.parametrize("wrap", [True, False], ids=["cuda-graph-wrapper", "eager"])
def test_v1_layer_heads_read_the_runners_aux_states_at_the_sampled_rows(monkeypatch, wrap):
    """Under a CUDAGraphWrapper the patch reaches the raw model (`get_model`), turns on the runner's
    own aux outputs and reads them from its step state: nothing depends on the wrapper calling a
    replaced `forward`. A head on an unexposed layer gets NaN (the search then uses the scorer)."""
    Runner = _v1_runner_class(monkeypatch, wrap=wrap)
    runner = Runner()
    runner.load_model()
    assert runner.use_aux_hidden_state_outputs and runner.get_model().aux_layers == (3,)
    assert value_heads.state_of(runner).layers == {3: 0}
    _v1_batch(runner, {"a": {VALUE_HEADS_ARG: encode_heads([HEAD]), VALUE_LAYERS_ARG: [3]},
                       "b": {VALUE_HEADS_ARG: encode_heads([HEAD])},
                       "c": {VALUE_HEADS_ARG: encode_heads([HEAD]), VALUE_LAYERS_ARG: [4]}},
              {"a": 0, "b": 0, "c": 0}, 0)
    x = torch.randn(7, H)
    indices = torch.tensor([2, 4, 6])
    runner.execute_model({"x": x, "logits_indices": indices})
    out = runner.sample_tokens(None)
    values = out.logprobs_tensors.logprobs[:, 0]
    assert values[0].item() == pytest.approx(_expected(rms_normalise(x[2] * 3 + 1)), rel=1e-5)  # layer 3, row 2
    assert values[1].item() == pytest.approx(_expected(x[4]), rel=1e-5)  # the final state
    assert torch.isnan(values[2])  # layer 4 is not exposed
    assert runner.asked is None  # only value rows wanted logprobs: the sampler computed none
    assert value_heads.state_of(runner).hidden is None  # the step's tensors are not kept past it


def test_v1_only_the_value_rows_slots_are_overwritten_when_others_want_real_logprobs(monkeypatch):
    Runner = _v1_runner_class(monkeypatch, layers="none")
    runner = Runner()
    runner.load_model()
    heads = [[1.0, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 2.0, -1.0]]
    _v1_batch(runner, {"a": None, "b": {VALUE_HEADS_ARG: encode_heads(heads)}, "c": {"other": 1}},
              {"a": 2, "b": 1}, 2)
    x = torch.randn(3, H)
    runner.execute_model({"x": x, "logits_indices": torch.arange(3)})
    lp = runner.sample_tokens(None).logprobs_tensors
    assert runner.asked == 2
    assert lp.logprobs[1, :2].tolist() == pytest.approx([float(x[1, 0]) + 0.5, 2 * float(x[1, 3]) - 1.0])
    assert lp.logprob_token_ids[1, :2].tolist() == [0, 1] and lp.logprob_token_ids[1, 2] == 77
    assert lp.logprobs[0].tolist() == [-1.0] * 3 and lp.logprobs[2].tolist() == [-1.0] * 3


def test_v1_wrong_logits_indices_turn_the_layers_off_instead_of_reading_the_wrong_rows(monkeypatch, caplog):
    """The behaviour check that replaces reading `_prepare_inputs`' docstring: if the kept indices
    do not select the rows the runner sampled, layer values become NaN (scorer), never wrong."""
    Runner = _v1_runner_class(monkeypatch)
    runner = Runner()
    runner.load_model()
    _v1_batch(runner, {"a": {VALUE_HEADS_ARG: encode_heads([HEAD]), VALUE_LAYERS_ARG: [3]}}, {"a": 0}, 0)
    x = torch.randn(5, H)
    runner.execute_model({"x": x, "logits_indices": torch.tensor([4])})
    value_heads.state_of(runner).logits_indices = torch.tensor([1])  # what a changed _prepare_inputs would hand us
    with caplog.at_level(logging.WARNING):
        values = runner.sample_tokens(None).logprobs_tensors.logprobs[:, 0]
    assert torch.isnan(values[0]) and "do not select its sampled rows" in caplog.text
    assert value_heads.state_of(runner).layers == {}


@pytest.mark.parametrize("case,why", [
    (dict(layers="none"), "no layers configured"),
    (dict(pp=2), "pipeline parallel"),
])
def test_layers_stay_off_with_the_reason_where_they_cannot_be_exposed(monkeypatch, case, why):
    Runner = _v1_runner_class(monkeypatch, **case)
    runner = Runner()
    runner.load_model()
    state = value_heads.state_of(runner)
    assert not runner.use_aux_hidden_state_outputs and state.layers == {} and why in state.layers_off


def test_a_model_without_aux_outputs_keeps_final_state_heads_only(monkeypatch):
    Runner = _v1_runner_class(monkeypatch, wrap=False)
    Runner.load_model = value_heads._load_exposing_layers(lambda self: setattr(self, "model", torch.nn.Identity()))
    runner = Runner()
    runner.load_model()
    assert "has no auxiliary hidden-state outputs" in value_heads.state_of(runner).layers_off
    assert not runner.use_aux_hidden_state_outputs


def _v2_runner_class():
    """A stand-in for V2's GPUModelRunner with the contracts the patch relies on: `add_requests`
    and `_remove_request` manage requests, `execute_model` leaves (hidden, aux) in
    `execute_model_state`, `sample_tokens` clears it and calls `sample(hidden_states, input_batch,
    grammar_output)`, which returns (SamplerOutput, num_sampled, num_rejected)."""
    from vllm.v1.worker.gpu.model_runner import ExecuteModelState

    class Runner:
        speculative_config = None

        def __init__(self, layers="3"):
            self.use_aux_hidden_state_outputs = False
            self.vllm_config = _config(layers)
            self.model_config = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=6))
            self.execute_model_state = None
            self.reqs = set()

        def load_model(self, *args, **kwargs):
            self.model = AuxModel()

        def get_model(self):
            return self.model

        def add_requests(self, scheduler_output):
            self.reqs |= {r.req_id for r in scheduler_output.scheduled_new_reqs}

        def _remove_request(self, req_id):
            self.reqs.discard(req_id)
            return True

        prompt_logprobs_worker = None

        def execute_model(self, x, input_batch):
            out = self.model(x)
            hidden, aux = out if self.use_aux_hidden_state_outputs else (out, None)
            self.execute_model_state = ExecuteModelState(input_batch, None, None, hidden, aux, None, set(), None,
                                                         None, 0)

        def sample_tokens(self, grammar_output):
            state, self.execute_model_state = self.execute_model_state, None
            return self.sample(state.hidden_states, state.input_batch, grammar_output)[0]

        def sample(self, hidden_states, input_batch, grammar_output):
            n = len(input_batch.req_ids)
            out = SimpleNamespace(sampled_token_ids=torch.zeros((n, 1), dtype=torch.int32),
                                  logprobs_tensors=_logprobs(n, 3))
            return out, None, None

    value_heads.apply_v2(Runner, ExecuteModelState)
    value_heads.apply_v2(Runner, ExecuteModelState)  # idempotent
    return Runner


def _new_req(req_id, extra):
    return SimpleNamespace(req_id=req_id, sampling_params=SimpleNamespace(extra_args=extra))


def test_v2_heads_are_read_through_the_sampling_hook_and_forgotten_with_the_request():
    Runner = _v2_runner_class()
    runner = Runner()
    runner.load_model()
    assert runner.use_aux_hidden_state_outputs and runner.model.aux_layers == (3,)
    runner.add_requests(SimpleNamespace(scheduled_new_reqs=[
        _new_req("a", {VALUE_HEADS_ARG: encode_heads([HEAD]), VALUE_LAYERS_ARG: [3]}),
        _new_req("b", {VALUE_HEADS_ARG: encode_heads([HEAD])}), _new_req("c", None),
        _new_req("d", {VALUE_HEADS_ARG: encode_heads([HEAD]), VALUE_LAYERS_ARG: [4]})]))
    x = torch.randn(9, H)
    batch = SimpleNamespace(req_ids=["a", "b", "c", "d"], logits_indices=torch.tensor([1, 3, 5, 8]),
                            num_draft_tokens=0)
    runner.execute_model(x, batch)
    lp = runner.sample_tokens(None).logprobs_tensors
    assert lp.logprobs[0, 0].item() == pytest.approx(_expected(rms_normalise(x[1] * 3 + 1)), rel=1e-5)
    assert lp.logprobs[1, 0].item() == pytest.approx(_expected(x[3]), rel=1e-5)
    assert lp.logprobs[2].tolist() == [-1.0] * 3 and lp.logprob_token_ids[2, 0] == 77  # no heads: untouched
    assert torch.isnan(lp.logprobs[3, 0])  # layer 4 is not exposed
    assert lp.logprob_token_ids[0, 0] == 0 and lp.logprob_token_ids[1, 0] == 0
    runner._remove_request("a")
    assert "a" not in value_heads.state_of(runner).extra and "a" not in runner.reqs


# --- what the workers report ----------------------------------------------------------------------

def _report(runner, kind_status=None):
    return value_heads.runner_report(runner, kind_status or {"value_heads_v1": INSTALLED})


def test_the_worker_report_says_what_the_runner_computes(monkeypatch):
    Runner = _v1_runner_class(monkeypatch)
    runner = Runner()
    runner.load_model()
    report = _report(runner)
    assert report["runner_kind"] == "v1" and report["value_heads"] == INSTALLED and report["value_layers"] == [3]
    runner.vllm_config.speculative_config = object()
    assert "speculative" in _report(runner)["value_heads"] and _report(runner)["value_layers"] == []

    class Unpatched:
        vllm_config = _config()

    report = value_heads.runner_report(Unpatched(), {"value_heads_v1": "LogprobsTensors has fields (...)"})
    assert report["runner_kind"] is None and report["value_heads"] == "LogprobsTensors has fields (...)"


def test_combined_reports_offer_heads_only_where_every_worker_computes_them():
    from server.engine import value_heads_from_report
    from server.vllm_ext.worker import combine

    ok = {"runner": "V1", "value_heads": INSTALLED, "value_layers": [2, 15, 27], "patches": {"block16": INSTALLED}}
    config = SimpleNamespace(model_config=SimpleNamespace(max_logprobs=20))
    assert value_heads_from_report(combine([ok, {**ok, "value_layers": [2, 15]}]), config) == (21, (2, 15))
    off = combine([ok, {**ok, "value_heads": "pipeline parallel: untested", "patches": {"block16": "no"}}])
    assert value_heads_from_report(off, config) == (0, ()) and off["patches"] == {"block16": "no"}
    unlimited = SimpleNamespace(model_config=SimpleNamespace(max_logprobs=-1))
    assert value_heads_from_report(combine([ok]), unlimited) == (64, (2, 15, 27))
    assert combine([])["value_heads"] == "no worker reported"


def test_requests_of_one_value_share_one_decoded_head_tensor_and_one_product_values_them():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)  # 2 heads of 4 weights + a bias
    a, b, c = (request_heads({VALUE_HEADS_ARG: encode_heads(w.tolist())}, 4)[0] for w in (w1, w1, w2))
    assert a is b and c is not a
    x = torch.randn(3, 4, generator=g)
    expected = lambda ws: torch.stack([x[i] @ w[:, :4].T + w[:, 4] for i, w in enumerate(ws)])  # noqa: E731
    torch.testing.assert_close(value_heads.head_values([a, b, a], x), expected([w1, w1, w1]))
    torch.testing.assert_close(value_heads.head_values([a, c, b], x), expected([w1, w2, w1]))
    assert request_heads({"other": 1}, 4) is None and request_heads(None, 4) is None


def test_heads_of_the_wrong_width_give_nan_not_an_exception_in_the_worker():
    heads, layers = request_heads({VALUE_HEADS_ARG: encode_heads([[1.0, 2.0, 3.0]])}, 4)  # 3 floats, not 4 + 1
    assert layers is None and heads.shape == (1, 5) and torch.isnan(heads).all()


@pytest.mark.parametrize("chunks", [[6], [3, 3]], ids=["whole-prompt", "chunked-prefill"])
def test_v1_prompt_positions_of_a_value_request_carry_its_head_values(monkeypatch, chunks):
    """How `/v1/score` values a given response in the engine: a request with heads and
    `prompt_logprobs=m-1` gets, at prompt row i, the heads on the position that predicts token i+1
    (the final state, or the layers' stream), in every prefill chunk."""
    import numpy as np

    Runner = _v1_runner_class(monkeypatch)
    runner = Runner()
    runner.load_model()
    prompt = [5, 6, 7, 8, 9, 10]
    req = SimpleNamespace(prompt_token_ids=prompt, num_computed_tokens=0, in_progress_prompt_logprobs_cpu=None,
                          sampling_params=SimpleNamespace(extra_args={VALUE_HEADS_ARG: encode_heads([HEAD, HEAD]),
                                                                      VALUE_LAYERS_ARG: [3]}))
    _v1_batch(runner, {"p": req.sampling_params.extra_args}, {}, None)
    runner.requests["p"] = req
    runner.num_prompt_logprobs = {"p": 1}
    runner.input_batch.req_id_to_index = {"p": 0}
    x = torch.randn(len(prompt), H)
    for size in chunks:
        start = req.num_computed_tokens
        runner.query_start_loc = SimpleNamespace(np=np.array([0, size]))
        runner.num_scheduled = {"p": size}
        runner.execute_model({"x": x[start:start + size], "logits_indices": torch.tensor([size - 1])})
        runner.sample_tokens(None)
        req.num_computed_tokens += size
    lp = runner.prompt_out["p"]
    expected = [_expected(rms_normalise(x[i] * 3 + 1)) for i in range(len(prompt) - 1)]
    assert lp.logprobs[:, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert lp.logprobs[:, 1].tolist() == pytest.approx(expected, rel=1e-5)  # both heads
    assert lp.logprob_token_ids.tolist() == [[0, 1]] * (len(prompt) - 1)


def test_v2_prompt_positions_of_a_value_request_carry_its_head_values():
    """V2's prompt-logprob worker (wrapped per runner at load): this step's rows of a value request,
    whether the prompt's last chunk (returned) or an earlier one (kept in progress)."""
    import numpy as np
    from vllm.v1.outputs import LogprobsTensors

    class Worker:  # V2's PromptLogprobsWorker contract
        def __init__(self):
            self.in_progress_prompt_logprobs = {"p": []}

        def compute_prompt_logprobs(self, logits_fn, hidden_states, input_batch, final):
            rows = hidden_states.shape[0] - (1 if final else 0)
            part = LogprobsTensors(torch.full((rows, 2), 77, dtype=torch.int32), torch.full((rows, 2), -1.0),
                                   torch.zeros(rows, dtype=torch.int64))
            self.in_progress_prompt_logprobs["p"].append(part)
            if not final:
                return {}
            whole = LogprobsTensors.cat(self.in_progress_prompt_logprobs["p"])
            self.in_progress_prompt_logprobs["p"].clear()
            return {"p": whole}

    Runner = _v2_runner_class()
    Runner.prompt_logprobs_worker = None
    runner = Runner(layers="none")
    runner.load_model()
    runner.prompt_logprobs_worker = Worker()
    value_heads._v2_load_wrapping_prompt_worker(lambda self: None)(runner)
    runner.add_requests(SimpleNamespace(scheduled_new_reqs=[_new_req("p", {VALUE_HEADS_ARG: encode_heads([HEAD])})]))
    x = torch.randn(6, H)
    for part, final in ((x[:3], False), (x[3:], True)):
        batch = SimpleNamespace(req_ids=["p"], query_start_loc_np=np.array([0, part.shape[0]]))
        out = runner.prompt_logprobs_worker.compute_prompt_logprobs(None, part, batch, final)
    lp = out["p"]
    assert lp.logprobs[:, 0].tolist() == pytest.approx([_expected(x[i]) for i in range(5)], rel=1e-5)
    assert lp.logprob_token_ids[:, 0].tolist() == [0] * 5 and lp.logprobs[:, 1].tolist() == [-1.0] * 5
