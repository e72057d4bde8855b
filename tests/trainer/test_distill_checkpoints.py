"""Checkpoint selection of distillation (pure functions) and the new config fields."""

import pytest

from trainer.distill_checkpoints import Checkpoint, NoEligibleCheckpoint, select_checkpoint
from trainer.distill_config import DistillConfig

BASE_D2 = 0.70  # the base model's distinct-2 in these tables: 10% below is 0.63


def table():
    return [Checkpoint(10, kl_to_base=0.02, reward=0.30, distinct_2=0.70),
            Checkpoint(20, kl_to_base=0.05, reward=0.55, distinct_2=0.64),  # eligible, best reward
            Checkpoint(30, kl_to_base=0.07, reward=0.70, distinct_2=0.60),  # diversity lost: 14% below
            Checkpoint(40, kl_to_base=0.11, reward=0.80, distinct_2=0.66)]  # over the KL budget


def select(cps, rule, **kw):
    return select_checkpoint(cps, rule, **({"kl_budget": 0.1, "max_distinct_drop": 0.1, "base_distinct_2": BASE_D2}
                                           | kw))


def test_reward_rule_takes_the_best_eligible_checkpoint():
    cps = table()
    choice = select(cps, "reward")
    assert (choice.step, choice.eligible, choice.rule) == (20, True, "reward")
    assert [cp.eligible for cp in cps] == [True, True, False, False]
    assert "distinct-2 0.6000 is more than 10% below" in cps[2].why_not[0]
    assert cps[3].why_not == ["KL 0.1100 > budget 0.1"]
    assert cps[1].record(BASE_D2)["distinct_2_vs_base"] == pytest.approx(0.64 / 0.70 - 1)
    assert "state" not in cps[1].record()


def test_kl_and_last_rules():
    assert select(table(), "kl").step == 20  # the largest KL among the eligible
    assert select(table(), "kl", max_distinct_drop=0.2).step == 30  # 0.60 is within 20% of 0.70
    last = select(table(), "last")
    assert (last.step, last.eligible) == (40, False) and "KL 0.1100 > budget" in last.why
    assert select(table(), "reward", kl_budget=None, max_distinct_drop=0.2).step == 40  # no budget, loose bound


def test_distinct_2_bound_is_inclusive_and_skipped_without_samples():
    cps = [Checkpoint(5, kl_to_base=0.01, reward=0.1, distinct_2=0.63), Checkpoint(9, kl_to_base=0.02, reward=0.2)]
    assert select(cps, "reward").step == 9 and all(cp.eligible for cp in cps)


def test_none_eligible_falls_back_to_the_lowest_kl_or_refuses():
    cps = [Checkpoint(10, kl_to_base=0.20, reward=0.9, distinct_2=0.5),
           Checkpoint(20, kl_to_base=0.15, reward=0.8, distinct_2=0.5),
           Checkpoint(30, kl_to_base=0.30, reward=1.0, distinct_2=0.69)]
    choice = select(cps, "reward")
    assert (choice.step, choice.eligible) == (20, False)
    assert choice.why.startswith("no checkpoint inside the bounds") and "step 30: KL 0.3000 > budget" in choice.why
    with pytest.raises(NoEligibleCheckpoint, match="no checkpoint is inside the bounds .*raise kl_budget") as err:
        select(cps, "reward", on_none_eligible="refuse")
    assert [row["step"] for row in err.value.table] == [10, 20, 30] and not any(r["eligible"] for r in err.value.table)
    with pytest.raises(ValueError, match="no checkpoints"):
        select([], "reward")


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="kl_budget needs eval_every"):
        DistillConfig(kl_budget=0.1)
    for bad in ({"select": "best"}, {"max_distinct_drop": 1.5}, {"kl_budget": 0, "eval_every": 5},
                {"eval_every": 0}, {"on_none_eligible": "skip"}, {"kl_rule": "exclude"}):
        with pytest.raises(ValueError):
            DistillConfig(**bad)
    with pytest.raises(ValueError, match="kl_budget"):  # through the command line's parser: names the field
        DistillConfig.from_preset("smoke", kl_budget="-1")
    cfg = DistillConfig.from_preset("smoke", kl_budget="0.08", select="kl", max_distinct_drop="0.05")
    assert (cfg.kl_budget, cfg.select, cfg.max_distinct_drop, cfg.eval_every) == (0.08, "kl", 0.05, 10)
    assert cfg.kl_rule == "stop" and DistillConfig.from_preset("smoke", kl_rule="bound").kl_rule == "bound"


def test_full_preset_has_per_method_defaults_and_user_options_win():
    apa = DistillConfig.from_preset("full", method="apa")
    dpo = DistillConfig.from_preset("full", method="is-dpo")
    assert (apa.lam, apa.lr, apa.eval_every, apa.kl_budget) == (0.01, 5e-4, 30, 0.12)
    assert (dpo.lr, dpo.eval_every, dpo.kl_budget, dpo.lam) == (4e-4, 15, 0.16, DistillConfig().lam)
    assert apa.select == dpo.select == "reward" and apa.max_distinct_drop == 0.10
    assert DistillConfig.from_preset("full", method="apa", lr="1e-4", kl_budget="0.2").lr == 1e-4


@pytest.mark.parametrize("module", ["trainer.distill_checkpoints", "trainer.distill_config"])
def test_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
