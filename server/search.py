"""Value-guided decoding over a frozen engine: chunk-level beam search (CBS), Best-of-N, particle
filtering (PF) and diverse verifier tree search (DVTS), all on one step machinery.

A step extends every unfinished candidate by one chunk (up to `l` tokens, or up to the first
`chunk_until` delimiter: step-aware chunks), in one engine request per distinct parent with n = its
successors (all of a search's requests in flight together, as token-id prompts so vLLM's prefix
cache hits), values the new candidates with the chain, and lets the mode choose the survivors:

- cbs: `w` beams, `k` successors each; the best `w` of (new candidates + beams that already
  finished) survive. Finished beams keep their raw values and are ranked again every step.
- dvts: `s` independent CBS pools ("subtrees") of width `w`, stepped together; the best leaf of all
  subtrees wins (search-and-learn's DVTS with `w=1`).
- pf: `k` particles, one successor each per step; the population (finished particles included) is
  resampled with probabilities softmax(chain score / pf_temperature) (= softmax(V / (beta x
  pf_temperature)) for one value), with a numpy RNG seeded from the request's seed (Puri et al.,
  arXiv 2502.01618). The server's `pf_temperature` (0.1) applies when a request sets no beta; a
  request's `guidance.beta` is the temperature itself (pf_temperature 1).
  With n > 1 the n best distinct particles are kept before the rest is resampled, so n answers exist.
- bon: `k` whole answers in one request; the best one wins.

Every mode returns answers that descend from the last step's survivors, so their common prefix,
streamed as it grows, is final. A search stops early, returning the best candidates so far
(finished or not, `SearchResult.stopped_by`), when its token budget (`budget_tokens`, counted
exactly: every generated token of every candidate) cannot pay for another step, when its
deadline has passed (checked before each step after the first, on an injectable clock), or at
`max_steps`. A batch line's search (`server.priority.LOW_PRIORITY` set) waits before each step
and before each scorer pass while interactive requests run, at most the watch's `max_wait` each,
and a step whose engine requests an interactive request interrupts runs again
(`server.priority.preemptible`).

When every member of the chain is an engine head (`ValueChain.value_heads`) and the engine can
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
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np

from common.sampling import Sampling
from common.search_settings import SearchMode
from server.engine import EngineClient, EngineRequest
from server.priority import preemptible, yield_to_interactive
from valuefn.scorer import ScoreItem, chain_scores

log = logging.getLogger(__name__)

StoppedBy = Literal["budget", "deadline", "max_steps"]


@dataclass(frozen=True)
class SearchParams:
    mode: SearchMode
    w: int
    k: int
    l: int
    max_tokens: int
    n: int = 1
    s: int = 1
    """dvts: independent subtrees of `w` beams each."""
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
    chunk_until: tuple[str, ...] = ()
    """Step delimiters: a chunk ends at the first of them (kept in the text) or after `l` tokens; one
    that begins in the chunk before counts too (`Searcher._step_end`)."""
    budget_tokens: int | None = None
    """Tokens the search may generate in all (every candidate's); None: no budget."""
    deadline_s: float | None = None
    """Seconds after the search's start past which no new step starts; None: no deadline."""
    max_steps: int | None = None
    """Steps at most; None: ceil(max_tokens / l) + 1 (max_tokens + 1 with `chunk_until`: a chunk may
    end after one token)."""
    pf_temperature: float = 1.0
    """pf: particles are resampled with probabilities softmax(chain score / pf_temperature)."""

    def first_chunk_length(self, prompt_len: int) -> int:
        if self.chunk_until:  # chunks end at delimiters, off any grid
            return min(self.max_tokens, self.l)
        unit = math.gcd(self.l, max(1, self.align))
        return min(self.max_tokens, self.l + (1 - (prompt_len + self.l)) % unit)

    def step_limit(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return self.max_tokens + 1 if self.chunk_until else math.ceil(self.max_tokens / self.l) + 1


@dataclass(eq=False)
class Beam:
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    raw: np.ndarray | None = None  # raw values (one per chain member) of this sequence
    token_values: np.ndarray | None = None  # (tokens, chain members) engine head outputs, when used
    score: float = float("-inf")  # chain score in the last candidate set it was ranked in
    group: int = 0  # dvts: the subtree it grew in
    chunk_ends: tuple[int, ...] = ()  # token counts at which its chunks ended


@dataclass
class SearchResult:
    beams: list[Beam]  # best first, distinct texts, at most n
    chunks: int = 0
    candidates_generated: int = 0
    candidates_scored: int = 0
    completion_tokens: int = 0
    """Tokens generated by the search, every candidate counted (what `budget_tokens` bounds)."""
    steps: int = 0
    stopped_by: StoppedBy | None = None
    elapsed_s: float = 0.0
    yielded_s: float = 0.0
    """Seconds a low-priority search (a batch line's) waited for interactive requests (server.priority)."""


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


def softmax(scores: np.ndarray) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def resample(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` indices drawn with replacement, each i with probability softmax(scores)_i (multinomial
    resampling, as Puri et al.'s particle filter).

    >>> resample(np.array([0.0, -np.inf]), 3, np.random.default_rng(0)).tolist()
    [0, 0, 0]
    """
    return rng.choice(len(scores), size=n, replace=True, p=softmax(scores))


def fit_budget(costs: Sequence[tuple[int, int]], left: int | None) -> list[int] | None:
    """Chunk lengths for one step's requests, given as (samples, wanted length), so that the step
    costs at most `left` tokens: the wanted lengths when they fit, else all cut to an equal share;
    None when not even one token per sample is left.

    >>> fit_budget([(4, 8), (2, 8)], 100), fit_budget([(4, 8), (2, 8)], 30), fit_budget([(4, 8)], 3)
    ([8, 8], [5, 5], None)
    """
    if left is None or sum(n * m for n, m in costs) <= left:
        return [m for _, m in costs]
    share = left // max(1, sum(n for n, _ in costs))
    return [min(m, share) for _, m in costs] if share >= 1 else None


class ValueHeads(NamedTuple):
    """What a chunk request hands the engine to value its samples (`EngineRequest.value_heads` /
    `value_layers`)."""

    weights: tuple[tuple[float, ...], ...]
    layers: tuple[int, ...] | None


Fanout = list[tuple[int, Beam, int]]
"""One step's expansions: (pool, parent, successors). Entries with the same parent share one request."""


class Searcher:
    """Runs one request's search against a shared engine and scorer."""

    def __init__(self, engine: EngineClient, scorer, *, decode: Callable[[list[int]], str] | None = None,
                 on_chunks: Callable[[int], None] | None = None,
                 on_engine_fallback: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.scorer = scorer
        self.decode = decode or (lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))
        self.on_chunks = on_chunks or (lambda n: None)  # told of chunk requests as they are sent (metrics)
        self.on_engine_fallback = on_engine_fallback or (lambda: None)  # a step's engine values were not finite
        self.clock = clock  # deadlines are measured on it (injectable for tests)
        self._warned_nonfinite = False

    async def run(self, chain, prompt_ids: list[int], params: SearchParams, on_step: OnStep | None = None,
                  started: float | None = None) -> SearchResult:
        """Search for `params.n` answers to `prompt_ids`; `started` (on `clock`) is when the
        request's deadline began (default: now)."""
        started = self.clock() if started is None else started
        heads = getattr(chain, "value_heads", None)
        if heads is not None:
            heads = ValueHeads(heads, getattr(chain, "value_layers", None))
            if (len(heads.weights) > getattr(self.engine, "max_value_heads", 0)
                    or not set(heads.layers or ()) <= set(getattr(self.engine, "value_layers", ()))):
                heads = None  # the scorer values the candidates instead
        if params.mode == "bon":
            yielded = await yield_to_interactive()
            result = await self._bon(chain, prompt_ids, params, heads)
            result.yielded_s += yielded
        else:
            result = await self._steps(chain, prompt_ids, params, heads, on_step, started)
        result.elapsed_s = self.clock() - started
        return result

    # ------------------------------------------------------------------ one step's pieces
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
                             chunk_until=params.chunk_until,
                             affinity=zlib.crc32(np.asarray(prompt_ids, dtype=np.int64).tobytes()))

    def _step_end(self, parent: Beam, ids: list[int], text: str, delimiters: tuple[str, ...]) -> int | None:
        r"""How many of `ids` a chunk keeps when a delimiter ends it before its last token; None when none
        does. vLLM matches stop strings in the new chunk's text only, so a delimiter that begins in the
        parent's text ("\n" | "\n...") reaches the search unended: the candidate's whole text decides.
        A parent that ended at a delimiter lends none of it to the next one."""
        done = len(parent.text)
        straddle = not parent.text.endswith(delimiters)
        end = min((i + len(d) for d in delimiters
                   if d and (i := text.find(d, max(0, done - (len(d) - 1) * straddle))) >= 0), default=None)
        if end is None or end >= len(text):
            return None
        for m in range(len(parent.token_ids) + 1, len(ids)):  # the first token that completes the delimiter
            if len(self.decode(ids[:m]).rstrip("\ufffd")) >= end:
                return m
        return None

    def _extend(self, parent: Beam, sample, params: SearchParams) -> Beam:
        ids = parent.token_ids + list(sample.token_ids)
        text = self.decode(ids)
        cut = self._step_end(parent, ids, text, params.chunk_until) if params.chunk_until else None
        if cut is not None:  # the tokens past the delimiter are dropped (and stay counted as generated)
            ids, text = ids[:cut], self.decode(ids[:cut])
        text, stopped = cut_at_stop(text, params.sampling.stop)
        beam = Beam(ids, text, chunk_ends=parent.chunk_ends + (len(ids),))
        if sample.token_values and (parent.token_values is not None or not parent.token_ids):
            new = np.asarray(sample.token_values, dtype=np.float64)  # (tokens, heads)
            new = new[:len(ids) - len(parent.token_ids)]
            beam.token_values = new if parent.token_values is None else np.concatenate([parent.token_values, new])
        delimiter = cut is not None or isinstance(sample.stop_reason, str) and sample.stop_reason in params.chunk_until
        if stopped or (sample.finish_reason == "stop" and not delimiter):  # a delimiter ends the chunk only
            beam.finished, beam.finish_reason = True, "stop"
        elif len(ids) >= params.max_tokens:
            beam.finished, beam.finish_reason = True, "length"
        return beam

    async def _sample(self, prompt_ids: list[int], fanout: Fanout, lengths: list[int], params: SearchParams, heads,
                      step: int, result: SearchResult) -> list[list[Beam]]:
        """Each fanout entry's children: one engine request per distinct (parent, length), all in flight
        together."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, ((_, parent, _), length) in enumerate(zip(fanout, lengths)):
            groups.setdefault((id(parent), length), []).append(i)
        keys = list(groups)
        # the seeds CBS and BoN always used, so a seed reproduces earlier answers
        parts = (lambda r: ("bon",)) if params.mode == "bon" else (
            (lambda r: (step, r)) if params.mode == "cbs" else (lambda r: (params.mode, step, r)))
        requests = [self._request(prompt_ids, fanout[groups[key][0]][1], sum(fanout[i][2] for i in groups[key]),
                                  key[1], params, heads, *parts(r)) for r, key in enumerate(keys)]
        self.on_chunks(len(requests))
        samples = await asyncio.gather(*[preemptible(lambda r=r: self.engine.sample(r)) for r in requests])
        result.chunks += len(requests)
        children: list[list[Beam]] = [[] for _ in fanout]
        for key, outs in zip(keys, samples):
            outs = iter(outs)
            for i in groups[key]:
                g, parent, n = fanout[i]
                for s in [next(outs) for _ in range(n)]:
                    result.candidates_generated += 1
                    result.completion_tokens += len(s.token_ids)
                    child = self._extend(parent, s, params)
                    child.group = g  # dvts: the subtree this expansion belongs to
                    children[i].append(child)
        return children

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
            if items:  # the scorer's forward pass shares the CPU (or GPU) with the engine: a batch line waits too
                result.yielded_s += await yield_to_interactive()
            raw = await self.scorer.values(chain, items) if items else np.zeros((0, len(chain.links)))
        result.candidates_scored += len(beams)
        for b, r in zip(beams, raw):
            b.raw = np.asarray(r, dtype=np.float64)

    # ------------------------------------------------------------------ cbs, dvts, pf
    async def _steps(self, chain, prompt_ids: list[int], params: SearchParams, heads, on_step: OnStep | None,
                     started: float) -> SearchResult:
        result = SearchResult(beams=[])
        root = Beam([])
        if params.mode == "pf":
            pools = [[root] * params.k]  # k particles; a resampled particle appears once per copy
            rng = np.random.default_rng(chunk_seed(params.sampling.seed, "pf-resample"))
        else:
            pools = [[root] for _ in range(params.s if params.mode == "dvts" else 1)]
        for step in range(params.step_limit() + 1):
            fanout = self._fanout(pools, params, step, root)
            if not fanout:
                break
            if step >= params.step_limit():
                result.stopped_by = "max_steps"
                break
            result.yielded_s += await yield_to_interactive()
            if params.deadline_s is not None and step > 0 and self.clock() - started >= params.deadline_s:
                result.stopped_by = "deadline"  # anytime: the best so far (the first step always runs)
                break
            wanted = [min(params.first_chunk_length(len(prompt_ids)) if step == 0 else params.l,
                          params.max_tokens - len(parent.token_ids)) for _, parent, _ in fanout]
            left = None if params.budget_tokens is None else params.budget_tokens - result.completion_tokens
            lengths = fit_budget([(n, m) for (_, _, n), m in zip(fanout, wanted)], left)
            if lengths is None:
                result.stopped_by = "budget"
                break
            children = await self._sample(prompt_ids, fanout, lengths, params, heads, step, result)
            flat = [c for cs in children for c in cs]
            await self._score(chain, prompt_ids, flat, [len(p.token_ids) for (_, p, _), cs in zip(fanout, children)
                                                         for _ in cs], result)
            if params.mode == "pf":
                pools = [self._resample([c for cs in children for c in cs] + [b for b in pools[0] if b.finished],
                                        chain, params.k, params.n, rng, params.pf_temperature)]
            else:
                new: list[list[Beam]] = [[] for _ in pools]
                for (g, _, _), cs in zip(fanout, children):
                    new[g].extend(cs)
                pools = [self._select(new[g] + [b for b in pool if b.finished], chain, params.w) if new[g] else pool
                         for g, pool in enumerate(pools)]
            result.steps = step + 1
            if on_step is not None:
                maybe = on_step([b for pool in pools for b in pool])
                if asyncio.iscoroutine(maybe):
                    await maybe
        survivors = list({id(b): b for pool in pools for b in pool}.values())
        for b in survivors:  # stopped early: the best so far, unfinished
            if not b.finished:
                b.finished, b.finish_reason = True, "length"
        if params.mode != "cbs" and survivors and all(b.raw is not None for b in survivors):
            self._select(survivors, chain, len(survivors))  # rank pf's population / dvts's subtrees together
        result.beams = self._distinct(survivors, params.n)
        return result

    @staticmethod
    def _fanout(pools: list[list[Beam]], params: SearchParams, step: int, root: Beam) -> Fanout:
        if params.mode == "pf":
            return [(0, b, 1) for b in pools[0] if not b.finished]
        if step == 0:  # the first step expands the prompt alone: w*k samples per pool, like w copies of it
            return [(g, root, params.w * params.k) for g in range(len(pools))]
        return [(g, b, params.k) for g, pool in enumerate(pools) for b in pool if not b.finished]

    @staticmethod
    def _select(beams: list[Beam], chain, w: int) -> list[Beam]:
        scores = chain_scores(np.stack([b.raw for b in beams]), chain.betas)
        for b, s in zip(beams, scores):
            b.score = float(s)
        ranked = sorted(beams, key=lambda b: b.score, reverse=True)
        return ranked[:w]

    @staticmethod
    def _resample(particles: list[Beam], chain, k: int, n: int, rng: np.random.Generator,
                  temperature: float = 1.0) -> list[Beam]:
        """k particles drawn by softmax(chain score / temperature); for n > 1 the n best distinct ones
        are kept first (resampling alone collapses the population onto fewer than n answers)."""
        scores = chain_scores(np.stack([b.raw for b in particles]), chain.betas)
        for b, s in zip(particles, scores):
            b.score = float(s)
        kept: list[Beam] = []
        if n > 1:
            seen: set[str] = set()
            for b in sorted({id(b): b for b in particles}.values(), key=lambda b: b.score, reverse=True):
                if len(kept) < n and b.text not in seen:
                    seen.add(b.text)
                    kept.append(b)
        return kept + [particles[i] for i in resample(scores / temperature, k - len(kept), rng)]

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

    # ------------------------------------------------------------------ bon
    async def _bon(self, chain, prompt_ids: list[int], params: SearchParams, heads) -> SearchResult:
        result = SearchResult(beams=[])
        root = Beam([])
        lengths = fit_budget([(params.k, params.max_tokens)], params.budget_tokens)
        if lengths is None:  # guided serving refuses such budgets before the search
            result.stopped_by = "budget"
            return result
        if lengths[0] < params.max_tokens:
            result.stopped_by = "budget"
        children = await self._sample(prompt_ids, [(0, root, params.k)], lengths, params, heads, 0, result)
        candidates = children[0]
        for c in candidates:
            if not c.finished:
                c.finished, c.finish_reason = True, "length"
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
