"""Value-guided decoding: chunk-level beam search (CBS) and Best-of-N over a frozen engine.

CBS keeps `w` beams. Each step every unfinished beam asks the engine for `k` continuations of up
to `l` tokens (all beams' requests in flight together, as token-id prompts so vLLM's prefix
cache hits); the candidates are scored by the value chain and the best `w` of (new candidates +
beams that already finished) survive. Finished beams keep their raw values, so they are ranked
again against every later candidate set. The answer is the best finished beam.

When every member of the chain is an engine head (`ValueChain.engine_heads`) and the engine can
evaluate that many heads (`EngineClient.max_value_heads`), the chunk requests carry the heads and
the engine returns their outputs with every sampled token: a candidate's values are then the
mean of its tokens' (`mean_before` pooling) and the scorer is not called at all.

The loop depends only on `EngineClient.sample` and a scorer with `values(chain, items)`, so it
can be tested with scripted ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np

from common.sampling import Sampling
from server.engine import EngineClient, EngineRequest

log = logging.getLogger(__name__)
from valuefn.scorer import ScoreItem, chain_scores


@dataclass(frozen=True)
class SearchParams:
    mode: Literal["cbs", "bon"]
    w: int
    k: int
    l: int
    max_tokens: int
    n: int = 1
    sampling: Sampling = Sampling(temperature=0.7)
    """The request's sampling settings, passed to every chunk unchanged but for a per-chunk seed
    (derived from `sampling.seed`) and what is left of `min_tokens`."""
    adapter: object | None = None
    """The policy's LoRA adapter (`Generation.adapter`): every chunk samples from the adapted policy."""
    align: int = 1
    """Tokens per KV block of the engine's prefix cache (1: no alignment). CBS then lengthens its
    first chunk by less than u = gcd(l, align) tokens (and shortens its last) so that every chunk
    boundary falls one token past a multiple of u (`first_chunk_length`). Why: vLLM's prefix cache
    reuses whole blocks only and always recomputes a prompt's last token, so a chunk request
    re-prefills ((prefix length - 1) mod block) + 1 tokens, once per continuation: 1 token at
    1 past a block boundary, a whole block at a boundary itself."""

    def first_chunk_length(self, prompt_len: int) -> int:
        unit = math.gcd(self.l, max(1, self.align))
        return min(self.max_tokens, self.l + (1 - (prompt_len + self.l)) % unit)


@dataclass
class Beam:
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    raw: np.ndarray | None = None  # raw values (one per chain member) of this sequence
    token_values: np.ndarray | None = None  # (tokens, chain members) engine head outputs, when used
    score: float = float("-inf")  # chain score in the last candidate set it was ranked in


@dataclass
class SearchResult:
    beams: list[Beam]  # best first, distinct texts, at most n
    chunks: int = 0
    candidates_generated: int = 0
    candidates_scored: int = 0
    completion_tokens: int = 0
    steps: int = 0


OnStep = Callable[[list[Beam]], Awaitable[None] | None]


def chunk_seed(seed: int | None, *parts: Any) -> int | None:
    """A deterministic per-chunk seed derived from the request seed."""
    if seed is None:
        return None
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Truncate `text` at the earliest stop string; return (text, whether one was found)."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class EngineHeads(NamedTuple):
    """What a chunk request hands the engine to value its samples (`EngineRequest.value_heads` /
    `value_layers`)."""

    weights: tuple[tuple[float, ...], ...]
    layers: tuple[int, ...] | None


class Searcher:
    """Runs CBS / BoN for one request against a shared engine and scorer."""

    def __init__(self, engine: EngineClient, scorer, *, decode: Callable[[list[int]], str] | None = None,
                 on_chunks: Callable[[int], None] | None = None,
                 on_engine_fallback: Callable[[], None] | None = None):
        self.engine = engine
        self.scorer = scorer
        self.decode = decode or (lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))
        self.on_chunks = on_chunks or (lambda n: None)  # told of chunk requests as they are sent (metrics)
        self.on_engine_fallback = on_engine_fallback or (lambda: None)  # a step's engine values were not finite
        self._warned_nonfinite = False

    async def run(self, chain, prompt_ids: list[int], params: SearchParams, on_step: OnStep | None = None) -> SearchResult:
        heads = getattr(chain, "engine_heads", None)
        if heads is not None:
            heads = EngineHeads(heads, getattr(chain, "engine_layers", None))
            if (len(heads.weights) > getattr(self.engine, "max_value_heads", 0)
                    or not set(heads.layers or ()) <= set(getattr(self.engine, "value_layers", ()))):
                heads = None  # the scorer values the candidates instead
        if params.mode == "bon":
            return await self._bon(chain, prompt_ids, params, heads)
        return await self._cbs(chain, prompt_ids, params, heads, on_step)

    def _request(self, prompt_ids: list[int], beam: Beam, n: int, max_tokens: int, params: SearchParams, heads,
                 *seed_parts) -> EngineRequest:
        s = params.sampling
        sampling = replace(s, seed=chunk_seed(s.seed, *seed_parts),
                           min_tokens=max(0, s.min_tokens - len(beam.token_ids)))
        return EngineRequest(prompt_ids=prompt_ids + beam.token_ids, n=n, max_tokens=max_tokens, sampling=sampling,
                             detokenize=False,  # the search decodes whole beams itself (_extend)
                             value_heads=heads.weights if heads else None,
                             value_layers=heads.layers if heads else None, adapter=params.adapter,
                             grammar_prefix=len(beam.token_ids) if s.structured is not None else 0,
                             affinity=zlib.crc32(np.asarray(prompt_ids, dtype=np.int64).tobytes()))

    def _extend(self, parent: Beam, sample, params: SearchParams) -> Beam:
        ids = parent.token_ids + list(sample.token_ids)
        text, stopped = cut_at_stop(self.decode(ids), params.sampling.stop)
        beam = Beam(ids, text)
        if sample.token_values and (parent.token_values is not None or not parent.token_ids):
            new = np.asarray(sample.token_values, dtype=np.float64)  # (tokens, heads)
            beam.token_values = new if parent.token_values is None else np.concatenate([parent.token_values, new])
        if stopped or sample.finish_reason == "stop":
            beam.finished, beam.finish_reason = True, "stop"
        elif len(ids) >= params.max_tokens:
            beam.finished, beam.finish_reason = True, "length"
        return beam

    async def _score(self, chain, prompt_ids: list[int], beams: list[Beam], parents: list[int], result: SearchResult):
        raw = None
        if beams and all(b.token_values is not None and len(b.token_values) for b in beams):
            raw = [b.token_values.mean(axis=0) for b in beams]  # the engine's head outputs, mean_before
            if not all(np.isfinite(r).all() for r in raw):  # never rank by NaN: this step goes to the scorer
                raw = None
                self.on_engine_fallback()
                if not self._warned_nonfinite:
                    self._warned_nonfinite = True
                    log.warning("engine values were not finite; the scorer values such steps instead "
                                "(counted in iro_engine_value_fallbacks_total)")
        if raw is None:
            items = [ScoreItem(prompt_ids + b.token_ids, len(prompt_ids) + p, len(prompt_ids))
                     for b, p in zip(beams, parents)]
            raw = await self.scorer.values(chain, items) if items else np.zeros((0, len(chain.links)))
        result.candidates_scored += len(beams)
        for b, r in zip(beams, raw):
            b.raw = np.asarray(r, dtype=np.float64)

    async def _cbs(self, chain, prompt_ids: list[int], params: SearchParams, heads, on_step: OnStep | None) -> SearchResult:
        result = SearchResult(beams=[])
        pool: list[Beam] = [Beam([])]  # the w survivors (finished ones included)
        max_steps = math.ceil(params.max_tokens / params.l) + 1
        for step in range(max_steps):
            active = [b for b in pool if not b.finished]
            if not active:
                break
            # The first step expands the prompt alone: w*k samples, like w copies of it.
            fanout = [(b, params.k * (params.w if step == 0 else 1)) for b in active]
            length = params.first_chunk_length(len(prompt_ids)) if step == 0 else params.l
            requests = [self._request(prompt_ids, b, n, min(length, params.max_tokens - len(b.token_ids)),
                                      params, heads, step, i) for i, (b, n) in enumerate(fanout)]
            self.on_chunks(len(requests))
            samples = await asyncio.gather(*[self.engine.sample(r) for r in requests])
            result.chunks += len(requests)
            candidates, parents = [], []
            for (parent, _), outs in zip(fanout, samples):
                for s in outs:
                    result.candidates_generated += 1
                    result.completion_tokens += len(s.token_ids)
                    candidates.append(self._extend(parent, s, params))
                    parents.append(len(parent.token_ids))
            await self._score(chain, prompt_ids, candidates, parents, result)
            pool = self._select(candidates + [b for b in pool if b.finished], chain, params.w)
            result.steps = step + 1
            if on_step is not None:
                maybe = on_step(pool)
                if asyncio.iscoroutine(maybe):
                    await maybe
        for b in pool:  # the step budget ran out (only possible with degenerate engines)
            if not b.finished:
                b.finished, b.finish_reason = True, "length"
        result.beams = self._distinct(pool, params.n)
        return result

    @staticmethod
    def _select(beams: list[Beam], chain, w: int) -> list[Beam]:
        scores = chain_scores(np.stack([b.raw for b in beams]), chain.betas)
        for b, s in zip(beams, scores):
            b.score = float(s)
        ranked = sorted(beams, key=lambda b: b.score, reverse=True)
        return ranked[:w]

    @staticmethod
    def _distinct(beams: list[Beam], n: int) -> list[Beam]:
        out, seen = [], set()
        for b in sorted(beams, key=lambda b: b.score, reverse=True):
            if b.text not in seen:
                seen.add(b.text)
                out.append(b)
        # fewer distinct texts than n: repeat the best ones rather than return too few choices
        while len(out) < n and beams:
            out.append(out[len(out) % max(1, len(seen))])
        return out[:n]

    async def _bon(self, chain, prompt_ids: list[int], params: SearchParams, heads) -> SearchResult:
        result = SearchResult(beams=[])
        self.on_chunks(1)
        samples = await self.engine.sample(self._request(prompt_ids, Beam([]), params.k, params.max_tokens, params, heads,
                                                          "bon"))
        result.chunks = 1
        root = Beam([])
        candidates = [self._extend(root, s, params) for s in samples]
        for c in candidates:
            if not c.finished:
                c.finished, c.finish_reason = True, "length"
        result.candidates_generated = len(candidates)
        result.completion_tokens = sum(len(s.token_ids) for s in samples)
        await self._score(chain, prompt_ids, candidates, [0] * len(candidates), result)
        self._select(candidates, chain, len(candidates))
        result.beams = self._distinct(candidates, params.n)
        result.steps = 1
        return result


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == first[i] for s in seqs):
        i += 1
    return list(first[:i])
