"""Guided requests: from a `Generation` with guidance (or a `<base>+<value>` model id) to a search,
and from the search's results to the generator shape of `server.openai.generate` (+ `guidance`
metadata). Serving builds the responses; nothing here calls back into it."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.protocol import GuidanceInfo, GuidanceParams
from common.sampling import Generation
from server.vllm_ext import grammar_prefix
from server.errors import GuidanceError, InvalidRequestError
from server.openai.generate import Choice, Delta, Outcome
from server.search import Beam, SearchParams, SearchResult, Searcher, common_prefix, cut_at_stop
from valuefn.scorer import ValueChain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuidedPlan:
    """A resolved guided request: the value chain (betas applied), the search and the value's name."""

    chain: ValueChain
    params: SearchParams
    name: str


class GuidedGenerator:
    """Runs value-guided searches for the OpenAI endpoints (same `run`/`stream` shape as `PlainGenerator`)."""

    def __init__(self, engine, scorer, values, *, max_candidates: int = 64, max_steps: int = 512, metrics=None):
        self.engine = engine
        self.scorer = scorer
        self.values = values
        self.max_candidates = max_candidates
        self.max_steps = max_steps
        self.metrics = metrics
        self.searcher = Searcher(engine, scorer, on_chunks=metrics.chunks.inc if metrics else None,
                                 on_engine_fallback=metrics.engine_value_fallbacks.inc if metrics else None)

    # ------------------------------------------------------------------ request -> search
    async def prepare(self, generation: Generation, value_from_model: str | None) -> GuidedPlan:
        """Resolve the value and the search settings; every refusal happens here, before any output."""
        g = generation.guidance or GuidanceParams()
        sampling = generation.sampling
        if sampling.logprobs is not None:
            raise InvalidRequestError("logprobs are not available with guidance", param="logprobs")
        spec = g.value or value_from_model
        if not spec:
            raise GuidanceError("guidance.value is required (or use model `<base>+<value>`)", param="guidance.value")
        chain = await self.values.chain_for(spec)
        d = chain.defaults
        mode = g.mode or d.mode
        w, k, l = (g.w if g.w is not None else d.w), (g.k if g.k is not None else d.k), (g.l if g.l is not None else d.l)
        for name, v in (("w", w), ("k", k), ("l", l)):
            if v < 1:
                raise GuidanceError(f"guidance.{name} must be >= 1 (got {v})", param=f"guidance.{name}", value=v)
        cost = w * k if mode == "cbs" else k
        if cost > self.max_candidates:
            raise GuidanceError(f"guidance asks for {cost} candidates per step (w*k); this server allows at most "
                                f"{self.max_candidates}", param="guidance.k", code="too_many_candidates")
        steps = math.ceil(generation.max_tokens / l) if mode == "cbs" and generation.max_tokens else 1
        if steps > self.max_steps:
            raise GuidanceError(f"guidance asks for up to {steps} search steps (max_tokens {generation.max_tokens} / "
                                f"guidance.l {l}); this server allows at most {self.max_steps}: set max_tokens "
                                f"(<= {self.max_steps * l} with this l) or a larger guidance.l",
                                param="guidance.l", code="too_many_steps")
        if g.betas is not None:
            if len(g.betas) != len(chain.links):
                raise GuidanceError(f"guidance.betas needs {len(chain.links)} values (one per version in the chain "
                                    f"{chain.versions}), got {len(g.betas)}", param="guidance.betas")
            betas = list(g.betas)
        elif g.beta is not None:
            betas = [g.beta] * len(chain.links)
        else:
            betas = chain.betas
        if any(b <= 0 for b in betas):
            raise GuidanceError("beta must be > 0", param="guidance.betas" if g.betas is not None else "guidance.beta")
        if sampling.temperature == 0 and (k > 1 or (mode == "cbs" and w > 1)):
            raise GuidanceError("guided decoding samples several candidates per step: it needs temperature > 0",
                                param="temperature", code="invalid_value")
        if generation.n > (w if mode == "cbs" else k):
            raise GuidanceError(f"n={generation.n} needs at least n beams (guidance.{'w' if mode == 'cbs' else 'k'})",
                                param="n")
        if sampling.structured is not None and mode == "cbs" and not grammar_prefix.supported():
            raise InvalidRequestError("response_format cannot be combined with chunk-level beam search on this "
                                      "vLLM version (use guidance.mode bon)", param="response_format")
        if list(betas) != chain.betas:
            chain = chain.with_betas(betas)
        params = SearchParams(mode=mode, w=w, k=k, l=l, max_tokens=generation.max_tokens, n=generation.n,
                              sampling=sampling, adapter=generation.adapter,
                              align=self.engine.kv_block_size if g.align_chunks else 1)
        return GuidedPlan(chain, params, spec.split("@")[0])

    def info(self, plan: GuidedPlan, results: list[SearchResult]) -> GuidanceInfo:
        scores = [b.score for r in results for b in r.beams]
        p = plan.params
        return GuidanceInfo(
            value=plan.name, versions=plan.chain.versions, betas=plan.chain.betas, mode=p.mode, w=p.w, k=p.k,
            l=p.l, chunks=sum(r.chunks for r in results),
            candidates_generated=sum(r.candidates_generated for r in results),
            candidates_scored=sum(r.candidates_scored for r in results),
            score=max(scores) if scores else None, scores=scores)

    # ------------------------------------------------------------------ whole answers
    async def run(self, prompts: list[list[int]], plan: GuidedPlan) -> Outcome:
        results = await asyncio.gather(*[self.searcher.run(plan.chain, p, plan.params) for p in prompts])
        choices = [[Choice(b.text, b.token_ids, b.finish_reason) for b in r.beams] for r in results]
        return Outcome(choices, sum(r.completion_tokens for r in results), self.info(plan, results))

    # ------------------------------------------------------------------ streaming
    async def stream(self, prompts: list[list[int]], plan: GuidedPlan) -> AsyncIterator[Delta | Outcome]:
        """The text every surviving beam agrees on, as it grows (the same for all n choices); then
        each choice's rest and finish reason, the last one carrying the guidance metadata."""
        params = plan.params
        queue: asyncio.Queue = asyncio.Queue()
        emitted = [""] * len(prompts)

        def text_of(ids: list[int]) -> str:
            text, _ = cut_at_stop(self.searcher.decode(ids), params.sampling.stop)
            return text.rstrip("\ufffd")

        def on_step_for(pi: int):
            def on_step(pool: list[Beam]) -> None:
                final = text_of(common_prefix([b.token_ids for b in pool]))
                if len(final) > len(emitted[pi]) and final.startswith(emitted[pi]):
                    queue.put_nowait((pi, final[len(emitted[pi]):]))
                    emitted[pi] = final
            return on_step

        async def run(pi: int, prompt_ids: list[int]) -> SearchResult:
            return await self.searcher.run(plan.chain, prompt_ids, params, on_step_for(pi))

        task = asyncio.ensure_future(asyncio.gather(*[run(pi, p) for pi, p in enumerate(prompts)]))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                pi, text = item
                for j in range(params.n):
                    yield Delta(pi, j, text)
            results: list[SearchResult] = task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        info = self.info(plan, results)
        for pi, r in enumerate(results):
            for j, beam in enumerate(r.beams):
                rest = beam.text[len(emitted[pi]):] if beam.text.startswith(emitted[pi]) else ""
                last = pi == len(results) - 1 and j == len(r.beams) - 1
                yield Delta(pi, j, rest, finish_reason=beam.finish_reason, guidance=info if last else None)
        yield Outcome([], sum(r.completion_tokens for r in results), info)
