"""Serving logic of the OpenAI endpoints: models, admission, prompts, validation, and the choice
between plain sampling and the value-guided search.

A request becomes one `Generation` (`request.to_generation()`); serving checks it against the
model and the context, picks `PlainGenerator` or the `GuidedGenerator`, and hands both the same
object; `server.openai.responses` builds the answer. Depends only on `EngineClient` (and, for
guided requests, a guided generator), so it can be driven by a scripted engine in tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import anyio

from common import protocol
from common.protocol import (
    ChatCompletionRequest, CompletionRequest, CompletionTokensDetails, ModelCard, ModelList, UsageInfo,
)
from common.sampling import Generation
from server.engine import EngineClient, EngineRequest
from server.errors import EngineDeadError, InvalidRequestError, NotFoundError, OverloadedError, UnavailableError
from server.openai import responses
from server.openai.generate import PlainGenerator
from server.settings import DEFAULT_KEY_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, checked before any work starts (`ServerSettings` fills it in;
    the defaults are the bounds the OpenAPI document publishes)."""

    max_stop: int = protocol.MAX_STOP
    max_stop_token_ids: int = protocol.MAX_STOP_TOKEN_IDS
    max_logit_bias: int = protocol.MAX_LOGIT_BIAS
    max_prompts: int = protocol.MAX_PROMPTS

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(max_stop=settings.max_stop, max_stop_token_ids=settings.max_stop_token_ids,
                   max_logit_bias=settings.max_logit_bias, max_prompts=settings.max_prompts)

    def check(self, request) -> None:
        """400 naming the first list field over its limit."""
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        sizes = (("stop", len(stops), self.max_stop),
                 ("stop_token_ids", len(request.stop_token_ids or ()), self.max_stop_token_ids),
                 ("logit_bias", len(request.logit_bias or {}), self.max_logit_bias))
        for param, size, limit in sizes:
            if size > limit:
                raise InvalidRequestError(f"{param} has {size} entries; this server allows at most {limit}",
                                          param=param, code="too_many_entries")
        prompt = getattr(request, "prompt", None)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > self.max_prompts:
            raise InvalidRequestError(f"prompt holds {len(prompt)} prompts; this server allows at most "
                                      f"{self.max_prompts} per request", param="prompt", code="too_many_prompts")


async def off_loop(limiter: anyio.CapacityLimiter, fn, *args):
    """Run CPU-heavy request preparation (tokenization, chat templating) in a worker thread, so a
    2 MB prompt does not stall every other request's event loop. One thread per server, as vLLM's
    own tokenizer executor: the tokenizer is shared."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)


@dataclass
class RenderedPrompt:
    token_ids: list[int]
    text: str | None


def render_chat(tokenizer, messages) -> RenderedPrompt:
    """The chat template applied to `messages` (`ChatMessage`s), as token ids and text."""
    rendered = []
    for m in messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls is not None:
            message["tool_calls"] = m.tool_calls
        rendered.append(message)
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # template errors are the caller's messages' fault
        raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
    return RenderedPrompt(tokenizer.encode(text, add_special_tokens=False), text)


class OpenAIServing:
    """Handles /v1/models, /v1/completions and /v1/chat/completions."""

    def __init__(self, engine: EngineClient, *, max_n: int = 16, max_queue: int = 256, metrics=None,
                 guided=None, values=None, log_prompts: bool = False, limits: Limits = Limits(),
                 tokenizer_limiter: anyio.CapacityLimiter | None = None):
        self.engine = engine
        self.max_n = max_n
        self.max_queue = max_queue
        self.limits = limits
        self.tokenizer_limiter = tokenizer_limiter or anyio.CapacityLimiter(1)
        self.metrics = metrics
        self.plain = PlainGenerator(engine)
        self.guided = guided  # server.guided.GuidedGenerator or None
        self.values = values  # valuefn registry manager or None
        self.log_prompts = log_prompts
        self._admitted = 0

    # ------------------------------------------------------------------ models
    @property
    def base_id(self) -> str:
        return self.engine.model_id

    policies = None
    """`server.policies.PolicyManager` when a policy registry is configured."""
    stored = None
    """`server.stored.serving.StoredCompletions` when the database is open (`store: true`)."""
    store_everything = False
    store_error: str | None = None

    def list_models(self) -> ModelList:
        cards = [ModelCard(id=self.base_id, root=self.base_id, max_model_len=self.engine.max_model_len)]
        for name in (self.policies.names() if self.policies else []):  # vLLM's convention for LoRA adapters
            cards.append(ModelCard(id=name, root=self.base_id, parent=self.base_id, max_model_len=self.engine.max_model_len))
        for name in (self.values.names() if self.values else []):
            cards.append(ModelCard(id=f"{self.base_id}+{name}", root=self.base_id, parent=self.base_id,
                                   max_model_len=self.engine.max_model_len))
        return ModelList(data=cards)

    def resolve_model(self, model: str) -> tuple[str | None, object | None]:
        """(value, adapter) a model id asks for: the value name of `<base>+<value>` or
        `<policy>+<value>` (None: plain sampling) and the policy's LoRA adapter (None: the base model)."""
        policy = self.policies.resolve(model, self.values) if self.policies is not None else None
        if policy is not None:  # `<policy>[+<value>]`
            return model.partition("+")[2] or None, policy.lora
        if model == self.base_id:
            return None, None
        base, sep, value = model.partition("+")
        if sep and base == self.base_id and value and self.values and self.values.has(value.split("@")[0]):
            return value, None
        raise NotFoundError(f"The model `{model}` does not exist. See GET /v1/models.", param="model",
                            code="model_not_found")

    # ------------------------------------------------------------------ admission
    def engine_check(self) -> None:
        if self.engine.errored:
            raise EngineDeadError("the inference engine has died; the server is shutting down", code="engine_dead")

    def admit(self) -> None:
        if self._admitted >= self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc()
            raise OverloadedError(f"server busy: {self._admitted} requests in progress (limit {self.max_queue}); "
                                  "retry later", code="queue_full")
        self._admitted += 1

    def release(self) -> None:
        self._admitted -= 1

    # ------------------------------------------------------------------ prompts
    def render_chat(self, request: ChatCompletionRequest) -> RenderedPrompt:
        return render_chat(self.engine.tokenizer, request.messages)

    def render_completion(self, request: CompletionRequest) -> list[RenderedPrompt]:
        p = request.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        vocab = len(self.engine.tokenizer)
        out = []
        for item in prompts:
            if isinstance(item, str):
                out.append(RenderedPrompt(self.engine.tokenizer.encode(item, add_special_tokens=False), item))
            else:
                if not item or any(t < 0 or t >= vocab for t in item):
                    raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
                out.append(RenderedPrompt(list(item), None))
        for r in out:
            if not r.token_ids:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
        return out

    def check_lengths(self, prompts: list[RenderedPrompt], requested: int | None, *,
                      prompt_param: str = "messages") -> int:
        """Validate prompt and max_tokens against the context; return the max_tokens to use."""
        limit = self.engine.max_model_len
        longest = max(len(p.token_ids) for p in prompts)
        if longest >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {longest} "
                "tokens. Please reduce the length of the prompt.", param=prompt_param, code="context_length_exceeded")
        if requested is None:
            return limit - longest
        if longest + requested > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
        return requested

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise InvalidRequestError(f"n must be <= {self.max_n}", param="n", code="n_too_large")

    def check_token_ids(self, generation: Generation) -> None:
        vocab = len(self.engine.tokenizer)
        s = generation.sampling
        for param, ids in (("logit_bias", [t for t, _ in s.logit_bias]), ("stop_token_ids", s.stop_token_ids)):
            bad = sorted(t for t in ids if t < 0 or t >= vocab)
            if bad:  # vLLM would raise a bare ValueError, and only once streaming has begun
                raise InvalidRequestError(f"{param} token ids must be in [0, {vocab}); got {bad[:5]}",
                                          param=param, code="invalid_value")

    def count_tokens(self, prompt_tokens: int, completion_tokens: int, returned_tokens: int | None = None) -> UsageInfo:
        """`usage`: `completion_tokens` counts every generated token; a guided answer (`returned_tokens`
        set) says in `completion_tokens_details.reasoning_tokens` how many of them it did not return."""
        if self.metrics:
            self.metrics.prompt_tokens.inc(prompt_tokens)
            self.metrics.generation_tokens.inc(completion_tokens)
        details = None if returned_tokens is None else CompletionTokensDetails(
            reasoning_tokens=completion_tokens - returned_tokens)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens, completion_tokens_details=details)

    # ------------------------------------------------------------------ generation
    async def _generate(self, prompts: list[list[int]], generation: Generation, value: str | None, stream: bool):
        """Plain sampling or the search, as the request asks: an `Outcome`, or `Delta`s then one."""
        if value is None and generation.guidance is None:
            generator, plan = self.plain, generation
        elif self.guided is None:
            raise InvalidRequestError("value-guided decoding is not enabled on this server", param="guidance")
        else:
            generator, plan = self.guided, await self.guided.prepare(generation, value)
        n = generation.n if plan is generation else plan.params.k  # a chunk request samples k per beam
        self.engine.check(EngineRequest(prompts[0], n=n, max_tokens=generation.max_tokens or 1,
                                        sampling=generation.sampling, adapter=generation.adapter))
        if stream:
            return generator.stream(prompts, plan)
        return await generator.run(prompts, plan)

    async def create_chat_completion(self, request: ChatCompletionRequest, *, api_key_name: str = DEFAULT_KEY_NAME):
        """The answer (or its stream); a stored one (`store: true`) belongs to `api_key_name`."""
        value, adapter = self.resolve_model(request.model)
        store = self._will_store(request)
        self.limits.check(request)
        generation = replace(request.to_generation(), adapter=adapter)
        self.check_n(generation.n)
        self.check_token_ids(generation)
        prompt = await off_loop(self.tokenizer_limiter, self.render_chat, request)
        generation = replace(generation, max_tokens=self.check_lengths([prompt], generation.max_tokens))
        if self.log_prompts:
            log.info("chat prompt: %r", prompt.text)
        result = await self._generate([prompt.token_ids], generation, value, request.stream)
        if request.stream:
            return responses.chat_stream(request, prompt.token_ids, result, self.count_tokens)
        usage = self.count_tokens(len(prompt.token_ids), result.completion_tokens, result.returned_tokens)
        response = responses.chat_response(request, prompt.token_ids, result, usage)
        if store:
            await self._store(request, response, prompt, result, value, adapter, api_key_name)
        return response

    def _will_store(self, request: ChatCompletionRequest) -> bool:
        """Whether this request's answer is stored: `store: true`, or the store-everything setting
        unless it says `store: false`; refused (not ignored) when it cannot be."""
        if request.store and request.stream:
            raise InvalidRequestError("store: true is not supported with stream: true yet", param="store",
                                      code="unsupported_value")
        if request.store and self.stored is None:
            raise UnavailableError(f"cannot store completions: the server's database is unavailable "
                                   f"({self.store_error or 'not configured'})", code="database_unavailable")
        store = bool(request.store) or (self.store_everything and request.store is None and not request.stream
                                        and self.stored is not None)
        if request.metadata and not store:
            raise InvalidRequestError("metadata is kept only with a stored completion: send store: true",
                                      param="metadata", code="unsupported_value")
        return store

    async def _store(self, request, response, prompt: RenderedPrompt, result, value, adapter,
                     api_key_name: str) -> None:
        from server.stored.protocol import StoredRecord
        from server.stored.serving import policy_of

        await self.stored.save(StoredRecord(
            id=response.id, created=response.created, model=request.model, metadata=request.metadata or {},
            request=request.model_dump(mode="json", exclude_none=True), response=response.model_dump(mode="json"),
            prompt_text=prompt.text, prompt_token_ids=prompt.token_ids,
            completion_token_ids=[c.token_ids for c in result.choices[0]],
            policy=policy_of(self.base_id, value, adapter, response.guidance)), api_key_name=api_key_name)

    async def create_completion(self, request: CompletionRequest):
        value, adapter = self.resolve_model(request.model)
        self.limits.check(request)
        generation = replace(request.to_generation(), adapter=adapter)
        self.check_n(generation.n)
        self.check_token_ids(generation)
        if request.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        p = request.prompt
        count = len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1
        if count * request.n > self.max_n * 4:  # counted before anything is tokenized
            raise InvalidRequestError(f"too many prompts x n (limit {self.max_n * 4})", param="prompt")
        prompts = await off_loop(self.tokenizer_limiter, self.render_completion, request)
        generation = replace(generation, max_tokens=self.check_lengths(prompts, generation.max_tokens,
                                                                       prompt_param="prompt"))
        if request.echo and (value is not None or generation.guidance is not None):
            raise InvalidRequestError("echo is not available with guidance", param="echo")
        ids = [p.token_ids for p in prompts]
        echoes = [(p.text or self.engine.tokenizer.decode(p.token_ids)) if request.echo else "" for p in prompts]
        result = await self._generate(ids, generation, value, request.stream)
        if request.stream:
            return responses.completion_stream(request, ids, echoes, result, self.count_tokens)
        usage = self.count_tokens(sum(len(p) for p in ids), result.completion_tokens, result.returned_tokens)
        return responses.completion_response(request, ids, echoes, result, usage)
