"""Scoring partial responses with a value chain: one queue shared by every search in the server.

Searches submit candidate sets; a worker thread micro-batches the candidates of all concurrent
searches into forward passes. Key/values of scored sequences are cached per value model, so
a candidate that extends an already-scored beam only runs its new tokens through the backbone:
cost per step follows the chunk length, not the prefix length.

Chain score of candidate j in one step's candidate set (the reference's WeightedMultiValueScorer):

    s_1 = V_1 / beta_1
    s_i = V_i / beta_i + log_softmax(s_{i-1})   over the candidate set

    >>> import numpy as np
    >>> chain_scores(np.array([[1.0], [3.0]]), [1.0]).tolist()
    [1.0, 3.0]
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from valuefn.checkpoint import Manifest, SearchDefaults
from valuefn.model import ValueModel, pool_values

log = logging.getLogger(__name__)


def chain_scores(values: np.ndarray, betas: Sequence[float]) -> np.ndarray:
    """Combine raw values (n candidates, t chain members) into one score per candidate."""
    values = np.asarray(values, dtype=np.float64)
    s = values[:, 0] / betas[0]
    for i in range(1, values.shape[1]):
        log_softmax = s - (np.max(s) + np.log(np.sum(np.exp(s - np.max(s)))))
        s = values[:, i] / betas[i] + log_softmax
    return s


def seq_key(token_ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int32).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class CachedSeq:
    """What the scorer keeps of a scored sequence of T tokens."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    """(K, V) per layer, each (kv_heads, T, head_dim)."""
    scalars: np.ndarray
    """(T,) the head's output at every token: what pooling over the response needs."""

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv) + self.scalars.nbytes


class KVCache:
    """LRU of `CachedSeq` by token-sequence key, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[bytes, tuple[CachedSeq, int]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: bytes) -> CachedSeq | None:
        item = self._d.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return item[0]

    def put(self, key: bytes, seq: CachedSeq) -> None:
        if key in self._d:
            self._d.move_to_end(key)
            return
        size = seq.nbytes
        self._d[key] = (seq, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._d) > 1:
            _, (_, s) = self._d.popitem(last=False)
            self.bytes -= s

    def __len__(self) -> int:
        return len(self._d)


@dataclass(eq=False)
class LoadedValue:
    """One verified, loaded value version (inference weights + its KV cache)."""

    name: str
    version: int
    manifest: Manifest
    model: ValueModel
    cache: KVCache = field(default_factory=lambda: KVCache(512 << 20))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True, eq=False)
class ValueChain:
    """V_1..V_t with their betas; immutable, so a search keeps the chain it started with."""

    name: str
    links: tuple[tuple[LoadedValue, float], ...]

    @property
    def versions(self) -> list[int]:
        return [v.version for v, _ in self.links]

    @property
    def betas(self) -> list[float]:
        return [b for _, b in self.links]

    @property
    def version(self) -> int:
        return self.links[-1][0].version

    @property
    def defaults(self) -> SearchDefaults:
        return self.links[-1][0].manifest.defaults

    def with_betas(self, betas: Sequence[float]) -> "ValueChain":
        return ValueChain(self.name, tuple((v, float(b)) for (v, _), b in zip(self.links, betas)))

    @functools.cached_property
    def engine_heads(self) -> tuple[tuple[float, ...], ...] | None:
        """Each member's head (H weights + bias) when every member is an engine head
        (`ValueModelConfig.engine_head`): the engine can then value candidates as it samples them
        (`mean_before` over its per-token head outputs), with no forward pass here."""
        if not all(v.model.config.engine_head for v, _ in self.links):
            return None
        return tuple(tuple(v.model.head.weight.detach().float().flatten().tolist()) +
                     (float(v.model.head.bias.detach().float()),) for v, _ in self.links)


@dataclass
class ScoreItem:
    """A sequence to score: prompt + partial response ids. `prefix_len` tokens of it (its parent
    beam) were scored before, so their key/values are probably cached. `response_start` is the
    prompt's length (where mean pooling starts; None: no known prompt, the last token's value)."""

    token_ids: Sequence[int]
    prefix_len: int = 0
    response_start: int | None = None


@dataclass
class _Job:
    chain: ValueChain
    items: list[ScoreItem]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@torch.inference_mode()
def forward_values(value: LoadedValue, items: Sequence[ScoreItem], *, max_batch_tokens: int = 16384,
                   use_cache: bool = True) -> np.ndarray:
    """V of each item (its pooling over the head outputs), reusing and extending `value.cache`."""
    if use_cache:
        # Shared prefixes (e.g. the prompt at the first step) are computed once and cached.
        missing: dict[bytes, Sequence[int]] = {}
        for it in items:
            if it.prefix_len > 0:
                k = seq_key(it.token_ids[: it.prefix_len])
                if k not in missing and value.cache.get(k) is None:
                    missing[k] = it.token_ids[: it.prefix_len]
        if missing:
            forward_values(value, [ScoreItem(ids, 0) for ids in missing.values()], max_batch_tokens=max_batch_tokens)
    plans = []
    for idx, it in enumerate(items):
        past = value.cache.get(seq_key(it.token_ids[: it.prefix_len])) if use_cache and it.prefix_len > 0 else None
        plans.append((idx, it, past, it.prefix_len if past is not None else 0))
    plans.sort(key=lambda p: (p[3], len(p[1].token_ids)))
    out = np.zeros(len(items), dtype=np.float64)
    batch: list = []
    for plan in plans:
        longest = max([len(p[1].token_ids) for p in batch] + [len(plan[1].token_ids)])
        if batch and longest * (len(batch) + 1) > max_batch_tokens:
            _run_batch(value, batch, out, use_cache)
            batch = []
        batch.append(plan)
    if batch:
        _run_batch(value, batch, out, use_cache)
    return out


def _run_batch(value: LoadedValue, batch: list, out: np.ndarray, use_cache: bool) -> None:
    from transformers import DynamicCache

    device = value.device
    B = len(batch)
    P = max(p[3] for p in batch)
    news = [list(p[1].token_ids[p[3]:]) for p in batch]
    L = max(len(n) for n in news)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, P + L, dtype=torch.long)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    for i, ((_, _, _, plen), new) in enumerate(zip(batch, news)):
        input_ids[i, : len(new)] = torch.tensor(new)
        mask[i, P - plen: P + len(new)] = 1
        position_ids[i] = plen + torch.arange(L)
    cache = None
    if P > 0:  # left-pad every cached prefix to P
        layers = []
        template = next(p[2] for p in batch if p[2] is not None)
        for layer, (k0, _) in enumerate(template.kv):
            K = k0.new_zeros(B, k0.shape[0], P, k0.shape[2])
            V = torch.zeros_like(K)
            for i, (_, _, past, plen) in enumerate(batch):
                if past is not None:
                    K[i, :, P - plen:] = past.kv[layer][0]
                    V[i, :, P - plen:] = past.kv[layer][1]
            layers.append((K, V))
        cache = DynamicCache(ddp_cache_data=layers)
    values, new_cache = value.model(input_ids.to(device), attention_mask=mask.to(device),
                                    position_ids=position_ids.to(device), past_key_values=cache,
                                    use_cache=use_cache)
    values = values.float().cpu().numpy()
    pooling = value.model.config.pooling
    for i, (idx, it, past, plen) in enumerate(batch):
        n = len(news[i])
        scalars = values[i, :n].copy() if past is None else np.concatenate([past.scalars, values[i, :n]])
        out[idx] = pool_values(scalars, it.response_start, pooling)
        if use_cache:
            kv = [(layer.keys[i, :, P - plen: P + n].clone(), layer.values[i, :, P - plen: P + n].clone())
                  for layer in new_cache.layers]
            value.cache.put(seq_key(it.token_ids), CachedSeq(kv, scalars))


class Scorer:
    """One scoring queue for the whole server; call `await scorer.score(chain, items)`."""

    def __init__(self, *, threads: int | None = None, max_batch_tokens: int = 16384, metrics=None):
        self.threads = threads
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="iro-scorer", daemon=True)
        self._thread.start()
        self.batches = 0
        self.busy_seconds = 0.0

    async def values(self, chain: ValueChain, items: Sequence[ScoreItem]) -> np.ndarray:
        """Raw values, shape (len(items), chain length)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(chain, list(items), future, loop))
        return await future

    async def score(self, chain: ValueChain, items: Sequence[ScoreItem]) -> np.ndarray:
        """Chain scores of one step's candidate set."""
        if not items:
            return np.zeros(0)
        return chain_scores(await self.values(chain, items), chain.betas)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while True:  # micro-batch whatever else is waiting
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            jobs = [j for j in jobs if not j.future.cancelled()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        results = {id(j): np.zeros((len(j.items), len(j.chain.links))) for j in jobs}
        errors: dict[int, BaseException] = {}
        by_value: dict[int, tuple[LoadedValue, list[tuple[_Job, int]]]] = {}
        for j in jobs:
            for col, (value, _) in enumerate(j.chain.links):
                by_value.setdefault(id(value), (value, []))[1].append((j, col))
        n_items = 0
        for value, uses in by_value.values():
            items = [it for j, _ in uses for it in j.items]
            n_items += len(items)
            try:
                scores = forward_values(value, items, max_batch_tokens=self.max_batch_tokens)
            except Exception as exc:  # a failing value fails its requests, not the worker
                log.exception("scoring with %s@%s failed", value.name, value.version)
                for j, _ in uses:
                    errors[id(j)] = exc
                continue
            offset = 0
            for j, col in uses:
                results[id(j)][:, col] = scores[offset: offset + len(j.items)]
                offset += len(j.items)
        elapsed = time.perf_counter() - start
        self.batches += 1
        self.busy_seconds += elapsed
        if self.metrics is not None:
            self.metrics.scorer_batch.observe(n_items)
            self.metrics.scorer_latency.observe(elapsed)
            self.metrics.candidates_scored.inc(sum(len(j.items) for j in jobs))
        for j in jobs:
            if id(j) in errors:
                j.loop.call_soon_threadsafe(_set_exception, j.future, errors[id(j)])
            else:
                j.loop.call_soon_threadsafe(_set_result, j.future, results[id(j)])


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
