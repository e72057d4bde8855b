"""Guided requests: from an OpenAI request with `guidance` (or a `<base>+<value>` model id) to
a search, and from the search result back to the OpenAI response shape (+ `guidance` metadata)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from server.errors import GuidanceError
from server.openai.protocol import (
    ChatCompletionChoice, ChatCompletionResponse, ChatCompletionStreamChoice, ChatCompletionStreamResponse,
    ChatResponseMessage, CompletionChoice, CompletionResponse, CompletionStreamResponse, DeltaMessage, GuidanceInfo,
    GuidanceParams,
)
from server.search import Beam, SearchParams, SearchResult, Searcher, common_prefix, cut_at_stop
from valuefn.scorer import ValueChain

log = logging.getLogger(__name__)


class GuidedServing:
    def __init__(self, engine, scorer, values, *, max_candidates: int = 64, metrics=None):
        self.engine = engine
        self.scorer = scorer
        self.values = values
        self.max_candidates = max_candidates
        self.metrics = metrics
        self.searcher = Searcher(engine, scorer, on_chunks=metrics.chunks.inc if metrics else None)

    # ------------------------------------------------------------------ request -> search
    async def resolve(self, request, value_from_model: str | None,
                      max_tokens: int) -> tuple[ValueChain, SearchParams, str]:
        g = request.guidance or GuidanceParams()
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
        if g.betas is not None:
            if len(g.betas) != len(chain.links):
                raise GuidanceError(f"guidance.betas needs {len(chain.links)} values (one per version in the chain "
                                    f"{chain.versions}), got {len(g.betas)}", param="guidance.betas")
            betas = g.betas
        elif g.beta is not None:
            betas = [g.beta] * len(chain.links)
        else:
            betas = chain.betas
        if any(b <= 0 for b in betas):
            raise GuidanceError("beta must be > 0", param="guidance.betas" if g.betas is not None else "guidance.beta")
        if request.temperature == 0 and (k > 1 or (mode == "cbs" and w > 1)):
            raise GuidanceError("guided decoding samples several candidates per step: it needs temperature > 0",
                                param="temperature", code="invalid_value")
        if request.n > (w if mode == "cbs" else k):
            raise GuidanceError(f"n={request.n} needs at least n beams (guidance.{'w' if mode == 'cbs' else 'k'})",
                                param="n")
        if list(betas) != chain.betas:
            chain = chain.with_betas(betas)
        params = SearchParams(
            mode=mode, w=w, k=k, l=l, max_tokens=max_tokens, n=request.n, temperature=request.temperature,
            top_p=request.top_p, top_k=request.top_k, seed=request.seed, stop=tuple(request.stop_list()),
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            align=self.engine.kv_block_size if g.align_chunks else 1)
        return chain, params, spec.split("@")[0]

    def info(self, name: str, chain: ValueChain, params: SearchParams, results: list[SearchResult]) -> GuidanceInfo:
        scores = [b.score for r in results for b in r.beams]
        return GuidanceInfo(
            value=name, versions=chain.versions, betas=chain.betas, mode=params.mode, w=params.w, k=params.k,
            l=params.l, chunks=sum(r.chunks for r in results),
            candidates_generated=sum(r.candidates_generated for r in results),
            candidates_scored=sum(r.candidates_scored for r in results),
            score=max(scores) if scores else None, scores=scores)

    async def handle(self, serving, request, prompts, max_tokens: int, value_from_model: str | None, *, chat: bool):
        chain, params, name = await self.resolve(request, value_from_model, max_tokens)
        if request.stream:
            return self._stream(serving, request, prompts, chain, params, name, chat)
        results = await asyncio.gather(*[self.searcher.run(chain, p.token_ids, params) for p in prompts])
        usage = serving.count_tokens(sum(len(p.token_ids) for p in prompts), sum(r.completion_tokens for r in results))
        info = self.info(name, chain, params, results)
        ids = request.return_token_ids
        if chat:
            choices = [ChatCompletionChoice(index=i, message=ChatResponseMessage(content=b.text),
                                            finish_reason=b.finish_reason, token_ids=b.token_ids if ids else None)
                       for i, b in enumerate(results[0].beams)]
            return ChatCompletionResponse(model=request.model, choices=choices, usage=usage, guidance=info,
                                          prompt_token_ids=prompts[0].token_ids if ids else None)
        choices = [CompletionChoice(index=pi * params.n + j, text=b.text, finish_reason=b.finish_reason,
                                    token_ids=b.token_ids if ids else None)
                   for pi, r in enumerate(results) for j, b in enumerate(r.beams)]
        return CompletionResponse(model=request.model, choices=choices, usage=usage, guidance=info,
                                  prompt_token_ids=[p.token_ids for p in prompts] if ids else None)

    async def score(self, serving, request) -> "ScoreResponse":
        from server.openai.protocol import ChatCompletionRequest, ScoreResponse
        from valuefn.scorer import ScoreItem, chain_scores

        chain = await self.values.chain_for(request.value)
        if request.messages is not None:
            chat = ChatCompletionRequest(model=serving.base_id, messages=request.messages)
            prompt_ids = serving.render_chat(chat).token_ids
        else:
            prompt_ids = serving.engine.tokenizer.encode(request.prompt, add_special_tokens=False)
        encode = serving.engine.tokenizer.encode
        seqs = [prompt_ids + encode(r, add_special_tokens=False) for r in request.responses]
        if max(len(s) for s in seqs) > serving.engine.max_model_len:
            raise GuidanceError("prompt + response longer than the context", param="responses")
        if any(len(s) == len(prompt_ids) for s in seqs) or not prompt_ids:
            raise GuidanceError("prompt and responses must not be empty", param="responses")
        raw = await self.scorer.values(chain, [ScoreItem(s, len(prompt_ids), len(prompt_ids)) for s in seqs])
        return ScoreResponse(value=chain.name, versions=chain.versions, scores=chain_scores(raw, chain.betas).tolist(),
                             values=raw.tolist())

    # ------------------------------------------------------------------ streaming
    async def _stream(self, serving, request, prompts, chain, params: SearchParams, name: str,
                      chat: bool) -> AsyncIterator[str]:
        from server.openai.serving import sse

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        queue: asyncio.Queue = asyncio.Queue()
        emitted = [""] * len(prompts)

        def text_of(ids: list[int]) -> str:
            text, _ = cut_at_stop(self.searcher.decode(ids), params.stop)
            return text.rstrip("\ufffd")

        def on_step_for(pi: int):
            def on_step(pool: list[Beam]) -> None:
                final = text_of(common_prefix([b.token_ids for b in pool]))
                if len(final) > len(emitted[pi]) and final.startswith(emitted[pi]):
                    queue.put_nowait((pi, final[len(emitted[pi]):]))
                    emitted[pi] = final
            return on_step

        async def run(pi, prompt):
            return await self.searcher.run(chain, prompt.token_ids, params, on_step_for(pi))

        def event(pi: int, j: int, text: str | None, finish=None, info=None, role=False):
            index = pi * params.n + j
            if chat:
                delta = DeltaMessage(role="assistant", content="") if role else DeltaMessage(content=text)
                return sse(ChatCompletionStreamResponse(id=rid, created=created, model=request.model, guidance=info,
                                                        choices=[ChatCompletionStreamChoice(index=index, delta=delta,
                                                                                            finish_reason=finish)]))
            return sse(CompletionStreamResponse(id=rid, created=created, model=request.model, guidance=info,
                                                choices=[CompletionChoice(index=index, text=text or "",
                                                                          finish_reason=finish)]))

        task = asyncio.ensure_future(asyncio.gather(*[run(pi, p) for pi, p in enumerate(prompts)]))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            if chat:
                for j in range(params.n):
                    yield event(0, j, None, role=True)
            while (item := await queue.get()) is not None:
                pi, delta = item
                for j in range(params.n):
                    yield event(pi, j, delta)
            results: list[SearchResult] = task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        info = self.info(name, chain, params, results)
        for pi, r in enumerate(results):
            for j, beam in enumerate(r.beams):
                rest = beam.text[len(emitted[pi]):] if beam.text.startswith(emitted[pi]) else ""
                last = pi == len(results) - 1 and j == len(r.beams) - 1
                yield event(pi, j, rest or None, finish=beam.finish_reason, info=info if last else None)
        usage = serving.count_tokens(sum(len(p.token_ids) for p in prompts), sum(r.completion_tokens for r in results))
        if include_usage:
            if chat:
                yield sse(ChatCompletionStreamResponse(id=rid, created=created, model=request.model, choices=[], usage=usage))
            else:
                yield sse(CompletionStreamResponse(id=rid, created=created, model=request.model, choices=[], usage=usage))
        yield "data: [DONE]\n\n"


async def start_values(app, settings, engine, model_path):
    """Build the registry manager, scorer and guided serving of a server; load every value."""
    from server.value_manager import ValueManager
    from valuefn.loader import BackbonePool, ValueLoader
    from valuefn.registry import Registry
    from valuefn.scorer import Scorer

    root = settings.resolved_values_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.error("cannot create the value registry %s: %s", root, exc)
    registry = Registry(root)
    pool = BackbonePool(model_path)
    manager = ValueManager(registry, ValueLoader(registry, pool), base_id=engine.model_id, metrics=app.state.metrics)
    scorer = Scorer(threads=settings.scorer_threads, metrics=app.state.metrics)
    await manager.reconcile()
    app.state.values = manager
    app.state.scorer = scorer
    if settings.watch_values:
        watcher = asyncio.create_task(manager.watch())

        async def close():
            manager.stop()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            scorer.close()

        app.state.closers.append(close)
    else:
        async def close():
            scorer.close()

        app.state.closers.append(close)
    guided = GuidedServing(engine, scorer, manager, max_candidates=settings.max_guided_candidates,
                           metrics=app.state.metrics)
    return manager, guided
