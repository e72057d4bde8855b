"""The value-training configuration (the tasks: test_task_files.py)."""

from __future__ import annotations

import pytest

from trainer.value_config import ValueTrainConfig


def test_presets_load_with_overrides_coerced_from_strings():
    smoke = ValueTrainConfig.from_preset("smoke")
    full = ValueTrainConfig.from_preset("full", gae_lambda="0.95", num_layers="null", init_from_previous="false")
    assert smoke.max_steps is not None and full.max_steps is None
    assert (full.gae_lambda, full.model.num_layers, full.init_from_previous, full.model.lora_r) == (0.95, None, False, 16)
    assert smoke.model.lora_r == 8 and smoke.model.num_layers == 4  # the presets' nested `model:` section
    nested = ValueTrainConfig.from_preset("smoke", **{"model.lora_r": "2", "model.pooling": "last"})
    assert (nested.model.lora_r, nested.model.pooling, nested.model.lora_alpha) == (2, "last", 16)


def test_the_value_model_is_declared_once_and_nested_in_the_training_config():
    """The architecture is valuefn's ValueModelConfig (the type a manifest stores), not a copy."""
    from valuefn.model import ValueModelConfig

    config = ValueTrainConfig.from_dict({"lora_r": 4, "dtype": "float32"})  # top-level shorthand
    assert isinstance(config.model, ValueModelConfig) and (config.model.lora_r, config.model.dtype) == (4, "float32")
    assert not set(ValueModelConfig.model_fields) & set(ValueTrainConfig.model_fields)
    head = ValueTrainConfig.from_dict({"engine_head": "true", "model.dtype": "float32"})
    arch = head.architecture(total_layers=30)  # the engine value on the layer a server exposes by default
    assert arch.engine_head and arch.dtype == "float32" and arch.feature_layers == [2, 15, 27] and arch.lora_r == 0
    assert ValueTrainConfig.from_dict({"engine_head": "true", "engine_layers": "none"}).architecture(30).num_layers is None
    with pytest.raises(ValueError, match="engine_layers|value layers"):
        ValueTrainConfig.from_dict({"engine_head": "true", "engine_layers": "middle"})
    assert ValueTrainConfig.from_dict(config.to_dict()) == config  # round trip through its dict


def test_yaml_files_work_as_presets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 5\nlr: 1.0e-5\n")
    assert ValueTrainConfig.from_preset(str(path), seed="3").epochs == 5


@pytest.mark.parametrize("options, message", [
    ({"lrr": 1}, "unknown value-training option"),
    ({"model.lorr": 1}, "unknown value model option"),
    ({"epochs": "many"}, "epochs: Input should be a valid integer"),
    ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
    ({"gamma": 1.5}, "gamma: Input should be less than or equal to 1"),
    ({"gae_lambda": -1}, "gae_lambda"),
    ({"dtype": "float16"}, "model.dtype: Input should be 'auto', 'bfloat16' or 'float32'"),
    ({"model.lora_r": -1}, "model.lora_r: Input should be greater than or equal to 0"),
    ({"device": "tpu"}, "device: Input should be"),
    ({"init_from_previous": "maybe"}, "init_from_previous: Input should be a valid boolean"),
])
def test_bad_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(ValueError, match=message):
        ValueTrainConfig.from_dict(options)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: full, full-lora, smoke, smoke-lora"):
        ValueTrainConfig.from_preset("nope")
