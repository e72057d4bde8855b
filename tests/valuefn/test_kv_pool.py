"""The scorer's key/value pool: reuse equals recomputation, a step is a constant number of
tensor operations, the budget is respected, and a broken pool path falls back to recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.scorer import OpCounter
from valuefn.kv_pool import CacheBudget, KVPool
from valuefn.loader import BackbonePool, make_manifest
from valuefn.model import ValueModel, ValueModelConfig, load_backbone, truncate
from valuefn.scorer import LoadedValue, ScoreItem, check_kv_reuse, forward_values


def make_value(tiny_model_dir, pooling: str = "mean", budget: CacheBudget | None = None) -> LoadedValue:
    config = ValueModelConfig(dtype="float32", lora_r=0, num_layers=2, pooling=pooling)
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    torch.manual_seed(3)
    model = ValueModel(pool.fresh(config), config, with_lora=False)
    with torch.no_grad():
        model.head.weight.normal_()
    value = LoadedValue("t", 1, make_manifest("t", config, pool.identity), model.for_inference())
    if budget is not None:
        value.cache = KVPool.for_model(value.model.backbone, budget)
    return value


def search_steps(rng, searches: int, steps: int = 4, w: int = 2, k: int = 3, prompt: int = 7):
    """Items of `steps` steps of `searches` simulated beam searches (random survivors)."""
    prompts = [list(rng.integers(4, 128, prompt)) for _ in range(searches)]
    beams = [[[] for _ in range(w)] for _ in range(searches)]
    out = []
    for _ in range(steps):
        items, children = [], []
        for s in range(searches):
            for b in beams[s]:
                for _ in range(k):
                    c = b + list(rng.integers(4, 128, int(rng.integers(1, 5))))
                    items.append(ScoreItem(prompts[s] + c, prompt + len(b), prompt))
                    children.append((s, c))
        out.append(items)
        for s in range(searches):
            mine = [c for o, c in children if o == s]
            beams[s] = [mine[i] for i in rng.choice(len(mine), w, replace=False)]
    return out


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_before"])
def test_mixed_batch_reuse_equals_recompute(tiny_model_dir, pooling):
    """One batch of: cached parents, an uncached parent, no prefix at all, an empty response, a
    child equal to its parent (no new token), and duplicates."""
    value = make_value(tiny_model_dir, pooling)
    rng = np.random.default_rng(1)
    prompt = list(rng.integers(4, 128, 6))
    a, b = prompt + [5, 6, 7], prompt + [9]
    forward_values(value, [ScoreItem(a, len(prompt), len(prompt)), ScoreItem(b, len(prompt), len(prompt))])
    items = [
        ScoreItem(a + [11, 12], len(a), len(prompt)),  # cached parent
        ScoreItem(b + [13], len(b), len(prompt)),  # cached parent
        ScoreItem(prompt + [40, 41, 42, 43], len(prompt) + 2, len(prompt)),  # parent never scored
        ScoreItem(list(rng.integers(4, 128, 10)), 0, None),  # no prefix, no known prompt
        ScoreItem(prompt, len(prompt), len(prompt)),  # empty response (prompt cached)
        ScoreItem(a, len(a), len(prompt)),  # no new token
        ScoreItem(a + [11, 12], len(a), len(prompt)),  # a duplicate in the same batch
    ]
    reused = forward_values(value, items)
    full = forward_values(value, items, use_cache=False)
    np.testing.assert_allclose(reused, full, rtol=1e-4, atol=1e-5)
    assert value.cache.hits > 0
    with torch.no_grad():  # both are the model's own per-token outputs, pooled
        direct = value.model(torch.tensor([items[0].token_ids]))[0][0].numpy()
    expected = {"last": direct[-1], "mean": direct[len(prompt):].mean(),
                "mean_before": direct[len(prompt) - 1: -1].mean()}[pooling]
    assert reused[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_many_steps_reuse_equals_recompute_with_small_batches(tiny_model_dir):
    value = make_value(tiny_model_dir)
    for items in search_steps(np.random.default_rng(2), searches=3, steps=5):
        np.testing.assert_allclose(forward_values(value, items, max_batch_tokens=64),
                                   forward_values(value, items, use_cache=False), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_tensor_operations_per_step_do_not_grow_with_candidates(tiny_model_dir):
    value = make_value(tiny_model_dir)
    counts = {}
    for searches in (1, 8):
        steps = search_steps(np.random.default_rng(searches), searches=searches)
        value.cache.clear()
        for items in steps[:2]:
            forward_values(value, items)
        with OpCounter() as counter:
            forward_values(value, steps[2])
        counts[searches] = sum(counter.ops.values())
    assert counts[8] == counts[1], counts


@pytest.mark.slow
def test_pool_respects_the_budget_and_evicts(tiny_model_dir, monkeypatch):
    from valuefn import kv_pool

    monkeypatch.setattr(kv_pool, "MIN_SLOTS", 64)
    value = make_value(tiny_model_dir)
    budget = CacheBudget(300 * value.cache.bytes_per_slot)
    value.cache = KVPool.for_model(value.model.backbone, budget)
    for items in search_steps(np.random.default_rng(4), searches=4, steps=6, w=3, k=4, prompt=30):
        np.testing.assert_allclose(forward_values(value, items), forward_values(value, items, use_cache=False),
                                   rtol=1e-4, atol=1e-5)
        assert value.cache.nbytes <= budget.max_bytes
    assert value.cache.evictions > 0
    # every slot is exactly one of: scratch, free, or owned by one cached sequence
    pool = value.cache
    owned = [seq.own for seq in pool.entries.values()]
    every = np.concatenate([[0], pool._free[: pool.free_slots], *owned])
    np.testing.assert_array_equal(np.sort(every), np.arange(pool.capacity))
    for seq in pool.entries.values():  # and a sequence's slots are its parent's plus its own
        if seq.parent is not None:
            np.testing.assert_array_equal(seq.slots, np.concatenate([seq.parent.slots, seq.own]))
        assert seq.pins == 0


def test_a_pool_that_needs_room_clears_the_least_recently_used_other_pool(tiny_model_dir):
    from valuefn import kv_pool

    first, second = make_value(tiny_model_dir), make_value(tiny_model_dir)
    budget = CacheBudget(kv_pool.MIN_SLOTS * first.cache.bytes_per_slot * 3 // 2)
    first.cache = KVPool.for_model(first.model.backbone, budget)
    second.cache = KVPool.for_model(second.model.backbone, budget)
    items = [ScoreItem([5, 6, 7, 8], 0, 2)]
    forward_values(first, items)
    assert first.cache.capacity > 0 and len(first.cache) == 1
    forward_values(second, items)
    assert first.cache.capacity == 0 and len(first.cache) == 0  # given up for the newer pool
    assert second.cache.nbytes <= budget.max_bytes
    np.testing.assert_allclose(forward_values(first, items), forward_values(first, items, use_cache=False), rtol=1e-4)


def test_a_pool_path_that_disagrees_falls_back_to_recomputation(tiny_model_dir, monkeypatch, caplog):
    from valuefn import kv_pool

    value = make_value(tiny_model_dir)
    assert check_kv_reuse(value)
    real_update = kv_pool.PoolStep.update

    def broken(self, k, v, layer_idx, *a, **kw):  # e.g. a transformers version that changed the protocol
        keys, values = real_update(self, k, v, layer_idx)
        return keys, values * 10

    monkeypatch.setattr(kv_pool.PoolStep, "update", broken)
    assert not check_kv_reuse(value)
    assert "scoring recomputes" in caplog.text
    items = [ScoreItem([5, 6, 7, 8, 9], 3, 2)]
    np.testing.assert_allclose(forward_values(value, items), forward_values(value, items, use_cache=False))
    assert len(value.cache) == 0


def test_load_backbone_reads_only_the_layers_it_keeps(tiny_model_dir, monkeypatch):
    from safetensors import safe_open

    read = []
    real_get = type(safe_open(str(next(tiny_model_dir.glob("*.safetensors"))), "pt")).get_tensor

    def counting_get(self, key):
        read.append(key)
        return real_get(self, key)

    monkeypatch.setattr(type(safe_open(str(next(tiny_model_dir.glob("*.safetensors"))), "pt")), "get_tensor",
                        counting_get)
    part = load_backbone(tiny_model_dir, 1, torch.float32, torch.device("cpu"))
    assert len(part.layers) == 1
    assert read and not any(".layers.1." in k or "lm_head" in k for k in read)
    from transformers import AutoModel

    full = truncate(AutoModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32), 1).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(part(ids).last_hidden_state, full(ids).last_hidden_state)
