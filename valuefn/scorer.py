"""Scoring partial responses with a value chain: one queue shared by every search in the server.

Searches submit candidate sets; a worker thread micro-batches the candidates of all concurrent
searches into forward passes. Key/values of scored sequences are kept per value model in a slot
pool (`valuefn.kv_pool`), so a candidate that extends an already-scored beam only runs its new
tokens through the backbone, and a step is a constant number of batched tensor operations: its
cost follows the chunk length, not the prefix length or the number of candidates.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.search_settings import SearchSettings
from valuefn.checkpoint import Manifest
from valuefn.kv_pool import CacheBudget, KVPool, Row
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


def _key(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class LoadedValue:
    """One verified, loaded value version (inference weights + the key/values of what it scored).

    `model` may be built on first use (`build`): an engine value served by the engine needs only
    its head (`head`, the (D + 1,) weights and bias) and config until the scorer has to run it, so
    the API process holds no copy of the base model for it (`valuefn.loader.ValueLoader`)."""

    def __init__(self, name: str, version: int, manifest: Manifest, model: ValueModel | None = None,
                 cache: KVPool | None = None, kv_reuse: bool = True, *,
                 build: Callable[[], ValueModel] | None = None, config=None, head: torch.Tensor | None = None,
                 budget: CacheBudget | None = None):
        if model is None and build is None:
            raise ValueError("a LoadedValue needs a model or a way to build one")
        self.name, self.version, self.manifest = name, version, manifest
        self._model, self._build, self._cache = model, build, cache
        self._lock = threading.Lock()
        self.kv_reuse = kv_reuse
        """False when the pool path failed its check at load (`check_kv_reuse`): every step recomputes."""
        self.config = config if config is not None else model.config
        self._head = head
        self._budget = budget
        """The byte budget its key/value pool shares (its loader's; None: the device's default)."""

    @property
    def model(self) -> ValueModel:
        """The value model; built (the backbone loaded) on first use when the loader deferred it."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._build()
        return self._model

    @property
    def built(self) -> bool:
        """Whether the model (and so a backbone) is in memory."""
        return self._model is not None

    @property
    def head_weights(self) -> torch.Tensor:
        """(D + 1,) float32: the head's weights and bias, without building the model."""
        if self._head is None:
            head = self.model.head
            self._head = torch.cat([head.weight.detach().float().flatten(), head.bias.detach().float().flatten()])
        return self._head

    @property
    def cache(self) -> KVPool:
        """Key/values of scored sequences (`valuefn.kv_pool`); sized by the budget."""
        if self._cache is None:
            self._cache = KVPool.for_model(self.model.backbone, self._budget)
        return self._cache

    @cache.setter
    def cache(self, pool: KVPool) -> None:
        self._cache = pool

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
    def defaults(self) -> SearchSettings:
        return self.links[-1][0].manifest.defaults

    def with_betas(self, betas: Sequence[float]) -> "ValueChain":
        return ValueChain(self.name, tuple((v, float(b)) for (v, _), b in zip(self.links, betas)))

    @functools.cached_property
    def value_heads(self) -> tuple[tuple[float, ...], ...] | None:
        """Each member's head (D weights + bias) when every member is an engine value on the same
        hidden states (`ValueModelConfig.engine_value`, one set of `value_layers`): the engine can then
        value candidates as it samples them (`mean_before` over its per-token head outputs), with
        no forward pass here."""
        configs = [v.config for v, _ in self.links]
        if not all(c.engine_value for c in configs) or len({tuple(c.value_layers or ()) for c in configs}) != 1:
            return None
        return tuple(tuple(v.head_weights.tolist()) for v, _ in self.links)

    @property
    def value_layers(self) -> tuple[int, ...] | None:
        """The residual-stream layers `value_heads` read (None: the final normed hidden state)."""
        layers = self.links[-1][0].config.value_layers
        return tuple(layers) if layers else None


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


def default_max_batch_tokens(device: torch.device) -> int:
    """Keys attended per forward pass (rows x longest row): small on a CPU, one pass per step on a GPU."""
    return 1 << 18 if device.type == "cuda" else 16384


@torch.inference_mode()
def forward_values(value: LoadedValue, items: Sequence[ScoreItem], *, max_batch_tokens: int | None = None,
                   use_cache: bool = True) -> np.ndarray:
    """V of each item (its pooling over the head outputs). With `use_cache` the key/values of
    scored sequences are kept in `value.cache` and a child of a cached sequence runs only its
    new tokens; without, every item is recomputed from its first token."""
    max_batch_tokens = max_batch_tokens or default_max_batch_tokens(value.device)
    out = np.zeros(len(items), dtype=np.float64)
    if not items:
        return out
    if not (use_cache and value.kv_reuse):
        for batch in _batches(list(range(len(items))), [len(it.token_ids) for it in items], max_batch_tokens):
            _recompute(value, [items[i] for i in batch], out, batch)
        return out
    pool = value.cache
    data = [np.asarray(it.token_ids, dtype=np.int32).tobytes() for it in items]
    parent_keys = [_key(d[: 4 * it.prefix_len]) if it.prefix_len > 0 else None for d, it in zip(data, items)]
    # Shared prefixes (e.g. the prompt at the first step) are computed once and cached.
    missing: dict[bytes, Sequence[int]] = {}
    for k, it in zip(parent_keys, items):
        if k is not None and k not in missing and k not in pool:
            missing[k] = it.token_ids[: it.prefix_len]
    if missing:
        forward_values(value, [ScoreItem(ids, 0) for ids in missing.values()], max_batch_tokens=max_batch_tokens)
    rows, todo = [], []
    pooling = value.model.config.pooling
    for i, (k, it) in enumerate(zip(parent_keys, items)):
        parent = pool.get(k) if k is not None else None
        plen = 0 if parent is None else len(parent.slots)
        if plen == len(it.token_ids):  # nothing new (an empty chunk): its parent's value
            out[i] = pool_values(parent.scalars, it.response_start, pooling)
        else:
            todo.append(i)
        rows.append(Row(parent, list(it.token_ids[plen:])))
    lengths = [len(r.new_ids) + (0 if r.parent is None else len(r.parent.slots)) for r in rows]
    for batch in _batches(todo, lengths, max_batch_tokens):
        _run_pooled(value, [rows[i] for i in batch], [items[i] for i in batch], [_key(data[i]) for i in batch],
                    out, batch)
    return out


def _batches(order: list[int], lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups whose rows x longest row stays under `max_batch_tokens`."""
    order = sorted(order, key=lambda i: lengths[i])
    batches, batch, longest = [], [], 0
    for i in order:
        longest_with = max(longest, lengths[i])
        if batch and longest_with * (len(batch) + 1) > max_batch_tokens:
            batches.append(batch)
            batch, longest_with = [], lengths[i]
        batch.append(i)
        longest = longest_with
    if batch:
        batches.append(batch)
    return batches


def _run_pooled(value: LoadedValue, rows: list[Row], items: list[ScoreItem], keys: list[bytes], out: np.ndarray,
                idx: list[int]) -> None:
    step = value.cache.plan(rows)
    if step is None:  # the pool cannot hold this batch: recompute it without caching
        log.warning("value %s@%s: key/value pool full, recomputing %d sequences", value.name, value.version, len(rows))
        _recompute(value, items, out, idx)
        return
    try:
        mask = step.mask
        if value.model.backbone.config._attn_implementation == "eager":  # additive mask
            mask = torch.zeros(mask.shape, dtype=value.model.head.weight.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min)
        values, _ = value.model(step.input_ids, attention_mask=mask, position_ids=step.positions,
                                past_key_values=step, use_cache=True)
        values = values.float().cpu().numpy()  # (B, L)
    except BaseException:
        step.abort()
        raise
    pooling = value.model.config.pooling
    scalars = []
    for b, (row, it) in enumerate(zip(rows, items)):
        new = values[b, : len(row.new_ids)]
        s = new.copy() if row.parent is None else np.concatenate([row.parent.scalars, new])
        scalars.append(s)
        out[idx[b]] = pool_values(s, it.response_start, pooling)
    step.finish(keys, scalars)


@torch.inference_mode()
def prefix_values(value: LoadedValue, items: Sequence[ScoreItem], lengths: Sequence[Sequence[int]], *,
                  max_batch_tokens: int | None = None) -> list[list[float]]:
    """V of prefixes of each item, `lengths[i]` being the token counts of item i's prefixes, from one
    forward pass per item: attention is causal, so the head outputs at a prefix's tokens are those of
    the prefix scored alone (`forward_values` on each prefix, one pass per prefix).

    Reading V every few response tokens of whole rollouts (APA's per-token advantages) therefore
    costs one pass per rollout instead of one per chunk."""
    for it, ns in zip(items, lengths):  # before any forward pass
        if any(not 0 < n <= len(it.token_ids) for n in ns):
            raise ValueError(f"prefix lengths {list(ns)} outside 1..{len(it.token_ids)}")
    max_batch_tokens = max_batch_tokens or default_max_batch_tokens(value.device)
    out: list[list[float]] = [[] for _ in items]
    pooling = value.model.config.pooling
    for batch in _batches(list(range(len(items))), [len(it.token_ids) for it in items], max_batch_tokens):
        values = _padded_forward(value, [items[i] for i in batch])
        for b, i in enumerate(batch):
            out[i] = [pool_values(values[b, :n], items[i].response_start, pooling) for n in lengths[i]]
    return out


def _padded_forward(value: LoadedValue, items: list[ScoreItem]) -> np.ndarray:
    """The head outputs (B, T) of right-padded rows: positions start at 0 in every row."""
    device = value.device
    B = len(items)
    T = max(len(it.token_ids) for it in items)
    ids = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, it in enumerate(items):
        ids[b, : len(it.token_ids)] = it.token_ids
        mask[b, : len(it.token_ids)] = 1
    values, _ = value.model(torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
    return values.float().cpu().numpy()


def _recompute(value: LoadedValue, items: list[ScoreItem], out: np.ndarray, idx: list[int]) -> None:
    values = _padded_forward(value, items)
    pooling = value.model.config.pooling
    for b, it in enumerate(items):
        out[idx[b]] = pool_values(values[b, : len(it.token_ids)], it.response_start, pooling)


def sliding_window(config) -> int | None:
    """The attention window of a transformers config when its layers use one (Gemma-2/3, Mistral with
    `sliding_window`, Qwen2 with `use_sliding_window`), else None.

    >>> from types import SimpleNamespace as C
    >>> sliding_window(C(sliding_window=4096, use_sliding_window=False)), sliding_window(C(sliding_window=32))
    (None, 32)
    """
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def check_kv_reuse(value: LoadedValue, *, atol: float = 2e-2) -> bool:
    """Run a tiny two-step search both ways; keep the pool path only if it matches recomputation
    (a guard against a transformers version whose attention no longer follows the cache protocol)."""
    ids = [[1, 2, 3, 4, 5], [1, 2, 3, 6]]
    window = sliding_window(value.model.backbone.config)
    if window is not None:  # the pool's attention mask does not apply the window: always recompute
        value.kv_reuse = False
        log.info("value %s@%s: the base model attends over a sliding window of %d tokens, which key/value reuse "
                 "does not apply; scoring recomputes", value.name, value.version, window)
        return False
    try:
        full = forward_values(value, [ScoreItem(i + [7, 8], 0, 3) for i in ids], use_cache=False)
        forward_values(value, [ScoreItem(i, 0, 3) for i in ids])
        reused = forward_values(value, [ScoreItem(i + [7, 8], len(i), 3) for i in ids])
        ok = bool(np.allclose(full, reused, atol=atol, rtol=atol))
        reason = f"max difference {np.max(np.abs(full - reused)):.3g}"
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the pool
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    value.cache.clear()
    if not ok:
        log.warning("value %s@%s: key/value reuse disagrees with recomputation (%s); scoring recomputes",
                    value.name, value.version, reason)
    value.kv_reuse = ok
    return ok


class Scorer:
    """One scoring queue for the whole server; call `await scorer.score(chain, items)`."""

    def __init__(self, *, threads: int | None = None, max_batch_tokens: int | None = None, metrics=None):
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
