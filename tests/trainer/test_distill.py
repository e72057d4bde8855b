"""Distillation on a synthetic task with a known answer (tiny random Llama): the reward is the
fraction of response tokens from the lower half of the vocabulary. APA and IS-DPO must lower
their held-out loss and raise the reward of plain samples; the adapter publishes as a policy."""

import json
import random

import pytest
import torch

from trainer.distill import DistillTrainer, make_pairs
from trainer.distill_config import DistillConfig
from trainer.value_trainer import Example
from valuefn.checkpoint import CheckpointError
from registry.policies import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PolicyRegistry, check_adapter, check_base

HALF = 16  # the tiny model of these tests has a 32-word vocabulary


def low_half_reward(prompts, responses):
    """Fraction of the response's words `wN` with N < 16 (0 for an empty response)."""
    out = []
    for text in responses:
        words = [w for w in text.split() if w.startswith("w") and w[1:].isdigit()]
        out.append(sum(int(w[1:]) < HALF for w in words) / len(words) if words else 0.0)
    return out


def rollouts(model_dir, n_prompts=32, samples=8, max_new=8, seed=0, vocab=32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples, texts = [], {}
    for p in range(n_prompts):
        prompt = (1,) + tuple(rng.randrange(4, vocab) for _ in range(4))
        ids = torch.tensor([prompt])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                             max_new_tokens=max_new, min_new_tokens=max_new, num_return_sequences=samples,
                             pad_token_id=0, eos_token_id=None)
        responses = [tuple(int(t) for t in row[len(prompt):]) for row in gen]
        rewards = low_half_reward(None, [tok.decode(r) for r in responses])
        texts[f"p{p}"] = tok.decode(prompt)
        examples += [Example(prompt, r, w, f"p{p}") for r, w in zip(responses, rewards)]
    return examples, texts


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny32"), vocab=32)


@pytest.fixture(scope="module")
def data(tiny32):
    return rollouts(tiny32, n_prompts=48)


def config(method, **kw):
    base = dict(method=method, lr=1e-2, epochs=4, batch_size=8, dtype="float32", device="cpu", eval_fraction=0.25,
                eval_prompts=8, eval_samples=8, eval_max_tokens=8, progress=False, lora_r=4, lora_alpha=8, seed=0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return DistillConfig(**(base | kw))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["apa", "is-dpo"])
def test_distillation_lowers_loss_and_raises_reward(tiny32, data, method, tmp_path):
    examples, texts = data
    trainer = DistillTrainer(config(method), tiny32)
    base_weights = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora" not in k}
    result = trainer.train(examples, reward_fn=low_half_reward, prompt_texts=texts, data="synthetic")
    m = result.metrics
    assert m["eval"]["loss"] < m["eval_before"]["loss"], m
    if method == "apa":  # IS-DPO's weights grow as the policy moves onto the data: its train loss is not monotone
        assert m["train_loss_last"] < m["train_loss_first"], m
    assert m["eval"]["kl_to_base"] > m["eval_before"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert m["samples"]["reward_policy"] > m["samples"]["reward_base"] + 0.03, m["samples"]
    for k, v in trainer.model.named_parameters():  # the base model is frozen
        if "lora" not in k:
            assert torch.equal(v, base_weights[k]), k

    registry = PolicyRegistry(tmp_path / "policies")
    version = trainer.publish(result, registry, f"syn-{method}")
    assert version == 1 and registry.current(f"syn-{method}") == 1
    manifest = registry.verify(f"syn-{method}", 1)
    assert manifest.method == method and manifest.lora_rank == 4
    assert manifest.metrics["samples"]["reward_gain"] > 0
    check_base(manifest, trainer.identity)
    directory = registry.path(f"syn-{method}", 1)
    tensors = check_adapter(directory, manifest)
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in tensors)  # peft/vLLM layout
    assert json.loads((directory / ADAPTER_CONFIG).read_text())["r"] == 4


def test_corrupted_or_mismatched_adapter_is_refused(tiny32, data, tmp_path):
    examples, _ = data
    trainer = DistillTrainer(config("apa", max_steps=1, eval_prompts=0), tiny32)
    result = trainer.train(examples)
    registry = PolicyRegistry(tmp_path)
    trainer.publish(result, registry, "pol")
    assert trainer.publish(result, registry, "pol") == 2
    d = registry.path("pol", 2)
    with open(d / ADAPTER_WEIGHTS, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    with pytest.raises(CheckpointError) as err:
        check_adapter(d, registry.manifest("pol", 2))
    assert err.value.reason == "hash_mismatch"
    check_adapter(registry.path("pol", 1), registry.manifest("pol", 1))  # the old version is intact
    with pytest.raises(CheckpointError) as err:
        check_base(registry.manifest("pol", 1), {**trainer.identity, "config_sha256": "other"})
    assert err.value.reason == "base_mismatch"
    assert registry.rollback("pol") == 1
    registry.delete("pol", 2)
    assert registry.versions("pol") == [1]


def test_pairs_need_different_rewards():
    same = [Example((1,), (2,), 0.5, "a"), Example((1,), (3,), 0.5, "a")]
    assert make_pairs(same) == []
    close = [Example((1,), (2,), 0.9, "b"), Example((1,), (3,), 0.8, "b"), Example((1,), (2,), 0.9, "c"),
             Example((1,), (4,), -0.2, "c")]
    assert [p[0].group for p in make_pairs(close)] == ["b", "c"]
    assert [(p[0].reward, p[1].reward) for p in make_pairs(close, min_gap=0.25)] == [(0.9, -0.2)]  # b: too close
    with pytest.raises(ValueError, match="min_reward_gap"):
        DistillConfig(min_reward_gap=-0.1)
    assert DistillConfig(method="is-dpo", min_reward_gap=0.25).hyperparameters()["min_reward_gap"] == 0.25
    assert DistillConfig(method="is-ipo", sft_weight=1.0).hyperparameters()["sft_weight"] == 1.0
    for method in ("apa", "is-dpo"):  # every method takes the cover term
        assert DistillConfig(method=method, cover_weight=0.3).hyperparameters()["cover_weight"] == 0.3
    with pytest.raises(ValueError, match="cover_weight"):
        DistillConfig(cover_weight=-1)
    for option in ("min_reward_gap", "sft_weight"):  # pair options are refused for APA, not ignored
        with pytest.raises(ValueError, match=f"{option} apply to the pair methods"):
            DistillConfig(method="apa", **{option: 0.5})
    with pytest.raises(ValueError, match="method"):
        DistillConfig(method="ppo")


@pytest.mark.slow
def test_sft_weight_keeps_the_chosen_answers_likelier_than_dpo_alone(tiny32, data):
    """RPO's term: after the same steps from the same seed, the policy trained with it gives the
    chosen answers of the training pairs a higher likelihood than plain IS-DPO does."""
    from trainer.distill import collate
    from trainer.distill_losses import sequence_logps

    examples, texts = data
    pairs = make_pairs(examples)

    def chosen_logp(sft_weight: float) -> float:
        trainer = DistillTrainer(config("is-dpo", max_steps=20, eval_every=None, eval_prompts=0, sft_weight=sft_weight),
                                 tiny32)
        trainer.train(examples, prompt_texts=texts)
        batch = collate([c for c, _ in pairs], trainer.config.max_len).to(trainer.device)
        mask = trainer._response_mask(batch)
        with torch.no_grad():
            _, logp = sequence_logps(trainer._logits(batch, reference=False), batch.input_ids, mask)
        return float((logp / mask.sum(-1)).mean())

    assert chosen_logp(5.0) > chosen_logp(0.0) + 0.01  # 20 steps: about +0.03 nats per token here


@pytest.mark.slow
@pytest.mark.parametrize("method", ["apa", "is-dpo"])
def test_cover_weight_keeps_the_policy_closer_to_the_base(tiny32, data, method):
    """The forward-KL term: after the same steps from the same seed, KL(base || policy) over the
    training responses is smaller with it than without."""
    from trainer.distill import collate
    from trainer.distill_losses import cover_kl

    examples, texts = data

    def forward_kl(cover_weight: float) -> float:
        trainer = DistillTrainer(config(method, max_steps=20, eval_every=None, eval_prompts=0,
                                        cover_weight=cover_weight), tiny32)
        trainer.train(examples, prompt_texts=texts)
        batch = collate(examples[:64], trainer.config.max_len).to(trainer.device)
        with torch.no_grad():
            return float(cover_kl(trainer._logits(batch, reference=False), trainer._logits(batch, reference=True),
                                  trainer._response_mask(batch)))

    plain, covered = forward_kl(0.0), forward_kl(5.0)
    assert plain > 0.01
    assert covered < 0.7 * plain


def test_a_reward_gap_no_pair_reaches_is_refused_by_name(tiny32, data):
    examples, texts = data
    with pytest.raises(ValueError, match="no preference pairs.*min_reward_gap=5 apart"):
        DistillTrainer(config("is-dpo", min_reward_gap=5.0), tiny32).train(examples, prompt_texts=texts)


def test_distill_and_policies_commands(tiny32, data, tmp_path):
    """`iro distill` publishes a version; `iro policies ls/show/rollback` read the registry."""
    from typer.testing import CliRunner

    from iro.cli import app

    examples, texts = data
    rollouts = tmp_path / "labelled.jsonl"
    rollouts.write_text("".join(json.dumps({"id": f"{e.group}:{i}", "prompt_id": e.group, "prompt": texts[e.group],
                                            "prompt_token_ids": list(e.prompt_ids),
                                            "response_token_ids": list(e.response_ids), "reward": e.reward}) + "\n"
                                for i, e in enumerate(examples[:64])))
    policies = tmp_path / "policies"
    runner = CliRunner()
    args = ["distill", str(rollouts), "--method", "is-dpo", "--name", "cli-pol", "--policies-dir", str(policies),
            "--preset", "smoke", "--model", str(tiny32), "--set", "device=cpu", "--set", "dtype=float32",
            "--set", "progress=false", "--set", "max_steps=2", "--set", "eval_prompts=0"]
    for expected in (1, 2):
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.output
        assert f"published policy cli-pol v{expected} (is-dpo)" in out.output
    listed = json.loads(runner.invoke(app, ["policies", "ls", "--policies-dir", str(policies), "--json"]).output)
    assert listed == [{"name": "cli-pol", "current": 2, "versions": [1, 2], "method": "is-dpo"}]
    shown = json.loads(runner.invoke(app, ["policies", "show", "cli-pol@1", "--policies-dir", str(policies)]).output)
    assert shown["hyperparameters"]["beta"] == 0.1 and shown["hyperparameters"]["clip_eps"] == 1.0
    assert "v1" in runner.invoke(app, ["policies", "rollback", "cli-pol", "--policies-dir", str(policies)]).output
    bad = runner.invoke(app, args[:4] + ["--name", "../x"] + args[6:])
    assert bad.exit_code == 2 and "invalid policy name" in bad.output


def test_value_advantages_telescope_to_reward_minus_value(monkeypatch):
    """Per-token APA advantages from a value: chunk temporal differences, V after the last token = R."""
    from types import SimpleNamespace

    import valuefn.scorer
    from trainer.distill import value_advantages

    # V(prompt + k response tokens) = 0.1 * k: the fake value reads only how far the response got
    monkeypatch.setattr(valuefn.scorer, "prefix_values", lambda value, items, lengths, **kw: [
        [0.1 * (n - it.response_start) for n in ns] for it, ns in zip(items, lengths)])
    chain = SimpleNamespace(links=((object(), 1.0),))
    e = Example((1, 2), tuple(range(10, 20)), 2.0, "p")  # 10 response tokens, chunks [0, 4), [4, 8), [8, 10)
    adv = value_advantages(chain, [e], chunk=4)[0]
    assert value_advantages(chain, [e] * 5, chunk=4, group=2) == [adv] * 5  # in groups of 2 rollouts: the same
    assert len(adv) == 10
    assert adv[:4] == pytest.approx([0.1] * 4)  # (V(4) - V(0)) / 4 = 0.4 / 4
    assert adv[8:] == pytest.approx([(2.0 - 0.8) / 2] * 2)  # the last chunk ends at the reward
    assert sum(adv) == pytest.approx(2.0 - 0.0)  # R - V(prompt)


def test_is_dpo_pairs_are_ranked_by_the_value_when_no_reward_is_given(monkeypatch):
    """Unlabelled rollouts + a value: V after the whole response is the ranking (the issue's
    "ranked by the reward, or by the value when no reward is given"); labelled ones keep their reward."""
    from types import SimpleNamespace

    import valuefn.scorer
    from trainer.distill import distill_examples

    # the fake value likes long responses: V = number of response tokens
    monkeypatch.setattr(valuefn.scorer, "forward_values",
                        lambda value, items, **kw: [float(len(it.token_ids) - it.response_start) for it in items])
    chain = SimpleNamespace(links=((object(), 1.0),))
    records = [{"id": f"p:{j}", "prompt_id": "p", "prompt_token_ids": [1, 2], "response_token_ids": [5] * n,
                "reward": None} for j, n in enumerate((2, 7, 4))]
    examples, skipped, ranked_by = distill_examples(records, "is-dpo", chain)
    assert ranked_by == "value" and skipped == {} and [e.reward for e in examples] == [2.0, 7.0, 4.0]
    (chosen, rejected), = make_pairs(examples)
    assert (len(chosen.response_ids), len(rejected.response_ids)) == (7, 2)
    assert distill_examples(records, "is-dpo", None)[0] == []  # no value: nothing to rank by
    assert distill_examples(records, "apa", chain)[0] == []  # APA needs the reward at the end
    labelled = [{**records[0], "reward": 0.9}, {**records[1], "reward": 0.1}]
    examples, _, ranked_by = distill_examples(labelled, "is-dpo", chain)
    assert ranked_by == "reward" and make_pairs(examples)[0][0].reward == 0.9
