"""What the OpenAI endpoints get back from a generator, plain or guided: one shape for both.

A generator runs a `Generation` (common.sampling) on some prompts and returns an `Outcome`
(`run`) or yields `Delta`s and then one `Outcome` (`stream`). `server.openai.responses` turns
either into the chat or completion wire format, so responses and streams are built in one place.
`PlainGenerator` samples with the engine; `server.guided.GuidedGenerator` runs the search.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from common.protocol import GuidanceInfo
from common.sampling import Generation
from server.engine import EngineClient, EngineRequest
from server.priority import preemptible


@dataclass
class Choice:
    """One finished choice of one prompt."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, Any]] | None = None  # vLLM's per-token {token id: Logprob}


@dataclass
class Delta:
    """New text of choice `index` of prompt `prompt` (streaming)."""

    prompt: int
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, Any]] | None = None
    guidance: GuidanceInfo | None = None


@dataclass
class Outcome:
    """Every prompt's choices (empty after a stream: the deltas carried them) and the totals."""

    choices: list[list[Choice]]
    completion_tokens: int
    """Every token generated (a guided search: every candidate's)."""
    guidance: GuidanceInfo | None = None
    returned_tokens: int | None = None
    """A guided search: the tokens of the choices it returned. None: every generated token was returned."""


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


class PlainGenerator:
    """Samples `generation.n` choices per prompt with the engine, as the request's `Sampling` says."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def _request(self, prompt_ids: list[int], generation: Generation) -> EngineRequest:
        assert generation.max_tokens is not None, "serving fills in max_tokens"
        return EngineRequest(prompt_ids=prompt_ids, n=generation.n, max_tokens=generation.max_tokens,
                             sampling=generation.sampling, adapter=generation.adapter)

    async def _final(self, prompt_ids: list[int], generation: Generation) -> list[Choice]:
        async def run():
            final = None
            async for final in self.engine.stream(self._request(prompt_ids, generation), f"req-{uuid.uuid4().hex}"):
                pass
            return final

        final = await preemptible(run)  # a batch line's request gives way to interactive ones
        outputs = sorted(final.outputs, key=lambda o: o.index)
        return [Choice(o.text, list(o.token_ids), o.finish_reason, o.logprobs) for o in outputs]

    async def run(self, prompts: list[list[int]], generation: Generation) -> Outcome:
        choices = await asyncio.gather(*[self._final(p, generation) for p in prompts])
        return Outcome(list(choices), sum(len(c.token_ids) for cs in choices for c in cs))

    async def stream(self, prompts: list[list[int]], generation: Generation) -> AsyncIterator[Delta | Outcome]:
        async def tagged(pi: int, prompt_ids: list[int]):
            async for out in self.engine.stream(self._request(prompt_ids, generation), f"req-{uuid.uuid4().hex}",
                                                delta=True):
                yield pi, out

        completion_tokens = 0
        async for pi, out in merge([tagged(pi, p) for pi, p in enumerate(prompts)]):
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                if o.text or o.finish_reason:
                    yield Delta(pi, o.index, o.text, list(o.token_ids), o.finish_reason, o.logprobs)
        yield Outcome([], completion_tokens)
