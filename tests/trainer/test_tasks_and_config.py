"""The value-training configuration (the tasks: test_task_files.py)."""

from __future__ import annotations

import pytest

from trainer.value_config import ValueTrainConfig


def test_presets_load_with_overrides_coerced_from_strings():
    smoke = ValueTrainConfig.from_preset("smoke-lora")
    full = ValueTrainConfig.from_preset("full-lora", gae_lambda="0.95", num_layers="null", init_from_previous="false")
    assert smoke.max_steps is not None and full.max_steps is None
    assert (full.gae_lambda, full.model.num_layers, full.init_from_previous, full.model.lora_r) == (0.95, None, False, 16)
    assert smoke.model.lora_r == 8 and smoke.model.num_layers == 4  # the presets' nested `model:` section
    nested = ValueTrainConfig.from_preset("smoke-lora", **{"model.lora_r": "2", "model.pooling": "last"})
    assert (nested.model.lora_r, nested.model.pooling, nested.model.lora_alpha) == (2, "last", 16)


def test_the_value_architecture_is_one_tagged_union():
    """`model.kind` picks an engine value (the default) or a LoRA value; a LoRA value's fields are
    valuefn's ValueModelConfig (the type a manifest stores), not a copy."""
    from trainer.value_config import EngineValue, LoraValue
    from valuefn.model import ValueModelConfig

    assert isinstance(ValueTrainConfig().model, EngineValue)
    assert isinstance(ValueTrainConfig.from_preset("full").model, EngineValue)
    config = ValueTrainConfig.from_dict({"kind": "lora", "lora_r": 4, "dtype": "float32"})  # top-level shorthand
    assert isinstance(config.model, LoraValue) and (config.model.lora_r, config.model.dtype) == (4, "float32")
    assert config.model.num_layers == 4  # a LoRA value's default depth
    arch = config.architecture(total_layers=30)
    assert type(arch) is ValueModelConfig and (arch.num_layers, arch.lora_r) == (4, 4)
    assert not set(ValueModelConfig.model_fields) & set(ValueTrainConfig.model_fields)
    head = ValueTrainConfig.from_dict({"model.kind": "engine", "model.dtype": "float32"})
    arch = head.architecture(total_layers=30)  # the engine value on the layers a server exposes by default
    assert arch.engine_value and arch.dtype == "float32" and arch.value_layers == [2, 15, 27] and arch.lora_r == 0
    assert ValueTrainConfig.from_dict({"model.value_layers": "none"}).architecture(30).num_layers is None
    with pytest.raises(ValueError, match="model.value_layers: value layers must be"):
        ValueTrainConfig.from_dict({"model.value_layers": "middle"})
    for config in (config, head):
        assert ValueTrainConfig.from_dict(config.to_dict()) == config  # round trip through its dict


@pytest.mark.parametrize("preset, overrides, message", [
    ("full", {"model.lora_r": "8"}, r"model.lora_r applies to a LoRA value \(model.kind=lora\), not an engine value"),
    ("smoke", {"num_layers": "2"}, "model.num_layers applies to a LoRA value"),  # the top-level shorthand too
    ("full-lora", {"model.value_layers": "auto"}, "'auto' picks the layers the engine exposes, for an engine value"),
    ("full-lora", {"model.value_layers": "2,3", "model.num_layers": "5"}, r"value_layers \[2, 3\] need num_layers = 3"),
    ("full", {"engine_head": "false"}, r"engine_head was replaced by model.kind \(engine or lora\)"),
    ("full", {"engine_layers": "8"}, "engine_layers was replaced by model.value_layers"),
    ("full", {"model.kind": "gru"}, "model: Input tag 'gru' found using 'kind' does not match"),
])
def test_options_that_do_not_apply_to_the_kind_are_refused_not_ignored(preset, overrides, message):
    """The README's `--set model.lora_r=8` did nothing with the default (engine value) presets."""
    with pytest.raises(ValueError, match=message):
        ValueTrainConfig.from_preset(preset, **overrides)


def test_a_lora_value_reads_the_layers_it_names_and_keeps_the_layers_up_to_them():
    """`value_layers` is one idea with one name for both kinds (it was `feature_layers` on a LoRA value)."""
    config = ValueTrainConfig.from_preset("full-lora", **{"model.value_layers": "8,2"})
    arch = config.architecture(total_layers=30)
    assert (arch.value_layers, arch.num_layers, arch.lora_r) == ([2, 8], 8, 16) and not arch.engine_value
    assert ValueTrainConfig.from_dict(config.to_dict()) == config
    assert ValueTrainConfig.from_preset("full-lora", **{"model.value_layers": "none"}).architecture(30).num_layers == 4


def test_switching_the_kind_replaces_the_presets_model_section():
    lora = ValueTrainConfig.from_preset("full", **{"model.kind": "lora", "model.lora_r": "8"})
    assert (lora.model.kind, lora.model.lora_r, lora.model.num_layers) == ("lora", 8, 4)
    engine = ValueTrainConfig.from_preset("full-lora", **{"model.kind": "engine", "model.value_layers": "none"})
    assert engine.model == ValueTrainConfig.from_dict({"model.value_layers": "none"}).model
    assert engine.epochs == 3  # the rest of the preset stays


def test_manifests_keep_recording_the_value_model_config(tmp_path):
    """What a manifest stores (and every published one holds) is the same ValueModelConfig."""
    from valuefn.model import ValueModelConfig

    published = {"num_layers": 4, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "dtype": "float32",
                 "target_modules": ["q_proj"], "pooling": "mean", "value_layers": None}
    assert ValueModelConfig.model_validate(published).model_dump() == published
    engine = ValueTrainConfig.from_dict({"model.value_layers": "2,4", "model.dtype": "float32"}).architecture(6)
    assert set(engine.model_dump()) == set(published)


def test_yaml_files_work_as_presets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 5\nlr: 1.0e-5\n")
    assert ValueTrainConfig.from_preset(str(path), seed="3").epochs == 5


@pytest.mark.parametrize("options, message", [
    ({"lrr": 1}, "unknown value-training option"),
    ({"model.lorr": 1}, "unknown value model option"),
    ({"model.kind": "lora", "model.lorr": 1}, "unknown value model option.*lorr for model.kind=lora"),
    ({"epochs": "many"}, "epochs: Input should be a valid integer"),
    ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
    ({"gamma": 1.5}, "gamma: Input should be less than or equal to 1"),
    ({"gae_lambda": -1}, "gae_lambda"),
    ({"dtype": "float16"}, "model.dtype: Input should be 'auto', 'bfloat16' or 'float32'"),
    ({"model.kind": "lora", "model.lora_r": -1}, "model.lora_r: Input should be greater than or equal to 0"),
    ({"device": "tpu"}, "device: Input should be"),
    ({"init_from_previous": "maybe"}, "init_from_previous: Input should be a valid boolean"),
])
def test_bad_options_are_refused_with_the_option_named(options, message):
    with pytest.raises(ValueError, match=message):
        ValueTrainConfig.from_dict(options)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: full, full-lora, smoke, smoke-lora"):
        ValueTrainConfig.from_preset("nope")
