"""The built-in demo task and the value-training configuration."""

from __future__ import annotations

import pytest

from trainer.rewards import parse_reward
from trainer.tasks import TASKS, TITLES, N_TRAIN_TITLES
from trainer.value_config import ValueTrainConfig


def test_review_sentiment_prompts_are_many_distinct_deterministic_and_held_out_by_title():
    task = TASKS["review-sentiment"]
    train, held_out = task.train_prompts(), task.eval_prompts()
    assert len(train) >= 300 and len(held_out) >= 100
    assert train == TASKS["review-sentiment"].train_prompts()
    texts = [p["messages"][0]["content"] for p in train + held_out]
    assert len(set(texts)) == len(texts)
    assert len({p["id"] for p in train + held_out}) == len(texts)
    for p in train + held_out:
        assert p["messages"] == [{"role": "user", "content": p["messages"][0]["content"]}]
    eval_titles = TITLES[N_TRAIN_TITLES:]
    assert not any(t in p["messages"][0]["content"] for p in train for t in eval_titles)
    assert all(any(t in p["messages"][0]["content"] for t in eval_titles) for p in held_out)
    assert task.max_tokens == 48 and parse_reward(task.reward)(["p"], ["great"])[0] > 0


def test_presets_load_with_overrides_coerced_from_strings():
    smoke = ValueTrainConfig.from_preset("smoke")
    full = ValueTrainConfig.from_preset("full", gae_lambda="0.95", num_layers="null", init_from_previous="false")
    assert smoke.max_steps is not None and full.max_steps is None
    assert (full.gae_lambda, full.num_layers, full.init_from_previous, full.lora_r) == (0.95, None, False, 16)


def test_yaml_files_work_as_presets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 5\nlr: 1.0e-5\n")
    assert ValueTrainConfig.from_preset(str(path), seed="3").epochs == 5


@pytest.mark.parametrize("options, message", [
    ({"lrr": 1}, "unknown value-training option"),
    ({"epochs": "many"}, "epochs: expected int"),
    ({"epochs": 0}, "epochs must be > 0"),
    ({"gamma": 1.5}, "gamma must be in"),
    ({"gae_lambda": -1}, "gae_lambda"),
    ({"dtype": "float16"}, "dtype must be"),
    ({"device": "tpu"}, "device must be"),
    ({"init_from_previous": "maybe"}, "expected true/false"),
])
def test_bad_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(ValueError, match=message):
        ValueTrainConfig.from_dict(options)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: full, smoke"):
        ValueTrainConfig.from_preset("nope")
