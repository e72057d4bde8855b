"""The value-training configuration (the tasks: test_task_files.py)."""

from __future__ import annotations

import pytest

from trainer.value_config import ValueTrainConfig


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
