"""The vLLM worker patches: probes and fallbacks, 16-token KV blocks on the CPU attention backend,
value heads on a stand-in runner (the seed fix is tested end to end in tests/e2e/test_openai_api.py;
every integration test serves with block 16)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from server import engine_patches
from server.engine_patches import allow_block_size_16, install_worker_patches


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

    status = install_worker_patches()
    assert status == {"value_heads": "installed", "block16": "installed", "seed_fix": "installed",
                      "lora_grouped": "installed", "lora_compiled": "installed"}
    from vllm.lora.punica_wrapper import punica_cpu

    from server import lora_cpu

    assert punica_cpu.bgmv_shrink is lora_cpu.bgmv_shrink and punica_cpu.sgmv_expand_slice is lora_cpu.sgmv_expand_slice
    assert punica_cpu.PunicaWrapperCPU.add_lora_linear is lora_cpu.CompiledPunica.add_lora_linear
    (size,) = CPUAttentionBackend.get_supported_kernel_block_sizes()
    assert size.base == 16
    import torch

    assert _get_attn_isa(torch.bfloat16, 16, 64) in ("vec16", "neon")  # the kernels that handle 16-token blocks


def _devices() -> list:
    import torch

    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("plain_logprobs", [False, True])
def test_value_heads_replace_the_logprob_slots_of_the_rows_that_ask_for_them(plain_logprobs, device):
    """The worker-side logic of patch_value_heads on a stand-in runner (the real engine is
    checked end to end in tests/e2e/test_guided.py). When only value rows want logprobs the
    sampler computes none; when another request wants real ones, they are kept for it."""
    from dataclasses import dataclass, field
    from types import SimpleNamespace

    import torch

    from server.engine_patches import VALUE_HEADS_ARG, encode_heads, patch_value_heads

    H = 4

    @dataclass
    class Meta:
        max_num_logprobs: int | None
        logprob_token_ids: dict = field(default_factory=dict)

    class Runner:
        def load_model(self):
            self.model = SimpleNamespace(compute_logits=lambda h: h.sum(-1, keepdim=True))

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            """Returns:
            tuple[logits_indices, spec_decode_metadata, max_num_sampled_tokens]"""
            return scheduler_output, None, 1

        def _sample(self, logits):
            n = logits.shape[0]
            self.asked = self.input_batch.sampling_metadata.max_num_logprobs
            real = None if self.asked is None else SimpleNamespace(
                logprobs=torch.full((n, self.asked + 1), -1.0, device=device),
                logprob_token_ids=torch.full((n, self.asked + 1), 77, dtype=torch.int64, device=device))
            return SimpleNamespace(sampled_token_ids=torch.zeros((n, 1), dtype=torch.int32, device=device),
                                   logprobs_tensors=real)

    patch_value_heads(Runner)
    patch_value_heads(Runner)  # idempotent
    runner = Runner()
    runner.load_model()
    heads = [[1.0, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 2.0, -1.0]]
    params = lambda extra: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))  # noqa: E731
    runner.requests = {"a": params(None), "b": params({VALUE_HEADS_ARG: encode_heads(heads)}), "c": params({"other": 1}),
                       "d": params({VALUE_HEADS_ARG: encode_heads(heads[1:])})}
    meta = Meta(max_num_logprobs=2)
    num_logprobs = {"b": 1, "d": 0} | ({"a": 2} if plain_logprobs else {})
    runner.input_batch = SimpleNamespace(req_ids=["a", "b", "c", "d"], sampling_metadata=meta, num_logprobs=num_logprobs)
    hidden = torch.arange(4 * H, dtype=torch.float32, device=device).reshape(4, H)  # the engine's, on its device
    out = runner._sample(runner.model.compute_logits(hidden))
    assert runner.asked == (2 if plain_logprobs else None)  # no vocabulary-wide logprobs unless someone wants them
    assert runner.input_batch.sampling_metadata is meta  # restored
    lp = out.logprobs_tensors
    assert lp.logprobs.device.type == device and lp.logprob_token_ids.device.type == device
    assert lp.logprobs[1, :2].tolist() == [hidden[1, 0] + 0.5, 2 * hidden[1, 3] - 1.0]  # w . h + b per head
    assert lp.logprobs[3, :1].tolist() == [2 * hidden[3, 3] - 1.0]
    assert lp.logprob_token_ids[1, :2].tolist() == [0, 1] and lp.logprob_token_ids[3, 0] == 0
    if plain_logprobs:  # the real logprobs of the other rows are untouched
        assert lp.logprob_token_ids[1, 2] == 77
        assert lp.logprobs[0].tolist() == [-1.0] * 3 and lp.logprobs[2].tolist() == [-1.0] * 3


def test_requests_of_one_value_share_their_heads_and_one_product_values_them():
    import torch

    from server.engine_patches import VALUE_HEADS_ARG, _head_values, _heads_of, encode_heads

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)  # 2 heads of 4 weights + a bias
    state = lambda w: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={VALUE_HEADS_ARG: encode_heads(w.tolist())}))  # noqa: E731
    a, b, c = (_heads_of(state(w), 4)[0] for w in (w1, w1, w2))
    assert a is b and c is not a  # parsed once per request; one tensor per distinct value
    x = torch.randn(3, 4, generator=g)
    expected = lambda ws: torch.stack([x[i] @ w[:, :4].T + w[:, 4] for i, w in enumerate(ws)])  # noqa: E731
    torch.testing.assert_close(_head_values([a, b, a], x), expected([w1, w1, w1]))
    torch.testing.assert_close(_head_values([a, c, b], x), expected([w1, w2, w1]))


def test_value_heads_on_residual_layers_read_the_aux_hidden_states_at_the_sampled_rows(monkeypatch):
    """A head on layer k reads the residual stream vLLM returns as an auxiliary hidden state
    (EAGLE-3's mechanism), at the row that samples each request's token (`logits_indices`),
    RMS-normalised as valuefn does; a request naming a layer the engine does not expose gets NaN."""
    from dataclasses import dataclass, field
    from types import SimpleNamespace

    import torch
    import vllm.model_executor.models.interfaces as interfaces

    from server.engine_patches import VALUE_HEADS_ARG, VALUE_LAYERS_ARG, encode_heads, patch_value_heads
    from valuefn.model import rms_normalise

    H, tokens = 4, 7
    monkeypatch.setenv("IRO_ENGINE_VALUE_LAYERS", "3")
    monkeypatch.setattr(interfaces, "supports_eagle3", lambda model: True)

    @dataclass
    class Meta:
        max_num_logprobs: int | None
        logprob_token_ids: dict = field(default_factory=dict)

    class Model:
        def set_aux_hidden_state_layers(self, layers):
            self.layers = layers

        def __call__(self, x):
            return self.forward(x)

        def forward(self, x):  # (tokens, H) final states; the stream after layer 3 is 10x them + 1
            return x, [x * 10 + 1]

        def compute_logits(self, h):
            return h.sum(-1, keepdim=True)

    class Runner:
        speculative_config = None
        use_aux_hidden_state_outputs = False
        model_config = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=6))

        def load_model(self):
            self.model = Model()

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            """Returns:
            tuple[logits_indices, spec_decode_metadata, max_num_sampled_tokens]"""
            return torch.tensor([2, 4, 6]), None, 1

        def _sample(self, logits):
            n = logits.shape[0]
            return SimpleNamespace(sampled_token_ids=torch.zeros((n, 1), dtype=torch.int32), logprobs_tensors=None)

    patch_value_heads(Runner)
    runner = Runner()
    runner.load_model()
    assert runner.model.layers == (3,)
    head = [1.0, 0.0, 0.0, 2.0, 0.5]
    params = lambda extra: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))  # noqa: E731
    runner.requests = {"a": params({VALUE_HEADS_ARG: encode_heads([head]), VALUE_LAYERS_ARG: [3]}),
                       "b": params({VALUE_HEADS_ARG: encode_heads([head])}),
                       "c": params({VALUE_HEADS_ARG: encode_heads([head]), VALUE_LAYERS_ARG: [4]})}
    runner.input_batch = SimpleNamespace(req_ids=["a", "b", "c"], sampling_metadata=Meta(max_num_logprobs=0),
                                         num_logprobs={"a": 0, "b": 0, "c": 0})
    x = torch.randn(tokens, H)
    indices, _, _ = runner._prepare_inputs(None, None)
    hidden = runner.model(x)  # the wrapper keeps the aux states and hands back the final ones only
    assert torch.equal(hidden, x)
    out = runner._sample(runner.model.compute_logits(hidden[indices]))
    values = out.logprobs_tensors.logprobs[:, 0]
    w, b = torch.tensor(head[:-1]), head[-1]
    stream = rms_normalise(x[indices[0]] * 10 + 1)
    assert values[0].item() == pytest.approx(float(stream @ w + b), rel=1e-5)  # layer 3, row 2 of the forward
    assert values[1].item() == pytest.approx(float(x[indices[1]] @ w + b), rel=1e-5)  # the final state
    assert torch.isnan(values[2])  # layer 4 is not exposed


@pytest.fixture
def fresh_status(monkeypatch):
    """An empty patch record, so a test sees its own outcomes (the real patches stay installed)."""
    monkeypatch.setattr(engine_patches, "STATUS", {})
    monkeypatch.setattr(engine_patches, "_warned", {})
    return engine_patches.STATUS


def _runner_class(name="Runner", **methods):
    return type(name, (), methods)


def test_a_runner_missing_a_wrapped_method_keeps_its_methods_and_records_why(fresh_status):
    """The fallback when vLLM renamed what a patch wraps: nothing is replaced, STATUS says why."""
    def _sample(self, logits, spec_decode_metadata):
        return "sampled"

    Runner = _runner_class(_sample=_sample)  # no _bookkeeping_sync
    ok = engine_patches.install(engine_patches.SEED_FIX, lambda: engine_patches.probe_seed_fix(Runner),
                                lambda: engine_patches.patch_seed_fix(Runner))
    assert not ok and Runner._sample is _sample and not hasattr(Runner, "_iro_seed_fix")
    assert fresh_status["seed_fix"] == "Runner._bookkeeping_sync is missing"


def test_a_changed_signature_or_a_missing_load_model_turns_engine_heads_off(fresh_status):
    def _sample(self, sampler_input):  # the parameter the patch relies on is gone
        return None

    Runner = _runner_class(_sample=_sample, load_model=lambda self: None)
    assert not engine_patches.install(engine_patches.VALUE_HEADS,
                                      lambda: engine_patches.probe_value_heads(Runner),
                                      lambda: engine_patches.patch_value_heads(Runner))
    assert fresh_status["value_heads"] == "Runner._sample no longer takes logits"
    assert not engine_patches.value_heads_installed() and Runner._sample is _sample

    NoLoader = _runner_class("NoLoader", _sample=lambda self, logits, spec_decode_metadata: None)
    engine_patches.install(engine_patches.VALUE_HEADS, lambda: engine_patches.probe_value_heads(NoLoader),
                           lambda: engine_patches.patch_value_heads(NoLoader))
    assert fresh_status["value_heads"] == "NoLoader.load_model is missing"


def test_the_seed_fix_is_skipped_when_vllm_no_longer_rewinds_generators(fresh_status):
    Runner = _runner_class(_sample=lambda self, logits: None,
                           _bookkeeping_sync=lambda self, sampler_output: None)  # no set_offset in its source
    with pytest.raises(engine_patches.PatchMismatch, match="no longer rewinds generators"):
        engine_patches.probe_seed_fix(Runner)


def test_the_lora_ops_are_left_alone_when_vllm_changes_their_arguments(fresh_status):
    from server import lora_cpu

    module = SimpleNamespace(__name__="punica_cpu", **{name: getattr(lora_cpu, name) for name in lora_cpu.OPS})
    engine_patches.probe_lora_grouped(module)
    module.bgmv_expand = lambda inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_input=True: None
    assert not engine_patches.install(engine_patches.LORA_GROUPED, lambda: engine_patches.probe_lora_grouped(module),
                                      lambda: engine_patches.patch_lora_grouped(module))
    assert "bgmv_expand no longer takes" in fresh_status["lora_grouped"]
    module.bgmv_expand = lora_cpu.bgmv_expand
    del module.sgmv_shrink
    with pytest.raises(engine_patches.PatchMismatch, match="sgmv_shrink is missing"):
        engine_patches.probe_lora_grouped(module)


class _Platform:
    @classmethod
    def check_and_update_config(cls, vllm_config):
        if vllm_config.lora_config is not None:  # vLLM's CPU platform: no compilation with LoRA
            vllm_config.mode = "none"


class _Wrapper:
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        self.updated = mapping

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        raise AssertionError("replaced")

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        raise AssertionError("replaced")

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs):
        raise AssertionError("replaced")

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        raise AssertionError("replaced")


def test_lora_compiled_keeps_compilation_on_and_the_wrapper_state_live(fresh_status, monkeypatch):
    from server import lora_cpu

    Platform, Wrapper = type("P", (_Platform,), {}), type("W", (_Wrapper,), {})
    engine_patches.probe_lora_compiled(Wrapper, Platform)
    engine_patches.patch_lora_compiled(Wrapper, Platform)
    config = SimpleNamespace(lora_config="lora", mode="compiled")
    Platform.check_and_update_config(config)
    assert (config.mode, config.lora_config) == ("compiled", "lora")  # only the switch was skipped
    plain = SimpleNamespace(lora_config=None, mode="compiled")
    Platform.check_and_update_config(plain)
    assert plain.mode == "compiled"
    wrapper = Wrapper()
    monkeypatch.setitem(lora_cpu.__dict__, "_ACTIVE", [None])
    wrapper.update_metadata("mapping", [], 1, 10)
    assert wrapper.updated == "mapping" and lora_cpu._ACTIVE[0] is wrapper  # what the ops read each step
    assert Wrapper.add_shrink is lora_cpu.CompiledPunica.add_shrink


def test_lora_compiled_is_off_when_asked_or_when_vllm_changes(fresh_status, monkeypatch):
    class Platform(_Platform):
        @classmethod
        def check_and_update_config(cls, vllm_config):
            vllm_config.lora_config = vllm_config.lora_config or None  # reads lora_config for something else too

    Wrapper = type("W", (_Wrapper,), {})
    with pytest.raises(engine_patches.PatchMismatch, match="lora_config once"):
        engine_patches.probe_lora_compiled(Wrapper, Platform)
    Wrapper.add_expand = lambda self, y, x, lora_b_stacked, output_slices: None
    with pytest.raises(engine_patches.PatchMismatch, match="add_expand no longer takes offset_start"):
        engine_patches.probe_lora_compiled(Wrapper, _Platform)
    monkeypatch.setenv(engine_patches.LORA_COMPILE_ENV, "0")
    assert not engine_patches.install(engine_patches.LORA_COMPILED,
                                      lambda: engine_patches.probe_lora_compiled(_Wrapper, _Platform), lambda: None)
    assert "IRO_LORA_COMPILE=0" in fresh_status["lora_compiled"]


def test_another_vllm_line_gets_no_patches_and_one_warning(fresh_status, monkeypatch, caplog):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with caplog.at_level(logging.WARNING, logger="server.engine_patches"):
        status = install_worker_patches()
        install_worker_patches()  # vLLM loads plugins once per process, but twice must not warn twice
    assert all("not the tested 0.32.x line" in why for why in status.values()) and len(status) == 5
    (record,) = [r for r in caplog.records if r.name == "server.engine_patches"]
    assert "value_heads" in record.message and "the scorer values candidates" in record.message
    assert "KV blocks of 32" in record.message
    assert not engine_patches.value_heads_installed()


def test_a_patch_that_raises_is_recorded_not_propagated(fresh_status):
    """vLLM calls plugins unguarded: an exception there would kill every engine process."""
    def boom():
        raise RuntimeError("internal layout changed")

    assert not engine_patches.install("value_heads", lambda: None, boom)
    assert fresh_status["value_heads"] == "RuntimeError: internal layout changed"


def _vllm_config(v2=False, max_logprobs=20):
    return SimpleNamespace(use_v2_model_runner=v2, model_config=SimpleNamespace(max_logprobs=max_logprobs))


def test_the_engine_offers_value_heads_only_when_the_worker_patch_took(fresh_status, monkeypatch):
    """What the server learns: 0 heads (the search then uses the scorer, tests/server/test_search.py)
    when the patch was skipped or the worker runs vLLM's V2 runner, which the patch does not reach."""
    from server.engine import engine_value_heads

    assert engine_value_heads(_vllm_config()) == 0  # nothing installed in this record
    fresh_status["value_heads"] = "installed"
    assert engine_value_heads(_vllm_config()) == 21
    assert engine_value_heads(_vllm_config(max_logprobs=-1)) == 64
    assert engine_value_heads(_vllm_config(v2=True)) == 0


def test_value_heads_patch_the_gpu_runner_that_the_cpu_runner_inherits_from():
    """One code path on both: `_sample` is wrapped on GPUModelRunner (the CPU runner has none of its
    own), `load_model` on each runner that defines one, and the seed fix on the CPU runner only."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    install_worker_patches()
    assert GPUModelRunner.__dict__.get("_iro_value_heads") and "_iro_value_heads" not in CPUModelRunner.__dict__
    assert GPUModelRunner.__dict__.get("_iro_keeps_hidden") and CPUModelRunner.__dict__.get("_iro_keeps_hidden")
    assert CPUModelRunner.__dict__.get("_iro_seed_fix") and "_iro_seed_fix" not in GPUModelRunner.__dict__
    assert engine_patches.value_heads_installed()


def test_the_cpu_engine_falls_back_to_32_token_blocks_without_the_patch(monkeypatch, caplog):
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from common.engine_args import cpu_block_size, supported_block_size

    monkeypatch.setattr(CPUAttentionBackend, "get_supported_kernel_block_sizes",
                        staticmethod(lambda kv_cache_spec=None: [MultipleOf(32)]))
    with caplog.at_level(logging.WARNING, logger="common.engine_args"):
        assert cpu_block_size(16) == 32
    assert "using 32" in caplog.text
    assert cpu_block_size(64) == 64
    assert supported_block_size(16, [MultipleOf(16)]) == 16 and supported_block_size(48, [MultipleOf(32)]) == 64
    assert supported_block_size(16, [128]) == 128


def test_the_engine_recipe_asks_vllm_for_the_fallback_block_size(monkeypatch):
    """What the engine is built with when the 16-token patch is missing (server and Ray jobs alike)."""
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from common.engine_args import EngineSettings, engine_kwargs

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # engine_kwargs leaves set variables alone
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    options = EngineSettings().engine_options()
    assert engine_kwargs(**options)["block_size"] == 16
    monkeypatch.setattr(CPUAttentionBackend, "get_supported_kernel_block_sizes",
                        staticmethod(lambda kv_cache_spec=None: [MultipleOf(32)]))
    assert engine_kwargs(**options)["block_size"] == 32
