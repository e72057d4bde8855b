"""Value model, checkpoints, registry and scorer on a tiny random Llama backbone."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch

from common.search_settings import SearchSettings
from valuefn.checkpoint import ADAPTER_FILE, HEAD_FILE, MANIFEST, CheckpointError
from valuefn.loader import BackbonePool, ValueLoader, init_value, publish_model
from valuefn.model import ValueModel, ValueModelConfig
from valuefn.registry import Registry, RegistryError, parse_spec
from valuefn.scorer import LoadedValue, ScoreItem, Scorer, ValueChain, chain_scores, forward_values

F32 = ValueModelConfig(dtype="float32", lora_r=4, lora_alpha=8)


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "values")


def trained_like(pool: BackbonePool, seed: int, pooling: str = "last") -> ValueModel:
    """A value model with non-trivial LoRA weights (as if trained)."""
    torch.manual_seed(seed)
    config = F32.model_copy(update={"pooling": pooling})
    model = ValueModel(pool.fresh(config), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_scores(tiny_model_dir, registry):
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    model = trained_like(pool, 0)
    version = publish_model(registry, "rt", model, pool.identity, extend_chain=False)
    ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
    model.eval()
    with torch.no_grad():
        expected = [model(torch.tensor([s]))[0][0, -1].item() for s in ids]
    loaded = ValueLoader(registry, pool, dtype="float32").load_version("rt", version)
    got = forward_values(loaded, [ScoreItem(s) for s in ids], use_cache=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # loaded values share the pool's backbone tensors: loading another must not change this one
    other = publish_model(registry, "rt", trained_like(pool, 9), pool.identity, extend_chain=False)
    second = ValueLoader(registry, pool, dtype="float32").load_version("rt", other)
    assert not np.allclose(forward_values(second, [ScoreItem(s) for s in ids], use_cache=False), expected, atol=1e-3)
    np.testing.assert_allclose(forward_values(loaded, [ScoreItem(s) for s in ids], use_cache=False), got, rtol=1e-6)
    manifest = json.loads((registry.path("rt", version) / MANIFEST).read_text())
    assert set(manifest["files"]) == {ADAPTER_FILE, HEAD_FILE}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in registry.path("rt", version).iterdir())


def test_format_1_manifests_read_as_last_token_values(tiny_model_dir, registry):
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    version = publish_model(registry, "old", trained_like(pool, 3, "mean"), pool.identity, extend_chain=False)
    path = registry.path("old", version) / MANIFEST
    m = json.loads(path.read_text())
    assert m["format_version"] == 2 and m["model"]["pooling"] == "mean"
    m["format_version"] = 1  # written before pooling existed: values were the last token's
    del m["model"]["pooling"]
    path.write_text(json.dumps(m))
    loaded = ValueLoader(registry, pool, dtype="float32").load_version("old", version)
    assert loaded.model.config.pooling == "last"
    ids = [5, 6, 7, 8, 9]
    with torch.no_grad():
        expected = loaded.model(torch.tensor([ids]))[0][0, -1].item()
    assert forward_values(loaded, [ScoreItem(ids, 0, 2)], use_cache=False)[0] == pytest.approx(expected, abs=1e-5)


OLD_MANIFEST = {  # as iro-serve wrote it before the search settings had one type (format 2, its own SearchDefaults)
    "format_version": 2, "name": "old", "version": 3, "created_at": 1764900000.0,
    "backbone": {"name": "tiny", "config_sha256": "a" * 64, "tokenizer_sha256": "b" * 64},
    "model": {"num_layers": 2, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"],
              "dtype": "float32", "pooling": "mean", "value_layers": None},
    "head": {"in_features": 16, "out_features": 1}, "chain": [{"version": 1, "beta": 1.0}, {"version": 3, "beta": 0.5}],
    "defaults": {"mode": "bon", "w": 2, "k": 6, "l": 4},
    "training": {}, "metrics": {}, "files": {ADAPTER_FILE: "0" * 64, HEAD_FILE: "1" * 64},
}


@pytest.mark.parametrize("defaults", [OLD_MANIFEST["defaults"], None], ids=["with defaults", "without"])
def test_manifests_written_before_search_settings_still_load(tmp_path, defaults):
    """The manifest's `defaults` is a `common.search_settings.SearchSettings` now, read from the same JSON
    (and written with the same keys, plus any new optional field)."""
    from valuefn.checkpoint import Manifest, read_manifest

    old = {k: v for k, v in OLD_MANIFEST.items() if k != "defaults" or defaults is not None}
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    manifest = read_manifest(tmp_path)
    expected = SearchSettings(mode="bon", w=2, k=6, l=4) if defaults else SearchSettings()
    assert isinstance(manifest.defaults, SearchSettings) and manifest.defaults == expected
    written = json.loads(manifest.model_dump_json())["defaults"]
    assert {k: written[k] for k in ("mode", "w", "k", "l")} == expected.model_dump(include={"mode", "w", "k", "l"})
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest  # round trip
    (tmp_path / MANIFEST).write_text(json.dumps({**old, "defaults": {"mode": "cbs", "w": 0}}))
    with pytest.raises(CheckpointError, match="invalid"):  # bounds of the one type still hold
        read_manifest(tmp_path)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "missing_file", "future_format", "wrong_backbone"])
def test_bad_checkpoints_are_refused(tiny_model_dir, registry, damage, tmp_path):
    from tests.conftest import make_tiny_llama

    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    version = publish_model(registry, "bad", trained_like(pool, 1), pool.identity, extend_chain=False)
    d = registry.path("bad", version)
    if damage == "flip_byte":
        data = bytearray((d / ADAPTER_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / ADAPTER_FILE).write_bytes(bytes(data))
    elif damage == "truncate":
        (d / HEAD_FILE).write_bytes((d / HEAD_FILE).read_bytes()[:20])
    elif damage == "missing_file":
        (d / ADAPTER_FILE).unlink()
    elif damage == "future_format":
        m = json.loads((d / MANIFEST).read_text())
        m["format_version"] = 99
        (d / MANIFEST).write_text(json.dumps(m))
    elif damage == "wrong_backbone":
        other = BackbonePool(make_tiny_llama(tmp_path / "other", hidden=48), torch.device("cpu"))
        with pytest.raises(CheckpointError) as err:
            ValueLoader(registry, other, dtype="float32").load_version("bad", version)
        assert err.value.reason == "backbone_mismatch"
        return
    with pytest.raises(CheckpointError) as err:
        ValueLoader(registry, pool, dtype="float32").load_version("bad", version)
    expected = {"flip_byte": "hash_mismatch", "truncate": "hash_mismatch", "missing_file": "missing_file",
                "future_format": "future_format"}[damage]
    assert err.value.reason == expected
    assert str(err.value)


@pytest.mark.parametrize("damage", ["unknown_key", "missing_module", "wrong_shape"])
def test_adapters_that_do_not_fit_the_model_are_refused(tiny_model_dir, registry, damage):
    from valuefn.checkpoint import build_value_model, load_trained_tensors, read_manifest

    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    version = publish_model(registry, "fit", trained_like(pool, 2), pool.identity, extend_chain=False)
    manifest = read_manifest(registry.path("fit", version))
    adapter, head = load_trained_tensors(registry.path("fit", version), manifest)
    key = next(k for k in adapter if k.endswith("q_proj.lora_A.weight"))
    if damage == "unknown_key":
        adapter[key.replace("q_proj", "qq_proj")] = adapter.pop(key)
    elif damage == "missing_module":
        del adapter[key], adapter[key.replace("lora_A", "lora_B")]
    else:
        adapter[key] = adapter[key][:, :-1]
    with pytest.raises(CheckpointError) as err:
        build_value_model(pool.fresh(manifest.model), manifest, adapter, head)
    assert err.value.reason == "shape_mismatch"


def test_chain_scores_match_direct_computation():
    values = np.array([[1.0, 0.5, -1.0], [2.0, -0.5, 0.0], [0.0, 1.5, 2.0]])
    betas = [0.5, 2.0, 1.0]
    s = values[:, 0] / betas[0]
    for i in (1, 2):
        s = values[:, i] / betas[i] + (s - np.log(np.exp(s).sum()))
    np.testing.assert_allclose(chain_scores(values, betas), s)
    np.testing.assert_allclose(chain_scores(values[:, :1], [2.0]), values[:, 0] / 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["last", "mean", "mean_before"])
def test_incremental_scoring_equals_full_recomputation(tiny_model_dir, registry, pooling):
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    version = publish_model(registry, "inc", trained_like(pool, 2, pooling), pool.identity, extend_chain=False)
    value = ValueLoader(registry, pool, dtype="float32").load_version("inc", version)
    assert value.model.config.pooling == pooling  # the manifest carries it
    rng = np.random.default_rng(0)
    prompt = list(rng.integers(4, 128, 9))
    beams = [prompt + list(rng.integers(4, 128, int(n))) for n in (3, 5, 1, 4)]
    for step in range(3):
        parents = [len(b) for b in beams]
        beams = [b + list(rng.integers(4, 128, int(n))) for b, n in zip(beams, (4, 2, 3, 1))]
        inc = forward_values(value, [ScoreItem(b, p if step else len(prompt), len(prompt)) for b, p in zip(beams, parents)])
        full = forward_values(value, [ScoreItem(b, 0, len(prompt)) for b in beams], use_cache=False)
        np.testing.assert_allclose(inc, full, rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # and both are the model's per-token outputs, pooled over the response
            per_token = [value.model(torch.tensor([b]))[0][0].numpy() for b in beams]
        direct = {"mean": [t[len(prompt):].mean() for t in per_token], "last": [t[-1] for t in per_token],
                  "mean_before": [t[len(prompt) - 1: -1].mean() for t in per_token]}[pooling]
        np.testing.assert_allclose(full, direct, rtol=1e-4, atol=1e-5)
    assert value.cache.hits > 0


def test_engine_values_are_a_head_on_the_frozen_base_model(tiny_model_dir, registry):
    from transformers import AutoModel

    config = ValueModelConfig(num_layers=None, lora_r=0, pooling="mean_before", dtype="float32")
    assert config.engine_value and not F32.engine_value
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    version = init_value(registry, "eh", tiny_model_dir, config, seed=1)
    value = ValueLoader(registry, pool, dtype="float32").load_version("eh", version)
    assert value.model.backbone is pool.template(config)  # frozen and shared: no copy per version
    manifest = json.loads((registry.path("eh", version) / MANIFEST).read_text())
    assert manifest["model"]["lora_r"] == 0 and set(manifest["files"]) == {ADAPTER_FILE, HEAD_FILE}
    chain = ValueChain("eh", ((value, 1.0),))
    (head,) = chain.value_heads
    base = AutoModel.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    ids = [5, 6, 7, 8, 9, 10]
    with torch.no_grad():
        hidden = base(torch.tensor([ids])).last_hidden_state[0].numpy()
    per_token = hidden @ np.array(head[:-1]) + head[-1]  # what the engine computes at every position
    got = forward_values(value, [ScoreItem(ids, 0, 2)], use_cache=False)
    np.testing.assert_allclose(got[0], per_token[1:5].mean(), rtol=1e-4, atol=1e-5)
    lora_chain = ValueChain("x", ((ValueLoader(registry, pool, dtype="float32").load_version("eh", version), 1.0),
                                  (LoadedValue("t", 1, None, trained_like(pool, 0)), 1.0)))
    assert lora_chain.value_heads is None  # one member needs its own backbone pass


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_before"])
def test_prefix_values_of_one_pass_equal_scoring_each_prefix(tiny_model_dir, registry, pooling):
    """APA reads V every few tokens of a rollout from one pass (`prefix_values`): the same values as
    scoring each prefix alone, rows of different lengths batched together."""
    from valuefn.scorer import prefix_values

    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    value = LoadedValue("p", 1, None, trained_like(pool, 2, pooling))
    items = [ScoreItem([5, 6, 7, 8, 9, 10, 11], 0, 2), ScoreItem([12, 13, 14, 15], 0, 3)]
    lengths = [[2, 4, 7], [3, 4]]
    got = prefix_values(value, items, lengths, max_batch_tokens=64)
    expected = [forward_values(value, [ScoreItem(it.token_ids[:n], 0, it.response_start) for n in ns], use_cache=False)
                for it, ns in zip(items, lengths)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(got[0], 5))) == 3  # the prefixes' values differ: the test can fail
    with pytest.raises(ValueError, match="prefix lengths"):
        prefix_values(value, items[:1], [[8]])


def test_scorer_micro_batches_concurrent_requests(tiny_model_dir, registry):
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    version = publish_model(registry, "q", trained_like(pool, 3), pool.identity, extend_chain=False)
    chain = ValueLoader(registry, pool, dtype="float32").load_chain("q", version)
    scorer = Scorer(threads=1)

    async def go():
        sets = [[ScoreItem([5 + i, 6, 7, 8 + j]) for j in range(4)] for i in range(6)]
        return sets, await asyncio.gather(*[scorer.values(chain, s) for s in sets])

    try:
        sets, results = asyncio.run(go())
    finally:
        scorer.close()
    for s, r in zip(sets, results):
        assert r.shape == (4, 1)
        direct = forward_values(chain.links[0][0], s, use_cache=False)
        np.testing.assert_allclose(r[:, 0], direct, rtol=1e-4, atol=1e-5)
    assert scorer.batches < 6  # several searches' candidates shared a forward pass


def test_registry_publish_chain_rollback_and_names(tiny_model_dir, registry):
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    v1 = publish_model(registry, "it", trained_like(pool, 4), pool.identity, extend_chain=True)
    v2 = publish_model(registry, "it", trained_like(pool, 5), pool.identity, extend_chain=True, beta=0.5,
                       defaults=SearchSettings(w=2, k=3, l=4))
    assert (v1, v2) == (1, 2)
    assert [c.version for c in registry.manifest("it", 2).chain] == [1, 2]
    assert registry.current("it") == 2 and registry.resolve("it@1") == ("it", 1)
    chain = ValueLoader(registry, pool, dtype="float32").load_chain("it")
    assert chain.versions == [1, 2] and chain.betas == [1.0, 0.5] and chain.defaults.k == 3
    assert registry.rollback("it") == 1 and registry.current("it") == 1
    with pytest.raises(RegistryError):
        registry.rollback("it")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(RegistryError):
            parse_spec(bad)
    with pytest.raises(RegistryError):
        parse_spec("it@0")


def test_publish_is_atomic_under_a_concurrent_reader(tiny_model_dir, registry):
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    model = trained_like(pool, 6)
    publish_model(registry, "atom", model, pool.identity, extend_chain=False)
    stop = threading.Event()
    seen, problems, reads = set(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                v = registry.current("atom")
                registry.verify("atom", v)  # CURRENT always names a complete, hash-valid version
                seen.add(v)
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                problems.append(repr(exc))
            reads[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(5):
            publish_model(registry, "atom", model, pool.identity, extend_chain=False)
            before = reads[0]
            deadline = time.monotonic() + 30
            while reads[0] < before + 2 and time.monotonic() < deadline:  # the reader sees each version
                time.sleep(0.001)
    finally:
        stop.set()
        t.join()
    assert not problems, problems[:3]
    assert registry.versions("atom") == [1, 2, 3, 4, 5, 6]
    assert len(seen) >= 5


def test_init_value_publishes_successive_versions(tiny_model_dir, registry):
    assert init_value(registry, "demo", tiny_model_dir, F32) == 1
    assert init_value(registry, "demo", tiny_model_dir, F32, seed=1) == 2
    m = registry.manifest("demo", 2)
    assert [c.version for c in m.chain] == [2] and m.training["kind"] == "init"
    assert registry.remove_old("demo", keep=1) == [1]


def test_the_kv_reuse_check_runs_once_per_architecture(tiny_model_dir, registry, monkeypatch):
    """A hot swap of a new version of the same architecture reuses the verdict (the check is about
    this transformers' attention, not the weights); another architecture is checked again."""
    from valuefn import loader as loader_module

    verdicts = iter([False, True])
    calls = []

    def check(value):
        calls.append(value.version)
        return next(verdicts)

    monkeypatch.setattr(loader_module, "check_kv_reuse", check)
    for seed in (0, 1):
        init_value(registry, "kv", tiny_model_dir, F32, seed=seed)
    init_value(registry, "kv2", tiny_model_dir, F32.model_copy(update={"lora_r": 2}))
    values = ValueLoader(registry, BackbonePool(tiny_model_dir, torch.device("cpu")), dtype="float32")
    first, second = values.load_version("kv", 1), values.load_version("kv", 2)
    other = values.load_version("kv2", 1)
    assert calls == [1, 1] and (first.kv_reuse, second.kv_reuse, other.kv_reuse) == (False, False, True)


def test_a_head_only_value_runs_the_base_model_once_per_architecture_to_be_verified(tiny_model_dir, registry,
                                                                                    monkeypatch):
    """Every loaded version is test-run and refused on non-finite values; a value without LoRA
    shares the frozen backbone, so a hot swap runs only its head on cached features."""
    config = ValueModelConfig(num_layers=None, lora_r=0, pooling="mean_before", dtype="float32")
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    calls = []
    features = ValueModel.features
    monkeypatch.setattr(ValueModel, "features", lambda self, *a, **kw: calls.append(1) or features(self, *a, **kw))
    values = ValueLoader(registry, pool, dtype="float32")
    for seed in (0, 1):
        values.load_version("eh", init_value(registry, "eh", tiny_model_dir, config, seed=seed))
    assert len(calls) == 1
    bad = ValueModel(pool.fresh(config), config)
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    version = publish_model(registry, "eh", bad, pool.identity, extend_chain=False)
    with pytest.raises(CheckpointError) as refused:
        values.load_version("eh", version)
    assert refused.value.reason == "bad_values" and len(calls) == 1
    values.load_version("lora", init_value(registry, "lora", tiny_model_dir, F32))
    assert len(calls) > 1  # a LoRA value changes the backbone: its whole forward runs


def test_values_train_in_float32_where_the_machine_would_pick_float16(monkeypatch):
    """A pre-Ampere GPU's "auto" is float16 for the engine; a value's manifest must stay valid."""
    from common import dtype as dtype_mod
    from valuefn import model as model_mod
    from valuefn.model import ValueModelConfig

    monkeypatch.setattr(model_mod, "resolve_dtype", lambda requested, device=None: "float16")
    config = ValueModelConfig(num_layers=2).resolved("cuda")
    assert config.dtype == "float32" and ValueModelConfig.model_validate(config.model_dump()).dtype == "float32"
    assert dtype_mod.resolve_dtype("bfloat16") == "bfloat16"


def test_an_engine_value_the_engine_computes_holds_no_backbone_until_the_scorer_needs_one(tiny_model_dir, registry):
    """With an engine probe (the serving engine runs the heads on a test sequence), an engine value
    is verified there and its model is built only on the scorer's first use; the probe's values
    decide the refusal; a probe that cannot compute the heads (None) loads it as before."""
    config = ValueModelConfig(num_layers=None, lora_r=0, pooling="mean_before", dtype="float32")
    pool = BackbonePool(tiny_model_dir, torch.device("cpu"))
    version = init_value(registry, "eh", tiny_model_dir, config, seed=1)
    asked = []

    def probe(heads, layers):
        asked.append((heads, layers))
        return [[0.5]]

    value = ValueLoader(registry, pool, dtype="float32", engine_probe=probe).load_version("eh", version)
    assert not value.built and not pool._templates  # no backbone anywhere in this process
    reference = ValueLoader(registry, BackbonePool(tiny_model_dir, torch.device("cpu")), dtype="float32").load_version(
        "eh", version)
    assert ValueChain("eh", ((value, 1.0),)).value_heads == ValueChain("eh", ((reference, 1.0),)).value_heads
    assert asked == [(ValueChain("eh", ((reference, 1.0),)).value_heads, None)]
    items = [ScoreItem([5, 6, 7, 8, 9, 10], 0, 2)]
    np.testing.assert_allclose(forward_values(value, items, use_cache=False),
                               forward_values(reference, items, use_cache=False), rtol=1e-5)
    assert value.built  # the scorer's first use built it

    def nan_probe(heads, layers):
        return [[float("nan")]]

    with pytest.raises(CheckpointError) as exc:
        ValueLoader(registry, pool, dtype="float32", engine_probe=nan_probe).load_version("eh", version)
    assert exc.value.reason == "bad_values"
    fallback = ValueLoader(registry, pool, dtype="float32", engine_probe=lambda heads, layers: None)
    assert fallback.load_version("eh", version).built


def test_a_manifest_written_before_the_rename_reads_its_feature_layers_as_value_layers():
    old = ValueModelConfig.for_engine_value(value_layers=[2, 3]).model_dump()
    old["feature_layers"] = old.pop("value_layers")
    config = ValueModelConfig.model_validate(old)
    assert config.value_layers == [2, 3] and config.engine_value
    assert "feature_layers" not in config.model_dump()
