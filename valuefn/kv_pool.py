"""Key/values of scored sequences, kept in one preallocated tensor per layer (a slot pool).

A step of chunk-level beam search scores `w*k` children of `w` beams; each child is its parent
plus a few new tokens. The pool stores key/values per *token slot*: a cached sequence is the list
of its tokens' slots, a child shares its parent's slots and appends its own, so a scoring step
costs the new tokens only, and the work per layer is one batched scatter (the new tokens'
key/values into their slots) and one batched gather (every row's keys), whatever the number of
candidates. Nothing is copied per candidate.

    pool = KVPool.for_model(backbone, budget)      # nothing allocated yet
    step = pool.plan(rows)                         # slots for the new tokens, gather indices, mask
    model(input_ids, attention_mask=step.mask, position_ids=step.positions, past_key_values=step)

Cached sequences form a tree (a child extends its parent) and each owns only the slots of the
tokens it added; when the pool is full the least recently used sequence that nothing extends is
evicted and its slots are reused. Slot 0 is scratch: padding writes land there and it is
never visible to a query (the causal mask stops every row at its own tokens).

The byte budget (`value_cache_gib`, `iro serve --value-cache-gib`; default: a quarter of the GPU
memory the engine leaves to values, `common.engine_args.value_memory_bytes`, planned before the
engine starts; 1 GiB on the CPU) is shared by every loaded value: a pool that needs room takes it
from the least recently used other pools. The rest of the values' memory holds their backbones
(`valuefn.loader.BackbonePool`, which owns the budget and hands it to its values).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

MIN_SLOTS = 4096
CACHE_SHARE = 4
"""On a GPU the cache's default budget is 1/CACHE_SHARE of the values' memory; backbones get the rest."""


def default_budget_bytes(device: torch.device, *, value_cache_gib: float | None = None,
                         gpu_memory_utilization: float | None = None) -> int:
    """`value_cache_gib` if given; else, on a GPU, a quarter of the memory the engine leaves to
    values at its share `gpu_memory_utilization` (default: the engine settings' default; total x (1 -
    gpu_memory_utilization) less a margin: the same before and after the engine takes its share);
    1 GiB on the CPU."""
    if value_cache_gib is not None:
        return int(value_cache_gib * (1 << 30))
    if device.type == "cuda":
        from common.engine_args import DEFAULT_GPU_MEMORY_UTILIZATION, device_value_memory

        return device_value_memory(gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION, device) // CACHE_SHARE
    return 1 << 30


class CacheBudget:
    """Bytes shared by every pool; a pool that grows past it evicts least recently used pools."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._pools: OrderedDict[int, weakref.ref] = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, pool: "KVPool") -> None:
        with self._lock:
            self._pools[id(pool)] = weakref.ref(pool)
            self._pools.move_to_end(id(pool))

    def make_room(self, pool: "KVPool", extra: int) -> int:
        """Bytes `pool` may grow by (up to `extra`), clearing least recently used other pools."""
        with self._lock:
            others = [p for p in self._live() if p is not pool]
            free = self.max_bytes - pool.nbytes - sum(p.nbytes for p in others)
            for other in others:  # oldest first
                if free >= extra:
                    break
                free += other.nbytes
                other.clear()
            return max(0, min(extra, free))

    def _live(self) -> list["KVPool"]:
        live = []
        for key, ref in list(self._pools.items()):
            pool = ref()
            if pool is None:
                del self._pools[key]
            else:
                live.append(pool)
        return live


_budgets: dict[str, CacheBudget] = {}
_budgets_lock = threading.Lock()


def device_budget(device: torch.device) -> CacheBudget:
    """The default budget of one device (`default_budget_bytes`'s defaults), shared by pools built
    without one (`KVPool.for_model`): values a `BackbonePool` loads get the pool's instead."""
    key = str(device)
    with _budgets_lock:
        if key not in _budgets:
            _budgets[key] = CacheBudget(default_budget_bytes(device))
        return _budgets[key]


class CachedSeq:
    """What the pool keeps of a scored sequence of T tokens: a node of a tree of sequences (a
    child extends its parent), owning only the slots of the tokens it added."""

    __slots__ = ("slots", "scalars", "parent", "own", "children", "pins")

    def __init__(self, slots: np.ndarray, scalars: np.ndarray, parent: "CachedSeq | None", own: np.ndarray):
        self.slots = slots
        """(T,) int64: the pool slot of each token's key/values (the parent's, then its own)."""
        self.scalars = scalars
        """(T,) the head's output at every token: what pooling over the response needs."""
        self.parent, self.own = parent, own
        self.children = 0  # cached sequences that extend this one: it is evicted after them
        self.pins = 0  # running steps that extend it


@dataclass
class Row:
    """One sequence to run: its cached parent (or None) and the token ids after the parent."""

    parent: CachedSeq | None
    new_ids: list[int]


class KVPool:
    """One value model's key/values: K and V tensors per layer, (slots, kv_heads, head_dim)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 budget: CacheBudget):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device, self.budget = dtype, torch.device(device), budget
        self.bytes_per_slot = 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.RLock()
        self.clear()

    @classmethod
    def for_model(cls, backbone: torch.nn.Module, budget: CacheBudget | None = None) -> "KVPool":
        config = backbone.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        param = next(backbone.parameters())
        return cls(len(backbone.layers), getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   param.dtype, param.device, budget or device_budget(param.device))

    # ----------------------------------------------------------------- storage
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_slot

    @property
    def free_slots(self) -> int:
        return self._nfree

    def clear(self) -> None:
        """Forget every sequence and free the tensors (the pool grows again on next use)."""
        with self._lock:
            self.entries: OrderedDict[bytes, CachedSeq] = OrderedDict()
            self.keys: list[torch.Tensor] | None = None
            self.values: list[torch.Tensor] | None = None
            self._free = np.zeros(0, dtype=np.int64)
            self._nfree = 0

    def _grow(self, need: int) -> bool:
        """Make room for `need` more free slots (grow geometrically within the budget)."""
        target = max(MIN_SLOTS, 2 * self.capacity, self.capacity + need + 1)
        extra = self.budget.make_room(self, (target - self.capacity) * self.bytes_per_slot) // self.bytes_per_slot
        if extra < need + (1 if self.capacity == 0 else 0):
            return False
        old, new = self.capacity, self.capacity + extra
        shape = (new, self.kv_heads, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        if old:
            for dst, src in zip(keys + values, self.keys + self.values):
                dst[:old].copy_(src)
        self.keys, self.values = keys, values
        free = np.zeros(new, dtype=np.int64)
        free[: self._nfree] = self._free[: self._nfree]
        fresh = np.arange(new - 1, max(old, 1) - 1, -1)  # slot 0 is scratch, never free
        free[self._nfree: self._nfree + len(fresh)] = fresh
        self._free, self._nfree = free, self._nfree + len(fresh)
        return True

    def _alloc(self, n: int) -> np.ndarray | None:
        while self._nfree < n:
            if self._grow(n - self._nfree):
                continue
            if not self._evict_one():
                return None
        self._nfree -= n
        return self._free[self._nfree: self._nfree + n].copy()

    def _release(self, slots: np.ndarray) -> None:
        self._free[self._nfree: self._nfree + len(slots)] = slots
        self._nfree += len(slots)

    def _evict_one(self) -> bool:
        """Evict the least recently used sequence that no other sequence or running step extends."""
        for key, seq in self.entries.items():
            if seq.children == 0 and seq.pins == 0:
                del self.entries[key]
                self._release(seq.own)
                if seq.parent is not None:
                    seq.parent.children -= 1
                self.evictions += 1
                return True
        return False

    # ----------------------------------------------------------------- sequences
    def get(self, key: bytes) -> CachedSeq | None:
        with self._lock:
            seq = self.entries.get(key)
            if seq is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return seq

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    # ----------------------------------------------------------------- one forward pass
    def plan(self, rows: list[Row]) -> "PoolStep | None":
        """Slots for every row's new tokens and the batched indices of one forward pass; None
        when the pool cannot hold them (the caller recomputes without the pool)."""
        with self._lock:
            self.budget.touch(self)
            parents = [r.parent for r in rows if r.parent is not None]
            for p in parents:  # they survive our own evictions
                p.pins += 1
            n = np.array([len(r.new_ids) for r in rows])
            new = self._alloc(int(n.sum()))
            if new is None:
                for p in parents:
                    p.pins -= 1
                return None
            B, L = len(rows), int(n.max())
            P = np.array([0 if r.parent is None else len(r.parent.slots) for r in rows])
            T = int(P.max()) + L
            offsets = np.concatenate([[0], np.cumsum(n)])
            gather = np.zeros(B * (int(P.max()) + L), dtype=np.int64)  # (B, T) slot of each key; 0 = scratch
            scatter = np.zeros(B * L, dtype=np.int64)  # (B, L) slot of each new token
            ids = np.zeros(B * L, dtype=np.int64)
            if len(parents):  # every row's parent slots at b*T + [0, P_b)
                gather[_runs(np.arange(B) * T, P)] = np.concatenate([p.slots for p in parents])
            gather[_runs(np.arange(B) * T + P, n)] = new  # its own at b*T + [P_b, P_b + n_b)
            own = _runs(np.arange(B) * L, n)
            scatter[own] = new
            ids[own] = np.fromiter(itertools.chain.from_iterable(r.new_ids for r in rows), dtype=np.int64,
                                   count=len(new))
            gather, scatter, ids = gather.reshape(B, T), scatter.reshape(B, L), ids.reshape(B, L)
            return PoolStep(self, rows, P, n, offsets, ids, gather, scatter, new)


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges [start, start + length) of every row, without a loop over rows.

    >>> _runs(np.array([0, 10, 20]), np.array([2, 0, 3])).tolist()
    [0, 1, 20, 21, 22]
    """
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total)


class PoolStep:
    """One forward pass over a batch of rows, handed to the model as its `past_key_values`
    (transformers' cache protocol: `update(keys, values, layer_idx)` per attention layer)."""

    def __init__(self, pool: KVPool, rows: list[Row], P: np.ndarray, n: np.ndarray, offsets: np.ndarray,
                 ids: np.ndarray, gather: np.ndarray, scatter: np.ndarray, new: np.ndarray):
        device = pool.device
        self.pool, self.rows, self.P, self.n, self._offsets, self._new = pool, rows, P, n, offsets, new
        self._open = True
        L = ids.shape[1]
        T = gather.shape[1]
        self.input_ids = torch.from_numpy(ids).to(device)
        self.gather = torch.from_numpy(gather).to(device)  # (B, T)
        self.scatter = torch.from_numpy(scatter.reshape(-1)).to(device)  # (B*L,)
        self.positions = torch.from_numpy(P).to(device)[:, None] + torch.arange(L, device=device)[None, :]  # (B, L)
        # query i of row b sees keys 0 .. P_b + i: its parent, its own tokens so far; never padding
        self.mask = (torch.arange(T, device=device)[None, None, :] <= self.positions[:, :, None])[:, None]  # (B,1,L,T)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new tokens' (B, H, L, D) key/values into their slots and return every row's
        (B, H, T, D) keys and values."""
        pool = self.pool
        B, H, L, D = key_states.shape
        K, V = pool.keys[layer_idx], pool.values[layer_idx]
        K.index_copy_(0, self.scatter, key_states.transpose(1, 2).reshape(B * L, H, D).to(K.dtype))
        V.index_copy_(0, self.scatter, value_states.transpose(1, 2).reshape(B * L, H, D).to(V.dtype))
        return K[self.gather].transpose(1, 2), V[self.gather].transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.gather.shape[1] - self.input_ids.shape[1])

    def finish(self, keys: list[bytes], scalars: list[np.ndarray]) -> None:
        """Cache every row's sequence under its key (a sequence already cached keeps its entry and
        the step's copy of its slots is freed) and release the step's pins."""
        pool = self.pool
        with pool._lock:
            entries, o = pool.entries, self._offsets
            unused = []
            for b, (row, key, s) in enumerate(zip(self.rows, keys, scalars)):
                own = self._new[o[b]: o[b + 1]]
                if key in entries:
                    entries.move_to_end(key)
                    unused.append(own)
                    continue
                parent = row.parent
                slots = own if parent is None else np.concatenate([parent.slots, own])
                entries[key] = CachedSeq(slots, s, parent, own)
                if parent is not None:
                    parent.children += 1
            if unused:
                pool._release(np.concatenate(unused))
            self._new = np.zeros(0, dtype=np.int64)
            self._unpin()

    def abort(self) -> None:
        """Give back the step's slots and pins (the forward pass failed)."""
        with self.pool._lock:
            if len(self._new):
                self.pool._release(self._new)
            self._new = np.zeros(0, dtype=np.int64)
            self._unpin()

    def _unpin(self) -> None:
        if self._open:
            self._open = False
            for r in self.rows:
                if r.parent is not None:
                    r.parent.pins -= 1
