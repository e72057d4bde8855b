"""`overuse_weight`: the bigrams the training responses over-use against the base model's samples of
the same prompts, the penalty they carry (per token, or off the response's reward), and that training
with it makes the policy use them less (tiny random Llama, real training)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.distill import DistillTrainer, bigram_overuse, make_pairs, overuse_penalties, overuse_rewards
from trainer.distill_config import DistillConfig
from trainer.value_trainer import Example

from tests.trainer.test_distill import config, data, tiny32  # noqa: F401 (fixtures)


def ex(*ids, reward=0.0, group="p"):
    return Example((0,), tuple(ids), reward, group)


def test_only_bigrams_held_more_often_than_by_the_base_are_over_used():
    train = [ex(1, 2, 3), ex(1, 2, 4), ex(1, 2, 5), ex(7, 8), ex(9, 9)]
    base = [ex(1, 2, 3), ex(7, 8), ex(7, 8), ex(6, 6), ex(6, 5)]
    table = bigram_overuse(train, base, min_share=0.4)
    # (1, 2): 3 of 5 responses against 1 of 5; the rest are held by fewer than 2 (40%)
    assert table == {(1, 2): pytest.approx(math.log(4 / 2))}
    assert bigram_overuse(train, train, min_share=0.4) == {}  # nothing is over-used against itself


def test_a_response_counts_a_bigram_once_however_often_it_repeats_it():
    table = bigram_overuse([ex(1, 2, 1, 2, 1, 2), ex(3, 4)], [ex(1, 2, 1), ex(3, 4)], min_share=0.5)
    assert table == {}  # one response of two in both: the same share, though one repeats it three times


def test_penalties_sit_on_the_token_that_ends_the_bigram_and_come_off_the_reward():
    table = {(1, 2): 0.5, (2, 3): 0.25}
    assert overuse_penalties([ex(1, 2, 3, 1), ex(5), ex()], table) == [[0.0, 0.5, 0.25, 0.0], [0.0], []]
    shaped = overuse_rewards([ex(1, 2, 3, reward=1.0)], table, 0.4)
    assert shaped[0].reward == pytest.approx(1.0 - 0.4 * 0.75)


def test_the_penalty_can_turn_a_pair_round():
    """IS-DPO ranks a prompt's samples by the shaped reward: a slightly better answer made of stock
    bigrams loses to one that is not."""
    table = {(1, 2): 1.0}
    stock, fresh = ex(1, 2, 1, 2, reward=0.6), ex(5, 6, 7, 8, reward=0.5)
    assert make_pairs([stock, fresh])[0][0] is stock
    (chosen, rejected), = make_pairs(overuse_rewards([stock, fresh], table, 0.1))
    assert chosen.response_ids == fresh.response_ids and rejected.response_ids == stock.response_ids


def test_the_option_is_recorded_and_range_checked():
    assert DistillConfig(overuse_weight=0.02).hyperparameters()["overuse_weight"] == 0.02
    with pytest.raises(ValueError, match="overuse_weight"):
        DistillConfig(overuse_weight=-1)


def test_training_without_the_base_samples_is_refused(tiny32, data):  # noqa: F811
    examples, texts = data
    with pytest.raises(ValueError, match="overuse_weight needs the base model's samples"):
        DistillTrainer(config("apa", overuse_weight=0.1), tiny32).train(examples, prompt_texts=texts)


def test_the_command_refuses_it_without_reference(tiny32, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from iro.cli import app

    rollouts = tmp_path / "labelled.jsonl"
    rollouts.write_text(json.dumps({"id": "a", "prompt_id": "p", "prompt_token_ids": [1, 2],
                                    "response_token_ids": [3, 4], "reward": 1.0}) + "\n")
    out = CliRunner().invoke(app, ["distill", str(rollouts), "--method", "apa", "--name", "x", "--model", str(tiny32),
                                   "--policies-dir", str(tmp_path / "pol"), "--set", "overuse_weight=0.1"])
    assert out.exit_code == 2 and "overuse_weight needs --reference" in out.output


def test_the_loop_measures_against_iteration_1(tmp_path):
    from tests.trainer.test_loop_distill import make_stages

    on = DistillConfig(overuse_weight=0.1)
    stages = make_stages(tmp_path / "a", (200, {}))
    assert stages.reference(DistillConfig()) is None  # off: nothing is read
    it1 = stages.run_dir / "it1"
    it1.mkdir(parents=True)
    it1.joinpath("labelled.jsonl").write_text(json.dumps({"id": "a", "prompt_id": "p", "prompt_token_ids": [1, 2],
                                                          "response_token_ids": [3, 4], "reward": 0.5}) + "\n")
    assert [e.response_ids for e in stages.reference(on)] == [(3, 4)]


STOCK = (20, 21)
"""A stock phrase: two high-half words, which carry no reward (`low_half_reward` pays for low-half ones)."""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["apa", "is-dpo"])
def test_training_with_it_makes_a_stock_phrase_less_likely(tiny32, data, method):  # noqa: F811
    """Guided-like data: each prompt's four best base samples, the best two opening with a stock
    phrase that carries no reward (as "I'm glad" rides along with good reviews). Against the base's
    samples the phrase is over-used, and a policy trained with the penalty opens with it less often
    than one trained without it (same steps and seed)."""
    import dataclasses

    from trainer.distill import collate

    examples, texts = data
    by_group: dict[str, list[Example]] = {}
    for e in examples:
        by_group.setdefault(e.group, []).append(e)
    guided = []
    for xs in by_group.values():
        ranked = sorted(xs, key=lambda e: -e.reward)[:4]
        guided += [dataclasses.replace(e, response_ids=STOCK + e.response_ids[2:]) for e in ranked[:2]] + ranked[2:]
    assert STOCK in bigram_overuse(guided, examples)

    def stock_logp(weight: float) -> float:
        """log p(21 | prompt, 20) on the training prompts."""
        trainer = DistillTrainer(config(method, max_steps=20, eval_every=None, eval_prompts=0, overuse_weight=weight),
                                 tiny32)
        trainer.train(guided, prompt_texts=texts, reference=examples)
        firsts = [e for e in guided if e.response_ids[:2] == STOCK][::2]  # one per prompt
        batch = collate(firsts, trainer.config.max_len).to(trainer.device)
        with torch.no_grad():
            logp = torch.log_softmax(trainer._logits(batch, reference=False).float(), -1)  # (B, L, V)
        at = batch.prompt_lens  # the phrase's first word: its second is predicted there
        return float(torch.stack([logp[i, int(at[i]), STOCK[1]] for i in range(len(firsts))]).mean())

    assert stock_logp(1.0) < stock_logp(0.0) - 0.3  # about 1 nat here, with either method
