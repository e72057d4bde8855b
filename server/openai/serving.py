"""Serving logic of the OpenAI endpoints: prompt rendering, validation, plain and guided generation.

Depends only on `EngineClient` (and, for guided requests, on a `GuidedSearch`), so it can be
driven by a scripted engine in tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.engine import EngineClient
from server.errors import EngineDeadError, InvalidRequestError, NotFoundError, OverloadedError
from server.openai.protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamChoice,
    ChatCompletionStreamResponse, ChatResponseMessage, ChatTokenLogprob, ChoiceLogprobs, CompletionChoice,
    CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionStreamResponse, DeltaMessage, ModelCard,
    ModelList, TopLogprob, UsageInfo,
)

log = logging.getLogger(__name__)


@dataclass
class RenderedPrompt:
    token_ids: list[int]
    text: str | None


def sse(payload: Any) -> str:
    body = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {body}\n\n"


async def merge(iterators: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Interleave several async iterators; closing the merge closes (aborts) all of them."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it):
        try:
            async for item in it:
                await queue.put(item)
        except BaseException as exc:  # forwarded to the consumer
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(it)) for it in iterators]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    """Handles /v1/models, /v1/completions and /v1/chat/completions."""

    def __init__(self, engine: EngineClient, *, max_n: int = 16, max_queue: int = 256, metrics=None,
                 guided=None, values=None, log_prompts: bool = False):
        self.engine = engine
        self.max_n = max_n
        self.max_queue = max_queue
        self.metrics = metrics
        self.guided = guided  # server.search.GuidedServing or None
        self.values = values  # valuefn registry manager or None
        self.log_prompts = log_prompts
        self._admitted = 0

    # ------------------------------------------------------------------ models
    @property
    def base_id(self) -> str:
        return self.engine.model_id

    policies = None
    """`server.policies.PolicyManager` when a policy registry is configured."""

    def list_models(self) -> ModelList:
        cards = [ModelCard(id=self.base_id, root=self.base_id, max_model_len=self.engine.max_model_len)]
        for name in (self.policies.names() if self.policies else []):  # vLLM's convention for LoRA adapters
            cards.append(ModelCard(id=name, root=self.base_id, parent=self.base_id, max_model_len=self.engine.max_model_len))
        for name in (self.values.names() if self.values else []):
            cards.append(ModelCard(id=f"{self.base_id}+{name}", root=self.base_id, parent=self.base_id,
                                   max_model_len=self.engine.max_model_len))
        return ModelList(data=cards)

    def resolve_model(self, model: str) -> str | None:
        """Return the value name a `<base>+<value>` model id asks for, None for the base model."""
        if self.policies is not None and self.policies.resolve(model, self.values):  # `<policy>[+<value>]`
            return model.partition("+")[2] or None
        if model == self.base_id:
            return None
        base, sep, value = model.partition("+")
        if sep and base == self.base_id and value and self.values and self.values.has(value.split("@")[0]):
            return value
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
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # template errors are the caller's messages' fault
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        return RenderedPrompt(self.engine.tokenizer.encode(text, add_special_tokens=False), text)

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

    def check_logit_bias(self, logit_bias: dict[int, float] | None) -> None:
        vocab = len(self.engine.tokenizer)
        bad = sorted(t for t in (logit_bias or {}) if t < 0 or t >= vocab)
        if bad:  # vLLM would raise a bare ValueError, and only once streaming has begun
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab}); got {bad[:5]}",
                                      param="logit_bias", code="invalid_value")

    def count_tokens(self, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        if self.metrics:
            self.metrics.prompt_tokens.inc(prompt_tokens)
            self.metrics.generation_tokens.inc(completion_tokens)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    # ------------------------------------------------------------------ chat
    async def create_chat_completion(self, request: ChatCompletionRequest):
        value = self.resolve_model(request.model)
        self.check_n(request.n)
        self.check_logit_bias(request.logit_bias)
        prompt = self.render_chat(request)
        max_tokens = self.check_lengths([prompt], request.requested_max_tokens())
        if self.log_prompts:
            log.info("chat prompt: %r", prompt.text)
        if value is not None or request.guidance is not None:
            return await self._guided(request, [prompt], max_tokens, value, chat=True)
        params = request.to_sampling_params(max_tokens, logprobs=request.logprobs_k(), stream=request.stream)
        if request.stream:
            return self._stream_chat(request, prompt, params)
        final = await self._final(prompt, params)
        choices = [ChatCompletionChoice(index=o.index, message=ChatResponseMessage(content=o.text),
                                        logprobs=self._chat_logprobs(o, request.top_logprobs or 0) if request.logprobs else None,
                                        finish_reason=o.finish_reason,
                                        token_ids=list(o.token_ids) if request.return_token_ids else None)
                   for o in final.outputs]
        usage = self.count_tokens(len(prompt.token_ids), sum(len(o.token_ids) for o in final.outputs))
        return ChatCompletionResponse(model=request.model, choices=choices, usage=usage,
                                      prompt_token_ids=prompt.token_ids if request.return_token_ids else None)

    async def _final(self, prompt: RenderedPrompt, params) -> Any:
        final = None
        async for final in self.engine.stream(prompt.token_ids, params, f"req-{uuid.uuid4().hex}"):
            pass
        return final

    def _chat_logprobs(self, output, top: int) -> ChoiceLogprobs:
        content = []
        for tok_id, entry in zip(output.token_ids, output.logprobs or []):
            chosen = entry[tok_id]
            tops = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]
            content.append(ChatTokenLogprob(
                token=chosen.decoded_token or "", logprob=max(chosen.logprob, -9999.0),
                bytes=list((chosen.decoded_token or "").encode()),
                top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=max(lp.logprob, -9999.0),
                                         bytes=list((lp.decoded_token or "").encode())) for _, lp in tops]))
        return ChoiceLogprobs(content=content)

    async def _stream_chat(self, request: ChatCompletionRequest, prompt: RenderedPrompt, params) -> AsyncIterator[str]:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def chunk(choices, usage=None):
            return sse(ChatCompletionStreamResponse(id=rid, created=created, model=request.model, choices=choices,
                                                    usage=usage))

        for i in range(request.n):
            yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        completion_tokens = 0
        async for out in self.engine.stream(prompt.token_ids, params, f"req-{uuid.uuid4().hex}"):
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                if o.text or o.finish_reason:
                    logprobs = self._chat_logprobs(o, request.top_logprobs or 0) if request.logprobs else None
                    yield chunk([ChatCompletionStreamChoice(index=o.index, delta=DeltaMessage(content=o.text or None),
                                                            logprobs=logprobs, finish_reason=o.finish_reason)])
        usage = self.count_tokens(len(prompt.token_ids), completion_tokens)
        if include_usage:
            yield chunk([], usage)
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ completions
    async def create_completion(self, request: CompletionRequest):
        value = self.resolve_model(request.model)
        self.check_n(request.n)
        self.check_logit_bias(request.logit_bias)
        if request.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        prompts = self.render_completion(request)
        if len(prompts) * request.n > self.max_n * 4:
            raise InvalidRequestError(f"too many prompts x n (limit {self.max_n * 4})", param="prompt")
        max_tokens = self.check_lengths(prompts, request.requested_max_tokens(), prompt_param="prompt")
        if value is not None or request.guidance is not None:
            if request.echo or request.logprobs is not None:
                raise InvalidRequestError("echo and logprobs are not available with guidance", param="guidance")
            return await self._guided(request, prompts, max_tokens, value, chat=False)
        params = request.to_sampling_params(max_tokens, logprobs=request.logprobs_k(), stream=request.stream)
        if request.stream:
            return self._stream_completion(request, prompts, params)
        finals = await asyncio.gather(*[self._final(p, params) for p in prompts])
        choices = []
        for pi, (prompt, final) in enumerate(zip(prompts, finals)):
            prefix = (prompt.text or self.engine.tokenizer.decode(prompt.token_ids)) if request.echo else ""
            for o in final.outputs:
                lp = self._completion_logprobs(o, len(prefix)) if request.logprobs is not None else None
                choices.append(CompletionChoice(index=pi * request.n + o.index, text=prefix + o.text, logprobs=lp,
                                                finish_reason=o.finish_reason,
                                                token_ids=list(o.token_ids) if request.return_token_ids else None))
        usage = self.count_tokens(sum(len(p.token_ids) for p in prompts),
                                  sum(len(o.token_ids) for f in finals for o in f.outputs))
        return CompletionResponse(model=request.model, choices=choices, usage=usage,
                                  prompt_token_ids=[p.token_ids for p in prompts] if request.return_token_ids else None)

    def _completion_logprobs(self, output, offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for tok_id, entry in zip(output.token_ids, output.logprobs or []):
            chosen = entry[tok_id]
            token = chosen.decoded_token or ""
            lp.tokens.append(token)
            lp.token_logprobs.append(max(chosen.logprob, -9999.0))
            lp.top_logprobs.append({(v.decoded_token or ""): max(v.logprob, -9999.0) for v in entry.values()})
            lp.text_offset.append(offset)
            offset += len(token)
        return lp

    async def _stream_completion(self, request: CompletionRequest, prompts: list[RenderedPrompt], params) -> AsyncIterator[str]:
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def tagged(pi, prompt):
            async for out in self.engine.stream(prompt.token_ids, params, f"req-{uuid.uuid4().hex}"):
                yield pi, out

        completion_tokens = 0
        offsets: dict[int, int] = {}
        if request.echo:
            for pi, prompt in enumerate(prompts):
                text = prompt.text or self.engine.tokenizer.decode(prompt.token_ids)
                for j in range(request.n):
                    offsets[pi * request.n + j] = len(text)
                    yield sse(CompletionStreamResponse(id=rid, created=created, model=request.model, choices=[
                        CompletionChoice(index=pi * request.n + j, text=text)]))
        async for pi, out in merge([tagged(pi, p) for pi, p in enumerate(prompts)]):
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                index = pi * request.n + o.index
                lp = None
                if request.logprobs is not None:
                    lp = self._completion_logprobs(o, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(o.text)
                if o.text or o.finish_reason:
                    yield sse(CompletionStreamResponse(id=rid, created=created, model=request.model, choices=[
                        CompletionChoice(index=index, text=o.text, logprobs=lp, finish_reason=o.finish_reason)]))
        usage = self.count_tokens(sum(len(p.token_ids) for p in prompts), completion_tokens)
        if include_usage:
            yield sse(CompletionStreamResponse(id=rid, created=created, model=request.model, choices=[], usage=usage))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ guided
    async def _guided(self, request, prompts: list[RenderedPrompt], max_tokens: int, value: str | None, chat: bool):
        if self.guided is None:
            raise InvalidRequestError("value-guided decoding is not enabled on this server", param="guidance")
        return await self.guided.handle(self, request, prompts, max_tokens, value, chat=chat)
