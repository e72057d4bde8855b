"""Chat and completion responses and event streams, built from a generator's `Outcome` / `Delta`s
(plain and guided alike): the one place that knows the wire shapes of answers."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from common.protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamChoice,
    ChatCompletionStreamResponse, ChatResponseMessage, ChatTokenLogprob, ChoiceLogprobs, CompletionChoice,
    CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionStreamResponse, DeltaMessage, TopLogprob,
    UsageInfo,
)
from server.openai.generate import Delta, Outcome

CountTokens = Callable[[int, int, int | None], UsageInfo]
"""(prompt tokens, completion tokens) -> usage (and metrics)."""


def sse(payload: Any) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


DONE = "data: [DONE]\n\n"


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf


def chat_logprobs(token_ids: list[int], logprobs, top: int) -> ChoiceLogprobs:
    content = []
    for tok_id, entry in zip(token_ids, logprobs or []):
        chosen = entry[tok_id]
        tops = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]
        content.append(ChatTokenLogprob(
            token=chosen.decoded_token or "", logprob=_logprob(chosen.logprob),
            bytes=list((chosen.decoded_token or "").encode()),
            top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=_logprob(lp.logprob),
                                     bytes=list((lp.decoded_token or "").encode())) for _, lp in tops]))
    return ChoiceLogprobs(content=content)


def completion_logprobs(token_ids: list[int], logprobs, offset: int) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for tok_id, entry in zip(token_ids, logprobs or []):
        chosen = entry[tok_id]
        token = chosen.decoded_token or ""
        lp.tokens.append(token)
        lp.token_logprobs.append(_logprob(chosen.logprob))
        lp.top_logprobs.append({(v.decoded_token or ""): _logprob(v.logprob) for v in entry.values()})
        lp.text_offset.append(offset)
        offset += len(token)
    return lp


# ----------------------------------------------------------------------------- chat
def chat_response(request: ChatCompletionRequest, prompt_ids: list[int], outcome: Outcome,
                  usage: UsageInfo) -> ChatCompletionResponse:
    ids = request.return_token_ids
    choices = [ChatCompletionChoice(
        index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
        logprobs=chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs or 0) if request.logprobs else None,
        token_ids=c.token_ids if ids else None) for i, c in enumerate(outcome.choices[0])]
    return ChatCompletionResponse(model=request.model, choices=choices, usage=usage, guidance=outcome.guidance,
                                  prompt_token_ids=prompt_ids if ids else None)


async def chat_stream(request: ChatCompletionRequest, prompt_ids: list[int], events: AsyncIterator[Delta | Outcome],
                      count_tokens: CountTokens) -> AsyncIterator[str]:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices, usage=None, guidance=None):
        return sse(ChatCompletionStreamResponse(id=rid, created=created, model=request.model, choices=choices,
                                                usage=usage, guidance=guidance))

    for i in range(request.n):
        yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    async for event in events:
        if isinstance(event, Outcome):
            usage = count_tokens(len(prompt_ids), event.completion_tokens, event.returned_tokens)
            if request.stream_options and request.stream_options.include_usage:
                yield chunk([], usage)
            break
        logprobs = (chat_logprobs(event.token_ids, event.logprobs, request.top_logprobs or 0)
                    if request.logprobs else None)
        yield chunk([ChatCompletionStreamChoice(index=event.index, delta=DeltaMessage(content=event.text or None),
                                                logprobs=logprobs, finish_reason=event.finish_reason)],
                    guidance=event.guidance)
    yield DONE


# ----------------------------------------------------------------------------- completions
def completion_response(request: CompletionRequest, prompts: list[list[int]], echoes: list[str], outcome: Outcome,
                        usage: UsageInfo) -> CompletionResponse:
    """`echoes`: each prompt's text when the request echoes it (else empty strings)."""
    ids = request.return_token_ids
    choices = []
    for pi, (echo, cs) in enumerate(zip(echoes, outcome.choices)):
        for j, c in enumerate(cs):
            lp = completion_logprobs(c.token_ids, c.logprobs, len(echo)) if request.logprobs is not None else None
            choices.append(CompletionChoice(index=pi * request.n + j, text=echo + c.text, logprobs=lp,
                                            finish_reason=c.finish_reason, token_ids=c.token_ids if ids else None))
    return CompletionResponse(model=request.model, choices=choices, usage=usage, guidance=outcome.guidance,
                              prompt_token_ids=prompts if ids else None)


async def completion_stream(request: CompletionRequest, prompts: list[list[int]], echoes: list[str],
                            events: AsyncIterator[Delta | Outcome], count_tokens: CountTokens) -> AsyncIterator[str]:
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices, usage=None, guidance=None):
        return sse(CompletionStreamResponse(id=rid, created=created, model=request.model, choices=choices,
                                            usage=usage, guidance=guidance))

    offsets: dict[int, int] = {}
    for pi, echo in enumerate(echoes):
        for j in range(request.n):
            offsets[pi * request.n + j] = len(echo)
            if echo:
                yield chunk([CompletionChoice(index=pi * request.n + j, text=echo)])
    async for event in events:
        if isinstance(event, Outcome):
            usage = count_tokens(sum(len(p) for p in prompts), event.completion_tokens, event.returned_tokens)
            if request.stream_options and request.stream_options.include_usage:
                yield chunk([], usage)
            break
        index = event.prompt * request.n + event.index
        lp = None
        if request.logprobs is not None:
            lp = completion_logprobs(event.token_ids, event.logprobs, offsets[index])
        offsets[index] += len(event.text)
        yield chunk([CompletionChoice(index=index, text=event.text, logprobs=lp, finish_reason=event.finish_reason)],
                    guidance=event.guidance)
    yield DONE
