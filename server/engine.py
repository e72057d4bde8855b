"""The engine interface the serving code depends on, and its vLLM implementation.

Serving and search talk to `EngineClient`, never to vLLM directly, so the search loop can be
unit-tested with a scripted engine. `VllmEngine` wraps one vLLM `AsyncLLM` holding the frozen
base model; every prompt reaches it as token ids.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from common.engine_args import check_lora_on_cpu, engine_kwargs, on_cuda, prepare_engine_process
from common.sampling import Sampling
from server.vllm_ext.grammar_prefix import GRAMMAR_PREFIX_ARG
from server.vllm_ext.wire import VALUE_HEADS_ARG, VALUE_LAYERS_ARG, encode_heads, token_values
from server.vllm_ext.worker import REPORT_METHOD, WORKER_EXTENSION, combine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    """`n` continuations of `prompt_ids`, sampled as `sampling` says (engine-agnostic).

    Plain requests and the search's chunk requests are both this; only the engine turns it into
    vLLM's `SamplingParams` (`to_sampling_params`)."""

    prompt_ids: list[int]
    n: int
    max_tokens: int
    sampling: Sampling = Sampling()
    detokenize: bool = True
    """False: the engine skips detokenising (Sample.text is empty); stop strings need it."""
    value_heads: tuple[tuple[float, ...], ...] | None = None
    """m linear heads (D weights + bias each) on the engine's hidden states: each sample then
    carries `token_values`, the heads' outputs at the position that sampled each token."""
    value_layers: tuple[int, ...] | None = None
    """The residual-stream layers the heads read (RMS-normalised, concatenated: D = H x layers);
    None: the final normed hidden state (D = H)."""
    grammar_prefix: int = 0
    """The last `grammar_prefix` prompt tokens were generated under `sampling.structured` already
    (a beam's earlier chunks): the constraint continues after them (`server.grammar_prefix`)."""
    adapter: Any = None
    """The policy's LoRA adapter (`Generation.adapter`, a vLLM `LoRARequest`); None: the base model."""
    prompt_values: bool = False
    """With `value_heads`: the heads' values at every prompt position instead of at the sampled
    tokens (`Sample.prompt_values`): how a given response is valued in the engine (`/v1/score`)."""
    chunk_until: tuple[str, ...] = ()
    """A search's step delimiters (`guidance.chunk_until`): strings that end this chunk, not the answer.
    They reach vLLM as more stop strings, kept in the output; `Sample.stop_reason` tells them apart."""
    affinity: int | None = None
    """Requests with the same affinity go to the same data-parallel engine (a search sets its prompt's
    hash), so a search's chunks share one prefix cache; None: vLLM balances the request."""


def to_sampling_params(request: EngineRequest, *, delta: bool = False) -> Any:
    """vLLM's `SamplingParams` for `request`: the one place where our sampling settings meet vLLM's.

    Every field of `Sampling` is mapped here (tests/server/test_sampling.py checks it)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    from server.errors import InvalidRequestError

    s = request.sampling
    extra_args: dict[str, Any] = {}
    logprobs, prompt_logprobs = s.logprobs, None
    if request.value_heads:
        if logprobs is not None:
            raise InvalidRequestError("logprobs cannot be combined with engine value heads", param="logprobs")
        if request.prompt_values:
            prompt_logprobs = len(request.value_heads) - 1
        else:
            logprobs = len(request.value_heads) - 1
        extra_args[VALUE_HEADS_ARG] = encode_heads(request.value_heads)
        if request.value_layers:
            extra_args[VALUE_LAYERS_ARG] = list(request.value_layers)
    structured = None
    if s.structured is not None:
        structured = (StructuredOutputsParams(json_object=True) if s.structured.kind == "json_object"
                      else StructuredOutputsParams(json=s.structured.schema))
        if request.grammar_prefix:
            extra_args[GRAMMAR_PREFIX_ARG] = request.grammar_prefix
    try:
        return SamplingParams(
            n=request.n, max_tokens=request.max_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1, min_p=s.min_p, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty,
            logit_bias=s.logit_bias_dict(), seed=s.seed, stop=list(dict.fromkeys(s.stop + request.chunk_until)) or None,
            include_stop_str_in_output=bool(request.chunk_until),  # a step keeps its delimiter
            stop_token_ids=list(s.stop_token_ids) or None, ignore_eos=s.ignore_eos,
            min_tokens=min(s.min_tokens, request.max_tokens), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
            detokenize=request.detokenize or bool(s.stop) or bool(request.chunk_until), extra_args=extra_args or None,
            flat_logprobs=bool(request.value_heads))  # values: a few flat lists per request, no dict per token
    except VLLMClientError as exc:  # e.g. n > 1 with temperature 0 (greedy)
        raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None), code="invalid_value") from exc


@dataclass
class Sample:
    """One finished continuation."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" (EOS or stop string) | "length" | None
    stop_reason: str | int | None = None  # the stop string or token that ended it
    token_values: list[list[float]] | None = None  # per sampled token, EngineRequest.value_heads' outputs
    prompt_values: list[list[float]] | None = None
    """With `EngineRequest.prompt_values`: per prompt token i, the heads' outputs at position i - 1
    (entry 0 empty), the value of token i as a sampled token's is."""


class EngineClient(abc.ABC):
    """What serving and search need from an inference engine."""

    model_id: str
    max_model_len: int
    eos_token_ids: list[int]

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any: ...

    @abc.abstractmethod
    def stream(self, request: EngineRequest, request_id: str, *, delta: bool = False) -> AsyncIterator[Any]:
        """Yield vLLM `RequestOutput`s for one request (aborted when the iterator is closed); with
        `delta`, each output holds only the new tokens, else one final output."""

    def check(self, request: EngineRequest) -> None:
        """Raise `InvalidRequestError` for settings the engine refuses, before a response (or a
        stream's 200) is sent. Engines that refuse nothing need not override it."""

    @abc.abstractmethod
    async def sample(self, request: EngineRequest) -> list[Sample]:
        """Return `request.n` finished continuations."""

    max_value_heads = 0
    """How many `EngineRequest.value_heads` the engine evaluates per request (0: none)."""

    value_layers: tuple[int, ...] = ()
    """The residual-stream layers heads may read (`EngineRequest.value_layers`); the final hidden
    state is always available when `max_value_heads` > 0."""

    kv_block_size = 1
    """Tokens per KV-cache block its prefix cache reuses (whole blocks only); 1: any prefix."""

    values_prompts = False
    """Whether `EngineRequest.prompt_values` works (the heads at prompt positions: `/v1/score`)."""

    @property
    def errored(self) -> bool:
        return False

    def in_flight(self) -> int:
        return 0

    def shutdown(self) -> None:  # pragma: no cover - trivial default
        pass


def value_heads_from_report(report: dict, vllm_config: Any) -> tuple[int, tuple[int, ...]]:
    """(heads per request, layers) the engine's workers compute, from their combined report
    (`server.vllm_ext.worker.combine`): (0, ()) unless every worker's runner took the value-head
    patch; the heads ride in logprob slots, so at most `max_logprobs` + 1 of them."""
    if report.get("value_heads") != "installed":
        return 0, ()
    max_logprobs = vllm_config.model_config.max_logprobs  # -1: no limit
    return (max_logprobs + 1 if max_logprobs >= 0 else 64), tuple(report.get("value_layers") or ())


PROBE_IDS = [1, 2, 3, 4]
"""The test sequence a new engine value is checked on (the loader's own test forward uses the same)."""


def engine_value_probe(engine: EngineClient, loop: asyncio.AbstractEventLoop) -> Callable:
    """`ValueLoader(engine_probe=...)`: run a value's heads in `engine` on a short test sequence (one
    greedy token), from the loader's thread; None when the engine does not compute those heads, so
    the loader builds the value's backbone as before. Requests in flight go on meanwhile: this is
    one more tiny request in the engine's batch."""

    def probe(heads: tuple, layers: tuple[int, ...] | None):
        if len(heads) > engine.max_value_heads or not set(layers or ()) <= set(engine.value_layers):
            return None
        request = EngineRequest(PROBE_IDS, n=1, max_tokens=1, sampling=Sampling(temperature=0.0), detokenize=False,
                                value_heads=tuple(heads), value_layers=layers)
        samples = asyncio.run_coroutine_threadsafe(engine.sample(request), loop).result(timeout=300)
        return samples[0].token_values

    return probe


class VllmEngine(EngineClient):
    """A vLLM `AsyncLLM` for the frozen base model."""

    def __init__(self, llm: Any, model_id: str):
        self._llm = llm
        self.model_id = model_id
        self.max_model_len = llm.model_config.max_model_len
        self._tokenizer = llm.get_tokenizer()
        eos = {self._tokenizer.eos_token_id}
        gen_eos = llm.model_config.hf_config.eos_token_id
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_token_ids = sorted(e for e in eos if e is not None)
        self._in_flight = 0
        self.report: dict = {"value_heads": "the workers have not reported yet", "value_layers": [], "patches": {}}
        self.settings: Any = None  # the EngineSettings it was started with (`start`)
        cache = llm.vllm_config.cache_config
        self.kv_block_size = cache.block_size if cache.enable_prefix_caching else 1
        compiled = int(llm.vllm_config.compilation_config.mode) != 0  # not CompilationMode.NONE
        log.info("engine: %s, LoRA %s", "compiled" if compiled else "not compiled (eager)",
                 "on (policy adapters)" if llm.vllm_config.lora_config is not None else "off")

    @classmethod
    def start(cls, model_path: str, model_id: str, *, lora: dict | None = None, **options) -> "VllmEngine":
        """Build the engine (blocking; ~25 s on CPU with enforce_eager, ~55 s compiled). `options` are
        `EngineSettings` fields (`ServerSettings.engine_options()`); `lora` is
        `ServerSettings.lora_options()` (policy adapters)."""
        from common.engine_args import EngineSettings

        settings = EngineSettings.model_validate(options)  # unset fields: IRO_* or their defaults
        prepare_engine_process(settings)
        kwargs = engine_kwargs(settings)
        if lora and not on_cuda():
            check_lora_on_cpu(model_path)  # a MoE model would start, then die at its first request
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=model_path, served_model_name=[model_id], disable_log_stats=True, **kwargs,
                               worker_extension_cls=WORKER_EXTENSION,  # the workers report what they run
                               **(lora or {}))
        engine = cls(AsyncLLM.from_engine_args(args), model_id)
        engine.settings = settings
        return engine

    async def read_worker_report(self) -> dict:
        """Ask every worker what it installed and computes (`server.vllm_ext.worker`), and offer
        value heads to searches only as far as all of them compute them. Run once after `start`."""
        self.report = combine(await self._llm.collective_rpc(REPORT_METHOD))
        self.max_value_heads, self.value_layers = value_heads_from_report(self.report, self._llm.vllm_config)
        self.values_prompts = self.max_value_heads > 0  # the same patch values prompt positions
        if self.max_value_heads:
            log.info("engine values: computed in the engine by %s (layers %s%s)", self.report["runner"],
                     ",".join(map(str, self.value_layers)) or "none",
                     f"; {self.report['value_layers_off']}" if self.report.get("value_layers_off") else "")
        else:
            log.warning("engine values: the scorer computes them; the engine's workers do not (%s)",
                        self.report["value_heads"])
        from server.doctor import collect, format_text

        log.info("iro doctor (the engine as started):\n%s", format_text(collect(self.settings, self.report)))
        return self.report

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _dp_rank(self, request: EngineRequest) -> int | None:
        """The data-parallel engine for `request` (`EngineRequest.affinity`); None with one engine."""
        size = self._llm.vllm_config.parallel_config.data_parallel_size
        return request.affinity % size if size > 1 and request.affinity is not None else None

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    def in_flight(self) -> int:
        return self._in_flight

    async def stream(self, request: EngineRequest, request_id: str, *, delta: bool = False) -> AsyncIterator[Any]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead, EngineGenerateError

        from server.errors import EngineDeadError, InvalidRequestError, UnavailableError
        params = to_sampling_params(request, delta=delta)
        self._in_flight += 1
        try:
            async for output in self._llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params,
                                                   request_id, lora_request=request.adapter,
                                                   data_parallel_rank=self._dp_rank(request)):
                if any(o.finish_reason == "error" for o in output.outputs):  # vLLM failed this request alone
                    if request.sampling.structured is not None:  # its grammar did not compile
                        raise InvalidRequestError("response_format: the engine could not compile or apply this "
                                                  "schema", param="response_format", code="invalid_value")
                    raise UnavailableError("the inference engine failed on this request; retry", code="engine_error")
                yield output
        except VllmEngineDead as exc:  # our error types answer 503 without an "Exception in ASGI app" trace
            raise EngineDeadError("the inference engine died; the server is shutting down", code="engine_dead") from exc
        except EngineGenerateError as exc:
            raise UnavailableError("the inference engine failed on this request; retry", code="engine_error") from exc
        except VLLMClientError as exc:  # vLLM's own request validation: the caller's fault
            raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None), code="invalid_value") from exc
        finally:
            self._in_flight -= 1

    def check(self, request: EngineRequest) -> None:
        to_sampling_params(request)  # vLLM validates its SamplingParams when they are built

    async def sample(self, request: EngineRequest) -> list[Sample]:
        final = None
        async for final in self.stream(request, f"chunk-{uuid.uuid4().hex}"):
            pass
        assert final is not None
        m = len(request.value_heads or ())
        prompt = token_values(final.prompt_logprobs, m) if m and request.prompt_values else None
        return [Sample(list(o.token_ids), o.text, o.finish_reason, o.stop_reason,
                       token_values(o.logprobs, m) if m and not request.prompt_values else None, prompt)
                for o in final.outputs]

    def shutdown(self) -> None:
        self._llm.shutdown()
