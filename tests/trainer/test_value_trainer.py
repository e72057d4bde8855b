"""Value training on a tiny random Llama: it learns, touches only LoRA + head, is deterministic,
and publishes V_t after V_{t-1} with the chain extended."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.engine_args import default_value_layers
from trainer.value_config import ValueTrainConfig
from trainer.value_trainer import (
    Example, ValueTrainer, collate, examples_from_records, pairwise_accuracy, publish_saved, read_rollouts,
    response_values, save_result, spearman, split_examples,
)
from valuefn.checkpoint import CheckpointError
from valuefn.loader import BackbonePool, ValueLoader
from valuefn.registry import Registry
from valuefn.scorer import ScoreItem, forward_values

from .conftest import synthetic_records

LORA = dict(kind="lora", num_layers=None, lora_r=4, lora_alpha=8, dtype="float32")
FAST = dict(batch_size=16, progress=False, eval_fraction=0.25)


def config(model: dict | None = None, **overrides) -> ValueTrainConfig:
    return ValueTrainConfig(model=model or LORA, **(FAST | overrides))


@pytest.fixture(scope="module")
def examples():
    return examples_from_records(synthetic_records())[0]


@pytest.fixture
def pool(tiny_backbone):
    return BackbonePool(tiny_backbone, torch.device("cpu"))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- data handling
def test_records_become_examples_and_unlabelled_or_empty_ones_are_counted(tmp_path):
    records = synthetic_records(n_prompts=3, samples=2)
    records[0]["reward"] = None
    records[1]["response_token_ids"] = []
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    examples, skipped = examples_from_records(read_rollouts(path))
    assert len(examples) == 4 and skipped == {"unlabelled": 1, "empty_response": 1}
    assert examples[0].prompt_ids == tuple(records[2]["prompt_token_ids"]) and examples[0].group == "p1"
    records[2]["reward"] = "high"
    with pytest.raises(ValueError, match="reward must be a finite number"):
        examples_from_records(records)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1: not JSON"):
        read_rollouts(path)


def test_batches_locate_responses_by_length_even_when_prompts_contain_the_pad_id():
    # token 2 is the pad id *and* ends chat turns inside prompts
    a = Example((1, 2, 9, 2), (5, 6, 2), 1.0, "a")
    b = Example((1, 2), (7, 8, 9, 10, 11), -1.0, "b")
    batch = collate([a, b], max_len=6)
    assert batch.prompt_lens.tolist() == [4, 2] and batch.lengths.tolist() == [3, 5]
    assert batch.kept.tolist() == [2, 4]  # cut at max_len=6: a keeps 2 response tokens, b keeps 4
    assert batch.attention_mask.tolist() == [[1] * 6, [1] * 6]
    picked = response_values(batch.input_ids.float(), batch.prompt_lens, int(batch.kept.max()))
    mask = torch.arange(4)[None, :] < batch.kept[:, None]
    assert (picked * mask).tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]
    short = collate([Example((1,), (4,), 0.0, "c"), b], max_len=64)
    assert short.attention_mask[0].tolist() == [1, 1, 0, 0, 0, 0, 0] and short.kept.tolist() == [1, 5]


def test_split_is_by_prompt_and_deterministic(examples):
    train, held_out = split_examples(examples, 0.25, seed=0)
    assert {e.group for e in train}.isdisjoint({e.group for e in held_out})
    assert len({e.group for e in held_out}) == 10 and len(train) + len(held_out) == len(examples)
    assert split_examples(examples, 0.25, seed=0) == (train, held_out)
    assert split_examples(examples, 0.25, seed=1)[1] != held_out
    assert split_examples(examples, 0.0, seed=0) == (list(examples), [])


def test_ranking_metrics():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert pairwise_accuracy([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert pairwise_accuracy([1, 1], [0, 1]) == 0.5
    assert pairwise_accuracy([2, 1, 3, 0], [1, 2, 3, 4], ["x", "x", "y", "y"]) == 0.0  # across groups: ignored


# --------------------------------------------------------------------------- training
def test_training_lowers_held_out_loss_on_a_task_with_a_known_answer(tiny_backbone, examples):
    trainer = ValueTrainer(config(lr=1e-2, epochs=5), tiny_backbone)
    result = trainer.train(examples)
    before, after = result.metrics["eval_before"], result.metrics["eval"]
    assert after["mse"] < 0.3 * before["mse"]
    assert after["spearman"] > 0.6 and after["pair_acc"] > 0.7
    assert result.training["tokens_per_second"] > 0 and result.training["steps"] == 40
    assert np.mean(result.history[-8:]) < np.mean(result.history[:8])


def test_one_step_changes_lora_and_head_but_not_the_backbone(tiny_backbone, examples):
    trainer = ValueTrainer(config(max_steps=1), tiny_backbone)
    before = snapshot(trainer.model)
    trainer.train(examples)
    after = snapshot(trainer.model)
    lora_b = [k for k in before if "lora_B" in k]
    frozen = [k for k in before if "lora_" not in k and not k.startswith("head.")]
    assert lora_b and frozen and len(frozen) > 10
    assert all(not torch.equal(before[k], after[k]) for k in lora_b + ["head.weight", "head.bias"])
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n and not n.startswith("head."))


@pytest.mark.parametrize("layers", ["auto", "none"])
def test_an_engine_value_trains_only_its_head_on_the_frozen_base_model(tiny_backbone, examples, layers):
    """Engine values (a head on the middle layer's residual stream by default, or on the final
    hidden state): only the head trains, on backbone features computed once (`_cache_features`);
    the cached features give the metrics a full forward gives."""
    engine = {"kind": "engine", "value_layers": layers, "dtype": "float32"}
    trainer = ValueTrainer(config(engine, lr=3e-2, epochs=5), tiny_backbone)
    total = trainer.pool.identity["total_layers"]
    arch = trainer.model.config
    assert arch.engine_value
    auto = list(default_value_layers(total))
    assert (arch.value_layers, arch.num_layers) == ((auto, max(auto)) if layers == "auto" else (None, None))
    before = snapshot(trainer.model)
    result = trainer.train(examples)
    after = snapshot(trainer.model)
    assert not any("lora_" in k for k in after) and trainer.model.adapter_state_dict() == {}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    assert result.metrics["eval"]["mse"] < 0.8 * result.metrics["eval_before"]["mse"]
    _, held_out = split_examples(examples, trainer.config.eval_fraction, trainer.config.seed)
    assert trainer._features is None  # dropped after training: this evaluation runs the backbone
    assert trainer.evaluate(held_out)["mse"] == pytest.approx(result.metrics["eval"]["mse"], rel=1e-3)


def test_bfloat16_backbone_with_float32_head_trains_on_cpu(tiny_backbone, examples):
    trainer = ValueTrainer(config(dtype="bfloat16", max_steps=2), tiny_backbone)
    result = trainer.train(examples)
    assert trainer.model.head.weight.dtype == torch.float32
    assert next(p for n, p in trainer.model.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16
    assert all(np.isfinite(result.history)) and np.isfinite(result.metrics["eval"]["mse"])


def test_same_seed_same_model_other_seed_other_model(tiny_backbone, examples):
    def run(seed):
        trainer = ValueTrainer(config(max_steps=3, seed=seed), tiny_backbone)
        result = trainer.train(examples)
        return trainer.model.adapter_state_dict() | trainer.model.head_state_dict(), result.history

    (w1, h1), (w2, h2), (w3, _) = run(0), run(0), run(1)
    assert h1 == h2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_gae_targets_and_truncation_train(tiny_backbone, examples):
    trainer = ValueTrainer(config(max_steps=2, gae_lambda=0.95, gamma=0.99, max_len=10), tiny_backbone)
    result = trainer.train(examples)
    assert result.training["examples"]["skipped_prompt_too_long"] > 0
    assert all(np.isfinite(result.history))


# --------------------------------------------------------------------------- publishing
def test_publish_extends_the_chain_and_the_next_version_starts_from_the_previous(tiny_backbone, examples, tmp_path, pool):
    registry = Registry(tmp_path / "values")
    first = ValueTrainer(config(max_steps=2), tiny_backbone, registry=registry, name="demo", pool=pool)
    r1 = first.train(examples, data="iter1.jsonl")
    assert r1.init_from is None
    assert first.publish(r1) == 1

    second = ValueTrainer(config(max_steps=2, seed=7), tiny_backbone, registry=registry, name="demo", pool=pool)
    assert second.init_from == 1
    v1 = r1.model.adapter_state_dict() | r1.model.head_state_dict()
    start = second.model.adapter_state_dict() | second.model.head_state_dict()
    assert all(torch.equal(v1[k], start[k]) for k in v1)  # initialised from V_1, not from the seed
    r2 = second.train(examples)
    assert second.publish(r2, beta=2.0) == 2
    manifest = registry.manifest("demo", 2)
    assert [(l.version, l.beta) for l in manifest.chain] == [(1, 1.0), (2, 2.0)]
    assert manifest.training["init_from"] == 1 and manifest.training["parent"] == 1
    assert manifest.metrics["eval"]["mse"] == r2.metrics["eval"]["mse"]
    assert registry.manifest("demo", 1).training["data"] == "iter1.jsonl"

    # the server's loader accepts it, and scores a response like the training-side model did
    chain = ValueLoader(registry, BackbonePool(tiny_backbone, torch.device("cpu")), dtype="float32").load_chain("demo")
    assert chain.versions == [1, 2]
    ex = examples[0]
    assert chain.links[-1][0].model.config.pooling == "mean"  # the trainer's default, carried by the manifest
    with torch.no_grad():
        ids = torch.tensor([ex.prompt_ids + ex.response_ids])
        expected = r2.model(ids)[0][0, len(ex.prompt_ids):].mean().item()
    item = ScoreItem(list(ex.prompt_ids + ex.response_ids), 0, len(ex.prompt_ids))
    got = forward_values(chain.links[-1][0], [item], use_cache=False)[0]
    assert got == pytest.approx(expected, abs=1e-4)
    trainer_side = second.evaluate([ex])  # the trainer's final-token prediction is the same pooled value
    assert trainer_side["final_mse"] == pytest.approx((got - ex.reward) ** 2, abs=1e-3)


AVX2_ONLY = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 avx avx2 fma\n"


def test_auto_dtype_is_resolved_at_train_time_and_recorded_resolved(tiny_backbone, examples, tmp_path, pool,
                                                                     monkeypatch):
    from common import dtype as dtypes

    monkeypatch.setattr(dtypes, "_read_cpuinfo", lambda: AVX2_ONLY)  # a CPU without native bf16
    registry = Registry(tmp_path / "values")
    trainer = ValueTrainer(config(dtype="auto", max_steps=1), tiny_backbone, registry=registry, name="demo", pool=pool)
    assert trainer.config.model.dtype == "float32"
    assert next(p for n, p in trainer.model.named_parameters() if "q_proj.base_layer" in n).dtype == torch.float32
    result = trainer.train(examples)
    trainer.publish(result)
    manifest = registry.manifest("demo", 1)
    assert manifest.model.dtype == "float32" and manifest.training["dtype"] == "float32"
    assert manifest.training["config"]["model"]["dtype"] == "float32"

    # serving runs it in the serving machine's dtype (here asked for explicitly), not the manifest's
    value = ValueLoader(registry, pool, dtype="bfloat16").load_version("demo", 1)
    assert value.manifest.model.dtype == "float32" and value.model.config.dtype == "bfloat16"
    assert next(value.model.backbone.parameters()).dtype == torch.bfloat16


def test_presets_train_in_the_machines_dtype():
    assert ValueTrainConfig.from_preset("full").model.dtype == "auto"
    assert ValueTrainConfig.from_preset("smoke").model.dtype == "auto"


def test_publishing_after_current_moved_is_refused(tiny_backbone, examples, tmp_path, pool):
    registry = Registry(tmp_path / "values")
    slow = ValueTrainer(config(max_steps=1), tiny_backbone, registry=registry, name="demo", pool=pool)
    fast = ValueTrainer(config(max_steps=1), tiny_backbone, registry=registry, name="demo", pool=pool)
    fast.publish(fast.train(examples))
    with pytest.raises(CheckpointError, match="CURRENT is v1 now") as err:
        slow.publish(slow.train(examples))
    assert err.value.reason == "stale_parent"


def test_saved_checkpoints_publish_later(tiny_backbone, examples, tmp_path, pool):
    registry = Registry(tmp_path / "values")
    trainer = ValueTrainer(config(max_steps=1), tiny_backbone, registry=registry, name="demo", pool=pool)
    out = save_result(trainer.train(examples), tmp_path / "ckpt", "demo")
    assert registry.versions("demo") == []
    assert publish_saved(out, registry) == ("demo", 1)
    with pytest.raises(CheckpointError, match="CURRENT is v1"):
        publish_saved(out, registry)
    assert publish_saved(out, registry, force=True) == ("demo", 2)
    assert [l.version for l in registry.manifest("demo", 2).chain] == [1, 2]
    (out / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as err:
        publish_saved(out, registry, force=True)
    assert err.value.reason == "hash_mismatch"
