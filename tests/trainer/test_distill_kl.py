"""The KL budget and checkpoint selection inside `DistillTrainer.train` (tiny random Llama): training
stops where the KL reaches the budget, the best eligible checkpoint is the one restored and
published, the manifest says which and why, and a run with none eligible falls back or refuses."""

import pytest
import torch

from tests.trainer.test_distill import config, low_half_reward, rollouts
from trainer.distill import DistillTrainer
from trainer.distill_checkpoints import NoEligibleCheckpoint
from registry.policies import ADAPTER_WEIGHTS, PolicyRegistry


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny32"), vocab=32)


@pytest.fixture(scope="module")
def data(tiny32):
    return rollouts(tiny32, n_prompts=16, samples=4)


@pytest.mark.slow
def test_training_stops_at_the_kl_budget_and_publishes_the_best_eligible_checkpoint(tiny32, data, tmp_path,
                                                                                   monkeypatch):
    """Scripted measurements (the KL and the samples of each checkpoint), real training steps and weights."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    kls = iter([0.0, 0.01, 0.03, 0.05, 0.09])  # before training, then the checkpoints at steps 2, 4, 6, (8)
    samples = iter([(0.2, 0.70), (0.5, 0.69), (0.6, 0.60)])  # (reward, distinct-2): step 6 loses 14% diversity

    def evaluate(self, units, advantages, rollouts):  # the held-out loss is only measured for the chosen one
        return {"loss": 1.5 if not rollouts else (1.0 if units else None), "kl_to_base": next(kls) if rollouts else None}

    monkeypatch.setattr(DistillTrainer, "evaluate", evaluate)

    def sample_metrics(self, prompts, reward_fn, *, adapter):
        assert len(prompts) == 2  # eval_prompts
        if not adapter:
            return {"reward": 0.1, "distinct_2": 0.70}
        reward, d2 = next(samples)
        return {"reward": reward, "distinct_2": d2}

    monkeypatch.setattr(DistillTrainer, "sample_metrics", sample_metrics)
    snapshots = []
    real_state = DistillTrainer._adapter_state
    monkeypatch.setattr(DistillTrainer, "_adapter_state", lambda self: snapshots.append(real_state(self)) or snapshots[-1])

    examples, texts = data
    trainer = DistillTrainer(config("is-dpo", eval_every=2, kl_budget=0.05, max_steps=20, eval_prompts=2), tiny32)
    result = trainer.train(examples, reward_fn=low_half_reward, prompt_texts=texts)

    sel = result.metrics["selection"]
    assert result.training["steps"] == 6 and result.training["chosen_step"] == 4  # stopped, and not at the last one
    assert sel["stopped"] == "KL 0.0500 reached the budget 0.05 at step 6" and sel["kl_rule"] == "stop"
    assert (sel["rule"], sel["requested"], sel["chosen_step"], sel["eligible"]) == ("reward", "reward", 4, True)
    assert sel["why"] == "highest held-out reward (+0.5000) of the 2 eligible checkpoints"
    assert [(r["step"], r["kl_to_base"], r["reward"], r["eligible"]) for r in sel["checkpoints"]] == [
        (2, 0.01, 0.2, True), (4, 0.03, 0.5, True), (6, 0.05, 0.6, False)]
    assert sel["checkpoints"][2]["why_not"] == ["distinct-2 0.6000 is more than 10% below the base's 0.7000"]
    assert sel["base"] == {"reward": 0.1, "distinct_2": 0.70}
    assert result.metrics["eval"] == {"loss": 1.5, "kl_to_base": 0.03} and result.metrics["eval_before"]["loss"] == 1.0
    assert [r["loss"] for r in sel["checkpoints"]] == [None, 1.5, None]
    assert result.metrics["samples"]["reward_gain"] == pytest.approx(0.4)
    assert result.metrics["samples"]["distinct_2_policy"] == 0.69

    # the model holds step 4's adapter (not step 6's, where training stopped), and that is what is published
    assert len(snapshots) == 3
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(params[n], v) for n, v in snapshots[1].items())
    assert not all(torch.equal(params[n], v) for n, v in snapshots[2].items())
    registry = PolicyRegistry(tmp_path)
    version = trainer.publish(result, registry, "kl-pol")
    manifest = registry.verify("kl-pol", version)
    assert manifest.metrics["selection"]["chosen_step"] == 4 and manifest.training["steps"] == 6
    written = load_file(str(registry.path("kl-pol", version) / ADAPTER_WEIGHTS))
    expected = get_peft_model_state_dict(trainer.model)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k].float()) for k in written)


@pytest.mark.parametrize("kl_rule", ["stop", "bound"])
def test_the_checkpoint_that_reached_the_budget_is_published_under_the_stop_rule_only(tiny32, data, monkeypatch,
                                                                                     kl_rule):
    """PPO's target KL (`stop`, the default) only stops training: the checkpoint that reached the
    budget is eligible when its distinct-2 is inside the bound; `bound` also excludes it."""
    kls = iter([0.0, 0.02, 0.07])  # before training, then the checkpoints at steps 2 and 4 (over the 0.05 budget)
    samples = iter([(0.3, 0.70), (0.6, 0.66)])  # step 4: the higher reward, distinct-2 -5.7% (inside the bound)
    monkeypatch.setattr(DistillTrainer, "evaluate", lambda self, units, adv, rollouts: {
        "loss": 1.0, "kl_to_base": next(kls) if rollouts else None})
    monkeypatch.setattr(DistillTrainer, "sample_metrics", lambda self, prompts, reward_fn, *, adapter: (
        dict(zip(("reward", "distinct_2"), next(samples))) if adapter else {"reward": 0.1, "distinct_2": 0.70}))
    examples, texts = data
    result = DistillTrainer(config("apa", eval_every=2, kl_budget=0.05, kl_rule=kl_rule, max_steps=20,
                                   eval_prompts=2), tiny32).train(examples, reward_fn=low_half_reward, prompt_texts=texts)
    sel = result.metrics["selection"]
    assert result.training["steps"] == 4 and sel["stopped"] == "KL 0.0700 reached the budget 0.05 at step 4"
    assert (sel["kl_rule"], sel["chosen_step"], sel["eligible"]) == (kl_rule, 4 if kl_rule == "stop" else 2, True)
    assert sel["checkpoints"][1]["why_not"] == ([] if kl_rule == "stop" else ["KL 0.0700 > budget 0.05"])


def test_the_kl_between_checkpoints_stops_training_near_the_budget(tiny32, data, monkeypatch):
    """`kl_every`: the KL alone every step between checkpoints every 4; the step that reached the budget
    becomes a checkpoint and training stops there, not at step 8; every KL measured is in the trace."""
    kls = iter([0.0, 0.01, 0.02, 0.03, 0.04, 0.06])  # before training, then steps 1-5 (step 4: a checkpoint)
    samples = iter([(0.3, 0.70), (0.5, 0.69)])  # the checkpoints at steps 4 and 5
    monkeypatch.setattr(DistillTrainer, "evaluate", lambda self, units, adv, rollouts: {
        "loss": 1.0, "kl_to_base": next(kls) if rollouts else None})
    monkeypatch.setattr(DistillTrainer, "sample_metrics", lambda self, prompts, reward_fn, *, adapter: (
        dict(zip(("reward", "distinct_2"), next(samples))) if adapter else {"reward": 0.1, "distinct_2": 0.70}))
    examples, texts = data
    result = DistillTrainer(config("apa", eval_every=4, kl_every=1, kl_budget=0.05, max_steps=20, eval_prompts=2),
                            tiny32).train(examples, reward_fn=low_half_reward, prompt_texts=texts)
    sel = result.metrics["selection"]
    assert result.training["steps"] == 5 and sel["stopped"] == "KL 0.0600 reached the budget 0.05 at step 5"
    assert [(r["step"], r["kl_to_base"], r["reward"]) for r in sel["checkpoints"]] == [(4, 0.04, 0.3), (5, 0.06, 0.5)]
    assert sel["kl_trace"] == [(1, 0.01), (2, 0.02), (3, 0.03), (4, 0.04), (5, 0.06)]
    assert (sel["chosen_step"], sel["eligible"]) == (5, True)  # 0.06 is inside 1.5 x the budget
    with pytest.raises(ValueError, match="kl_every needs kl_budget"):
        config("apa", eval_every=4, kl_every=1)


def test_under_the_stop_rule_a_checkpoint_far_over_the_budget_is_not_eligible(tiny32, data, monkeypatch):
    """A checkpoint that passed 1.5 times the budget (PPO's early-stop threshold) moved too far between
    two measurements: the earlier one, inside the budget, is published instead, though its reward is lower."""
    kls = iter([0.0, 0.02, 0.08])  # step 4 at 1.6 times the 0.05 budget
    samples = iter([(0.3, 0.70), (0.6, 0.70)])
    monkeypatch.setattr(DistillTrainer, "evaluate", lambda self, units, adv, rollouts: {
        "loss": 1.0, "kl_to_base": next(kls) if rollouts else None})
    monkeypatch.setattr(DistillTrainer, "sample_metrics", lambda self, prompts, reward_fn, *, adapter: (
        dict(zip(("reward", "distinct_2"), next(samples))) if adapter else {"reward": 0.1, "distinct_2": 0.70}))
    examples, texts = data
    result = DistillTrainer(config("apa", eval_every=2, kl_budget=0.05, max_steps=20, eval_prompts=2),
                            tiny32).train(examples, reward_fn=low_half_reward, prompt_texts=texts)
    sel = result.metrics["selection"]
    assert (sel["kl_rule"], sel["chosen_step"], sel["eligible"]) == ("stop", 2, True)
    assert sel["checkpoints"][1]["why_not"] == ["KL 0.0800 > 1.5 x budget 0.05"]


def test_a_budget_no_checkpoint_meets_falls_back_to_the_lowest_kl_or_refuses(tiny32, data):
    """Real KL: a budget below the first step's KL stops training at step 1; without a reward the
    `reward` rule falls back to `kl`, recorded; `on_none_eligible=refuse` publishes nothing."""
    examples, texts = data
    kw = dict(eval_every=1, kl_budget=1e-9, kl_rule="bound", max_steps=10, eval_prompts=2, eval_samples=2,
              eval_max_tokens=4)
    result = DistillTrainer(config("apa", **kw), tiny32).train(examples, prompt_texts=texts)
    sel = result.metrics["selection"]
    assert result.training["steps"] == 1 and sel["stopped"].startswith("KL ")
    assert (sel["requested"], sel["rule"], sel["chosen_step"], sel["eligible"]) == ("reward", "kl", 1, False)
    assert sel["why"].startswith("no checkpoint inside the bounds (step 1: KL")
    row, = sel["checkpoints"]
    assert row["kl_to_base"] > 1e-9 and row["reward"] is None and 0 < row["distinct_2"] <= 1
    assert "reward_policy" not in result.metrics["samples"] and result.metrics["samples"]["distinct_2_base"] > 0

    with pytest.raises(NoEligibleCheckpoint, match="no checkpoint is inside the bounds"):
        DistillTrainer(config("apa", on_none_eligible="refuse", **kw), tiny32).train(examples, prompt_texts=texts)
    with pytest.raises(ValueError, match="kl_budget needs held-out rollouts"):
        DistillTrainer(config("apa", **(kw | {"eval_fraction": 0.0})), tiny32).train(examples)


def test_distill_command_reports_the_checkpoint_and_refuses_when_asked(tiny32, data, tmp_path):
    """`iro distill` (its typer command alone: the CLI module of this package) says which checkpoint
    it published and why, warns when it is outside the bounds, and publishes nothing with refuse."""
    import json

    import typer
    from typer.testing import CliRunner

    from trainer.distill_cli import register

    app = typer.Typer()
    register(app)
    examples, texts = data
    rollouts = tmp_path / "labelled.jsonl"
    rollouts.write_text("".join(json.dumps({"id": f"{e.group}:{i}", "prompt_id": e.group, "prompt": texts[e.group],
                                            "prompt_token_ids": list(e.prompt_ids),
                                            "response_token_ids": list(e.response_ids), "reward": e.reward}) + "\n"
                                for i, e in enumerate(examples)))
    policies = tmp_path / "policies"
    args = [str(rollouts), "--method", "apa", "--name", "kl-cli", "--policies-dir", str(policies), "--preset", "smoke",
            "--model", str(tiny32)] + [x for o in ("device=cpu", "dtype=float32", "progress=false", "max_steps=6",
                                                   "eval_every=2", "kl_budget=1e-9", "kl_rule=bound", "eval_prompts=2",
                                                   "eval_max_tokens=4") for x in ("--set", o)]
    runner = CliRunner()
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "checkpoint: step 2 of 2 (kl: no checkpoint inside the bounds (step 2: KL" in out.output
    assert "stopped early: KL" in out.output and "warning: the published checkpoint is outside the bounds" in out.output
    assert "published policy kl-cli v1 (apa)" in out.output
    refused = runner.invoke(app, args + ["--set", "on_none_eligible=refuse"])
    assert refused.exit_code == 2 and "error: no checkpoint is inside the bounds" in refused.output
    assert sorted(p.name for p in (policies / "kl-cli").iterdir() if p.name.startswith("v")) == ["v0001"]
    bad = runner.invoke(app, args + ["--set", "eval_every=null"])
    assert bad.exit_code == 2 and "kl_budget needs eval_every" in bad.output
