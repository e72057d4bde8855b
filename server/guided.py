"""Guided requests: from a `Generation` with guidance (or a `<base>+<value>` model id) to a search,
and from the search's results to the generator shape of `server.openai.generate` (+ `guidance`
metadata). Serving builds the responses; nothing here calls back into it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.protocol import GuidanceInfo, GuidanceParams
from common.sampling import Generation
from common.search_settings import REASONING_EFFORT_BUDGETS
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
    budget_from: str | None = None
    """"budget_tokens" or "reasoning_effort": where `params.budget_tokens` came from."""
    reasoning_effort: str | None = None
    planned: tuple[str, ...] = ()
    """The widths planned from the budget (`plan_widths`)."""
    deadline_ms: int | None = None


def plan_widths(mode: str, candidates: int, given: dict, default_k: int) -> dict:
    """Widths for `mode` whose step samples at most `candidates` candidates (a budget divided by
    max_tokens): what `given` (the request's w, k, s) leaves open, search-and-learn style (k stays the
    value's default where it fits; the rest goes to beams, subtrees or particles).

    >>> plan_widths("cbs", 32, {}, 4), plan_widths("dvts", 32, {}, 4), plan_widths("pf", 32, {}, 4)
    ({'k': 4, 'w': 8}, {'w': 1, 'k': 4, 's': 8}, {'k': 32})
    """
    c = max(1, candidates)
    out = dict(given)
    if mode in ("pf", "bon"):
        out.setdefault("k", c)
    elif mode == "cbs":
        if "w" in out:
            out.setdefault("k", max(1, c // out["w"]))
        out.setdefault("k", min(default_k, c))
        out.setdefault("w", max(1, c // out["k"]))
    else:  # dvts: subtrees of one beam unless w is given
        out.setdefault("w", 1)
        out.setdefault("k", min(default_k, max(1, c // out["w"])))
        out.setdefault("s", max(1, c // (out["w"] * out["k"])))
    return {f: v for f, v in out.items() if f not in given}


class GuidedGenerator:
    """Runs value-guided searches for the OpenAI endpoints (same `run`/`stream` shape as `PlainGenerator`)."""

    def __init__(self, engine, scorer, values, *, max_candidates: int = 64, max_steps: int = 512, metrics=None,
                 effort_budgets: dict[str, float] | None = None, pf_temperature: float = 1.0,
                 clock=time.monotonic):
        self.engine = engine
        self.scorer = scorer
        self.values = values
        self.max_candidates = max_candidates
        self.max_steps = max_steps
        self.metrics = metrics
        self.effort_budgets = {**REASONING_EFFORT_BUDGETS, **(effort_budgets or {})}
        self.pf_temperature = pf_temperature
        self.searcher = Searcher(engine, scorer, on_chunks=metrics.chunks.inc if metrics else None,
                                 on_engine_fallback=metrics.engine_value_fallbacks.inc if metrics else None,
                                 clock=clock)

    # ------------------------------------------------------------------ request -> search
    async def prepare(self, generation: Generation, value_from_model: str | None) -> GuidedPlan:
        """Resolve the value and the search settings; every refusal happens here, before any output."""
        g = generation.guidance or GuidanceParams()
        sampling = generation.sampling
        effort = generation.reasoning_effort
        if sampling.logprobs is not None:
            raise InvalidRequestError("logprobs are not available with guidance", param="logprobs")
        spec = g.value or value_from_model
        if not spec:
            if effort not in (None, "none") and g == GuidanceParams():
                raise GuidanceError(f"reasoning_effort {effort!r} sets the token budget of a value-guided search, "
                                    "and this model samples plainly: use a model `<base>+<value>` (GET /v1/models) "
                                    "or guidance.value, or reasoning_effort 'none'", param="reasoning_effort")
            raise GuidanceError("guidance.value is required (or use model `<base>+<value>`)", param="guidance.value")
        chain = await self.values.chain_for(spec)
        d = chain.defaults
        mode = g.mode or d.mode
        # fields a mode has no use for are refused, never ignored
        if g.s is not None and mode != "dvts":
            raise GuidanceError(f"guidance.s (subtrees) applies to mode dvts, not {mode}", param="guidance.s")
        if g.w is not None and mode == "pf":
            raise GuidanceError("pf has no beams: its particles are guidance.k", param="guidance.w")
        for field, why in (("w", "it keeps no beams: its N is guidance.k"), ("l", "it samples whole answers, not chunks")):
            if getattr(g, field) is not None and mode == "bon":
                raise GuidanceError(f"guidance.{field} does not apply to mode bon: {why}", param=f"guidance.{field}")
        if g.chunk_until is not None and mode == "bon":
            raise GuidanceError("bon samples whole answers: there are no chunks to end at guidance.chunk_until "
                                "(use mode cbs, pf or dvts)", param="guidance.chunk_until")
        if effort is not None and g.budget_tokens is not None:
            raise GuidanceError("give either reasoning_effort or guidance.budget_tokens, not both",
                                param="reasoning_effort")
        max_tokens = generation.max_tokens
        budget, budget_from = g.budget_tokens, "budget_tokens" if g.budget_tokens is not None else None
        if effort is not None:
            budget, budget_from = math.ceil(self.effort_budgets[effort] * max_tokens), "reasoning_effort"
        given = {f: v for f in ("w", "k", "s") if (v := getattr(g, f)) is not None}
        if budget is not None:
            planned = plan_widths(mode, min(self.max_candidates, budget // max_tokens), given, d.k)
        elif mode == "pf":
            planned = {} if "k" in given else {"k": d.w * d.k}  # the samples per step of the value's cbs
        elif mode == "dvts":  # the value's w beams, as subtrees of one beam each unless s or w is given
            planned = {"w": 1, "s": d.w} if not {"w", "s"} & set(given) else (
                {"w": max(1, d.w // given["s"])} if "w" not in given else
                {"s": max(1, d.w // given["w"])} if "s" not in given else {})
        else:
            planned = {}
        widths = {"w": d.w, "k": d.k, "s": 1} | planned | given
        w, k, s_ = widths["w"], widths["k"], widths["s"]
        l = g.l if g.l is not None else d.l
        for name, v in (("w", w), ("k", k), ("l", l), ("s", s_)):
            if v < 1:
                raise GuidanceError(f"guidance.{name} must be >= 1 (got {v})", param=f"guidance.{name}", value=v)
        per_step = {"cbs": w * k, "dvts": s_ * w * k}.get(mode, k)
        if per_step > self.max_candidates:
            formula = {"cbs": "w*k", "dvts": "s*w*k"}.get(mode, "k")
            raise GuidanceError(f"guidance asks for {per_step} candidates per step ({formula}); this server allows "
                                f"at most {self.max_candidates}",
                                param="guidance.s" if mode == "dvts" and "s" in given else "guidance.k",
                                code="too_many_candidates")
        chunked = mode != "bon"
        steps = math.ceil(max_tokens / l) if chunked and max_tokens else 1
        if steps > self.max_steps:
            raise GuidanceError(f"guidance asks for up to {steps} search steps (max_tokens {max_tokens} / "
                                f"guidance.l {l}); this server allows at most {self.max_steps}: set max_tokens "
                                f"(<= {self.max_steps * l} with this l) or a larger guidance.l",
                                param="guidance.l", code="too_many_steps")
        if budget is not None:
            first = per_step * (min(l, max_tokens) if chunked else 1)
            if budget < first:
                what = (f"{per_step} candidates x {min(l, max_tokens)} tokens" if chunked
                        else f"one token for each of {per_step} answers")
                raise GuidanceError(f"the token budget ({budget}, from {budget_from}) is less than one search step "
                                    f"costs ({what} = {first}, mode {mode}): raise it, or lower "
                                    f"{'w, k or l' if chunked else 'k'}",
                                    param="reasoning_effort" if budget_from == "reasoning_effort"
                                    else "guidance.budget_tokens", code="budget_too_small")
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
        if sampling.temperature == 0 and per_step > 1:
            raise GuidanceError("guided decoding samples several candidates per step: it needs temperature > 0",
                                param="temperature", code="invalid_value")
        beams = {"cbs": w, "dvts": s_ * w}.get(mode, k)
        if generation.n > beams:
            field = {"cbs": "guidance.w", "dvts": "guidance.s x guidance.w", "pf": "guidance.k particles"}.get(
                mode, "guidance.k")
            raise GuidanceError(f"n={generation.n} needs at least n beams ({field} = {beams} with mode {mode})",
                                param="n")
        if sampling.structured is not None and chunked and not grammar_prefix.supported():
            raise InvalidRequestError(f"response_format cannot be combined with the chunked search {mode} on this "
                                      "vLLM version (use guidance.mode bon)", param="response_format")
        if list(betas) != chain.betas:
            chain = chain.with_betas(betas)
        params = SearchParams(mode=mode, w=w, k=k, l=l, s=s_, max_tokens=max_tokens, n=generation.n,
                              sampling=sampling, adapter=generation.adapter,
                              align=self.engine.kv_block_size if g.align_chunks else 1,
                              chunk_until=g.chunk_delimiters(), budget_tokens=budget,
                              deadline_s=g.deadline_ms / 1000 if g.deadline_ms is not None else None,
                              max_steps=self.max_steps if g.chunk_until is not None else None,
                              pf_temperature=(1.0 if g.beta is not None or g.betas is not None
                                              else self.pf_temperature))
        return GuidedPlan(chain, params, spec.split("@")[0], budget_from, effort,
                          tuple(f for f in planned if budget is not None), g.deadline_ms)

    def info(self, plan: GuidedPlan, results: list[SearchResult]) -> GuidanceInfo:
        scores = [b.score for r in results for b in r.beams]
        p = plan.params
        stopped = {r.stopped_by for r in results} - {None}
        return GuidanceInfo(
            value=plan.name, versions=plan.chain.versions, betas=plan.chain.betas, mode=p.mode, w=p.w, k=p.k,
            l=p.l, s=p.s if p.mode == "dvts" else None, chunk_until=list(p.chunk_until) or None,
            pf_temperature=p.pf_temperature if p.mode == "pf" else None,
            chunks=sum(r.chunks for r in results),
            candidates_generated=sum(r.candidates_generated for r in results),
            candidates_scored=sum(r.candidates_scored for r in results),
            steps=max((r.steps for r in results), default=0), tokens=sum(r.completion_tokens for r in results),
            budget_tokens=p.budget_tokens, budget_from=plan.budget_from, reasoning_effort=plan.reasoning_effort,
            planned=list(plan.planned), deadline_ms=plan.deadline_ms,
            elapsed_ms=round(1000 * max((r.elapsed_s for r in results), default=0.0), 3),
            stopped_by=next((why for why in ("deadline", "budget", "max_steps") if why in stopped), None),
            score=max(scores) if scores else None, scores=scores)

    # ------------------------------------------------------------------ whole answers
    async def run(self, prompts: list[list[int]], plan: GuidedPlan) -> Outcome:
        started = self.searcher.clock()
        results = await asyncio.gather(*[self.searcher.run(plan.chain, p, plan.params, started=started)
                                         for p in prompts])
        choices = [[Choice(b.text, b.token_ids, b.finish_reason) for b in r.beams] for r in results]
        return Outcome(choices, sum(r.completion_tokens for r in results), self.info(plan, results),
                       returned_tokens=sum(len(c.token_ids) for cs in choices for c in cs))

    # ------------------------------------------------------------------ streaming
    async def stream(self, prompts: list[list[int]], plan: GuidedPlan) -> AsyncIterator[Delta | Outcome]:
        """The text every surviving beam agrees on, as it grows (the same for all n choices); then
        each choice's rest and finish reason, the last one carrying the guidance metadata."""
        params = plan.params
        queue: asyncio.Queue = asyncio.Queue()
        emitted = [""] * len(prompts)
        started = self.searcher.clock()

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
            return await self.searcher.run(plan.chain, prompt_ids, params, on_step_for(pi), started=started)

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
        yield Outcome([], sum(r.completion_tokens for r in results), info,
                      returned_tokens=sum(len(b.token_ids) for r in results for b in r.beams))
