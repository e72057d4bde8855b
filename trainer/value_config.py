"""Configuration of value training: the value's architecture nested in the training options (as
TRL keeps model arguments apart from trainer arguments), a YAML preset and `--set` overrides
(trainer.options), bounds in the types.

The architecture (`model:`) is one of two kinds, told apart by `kind`: an engine value (`kind:
engine`, a linear head on residual-stream layers the serving engine computes anyway, `value_layers`)
or a LoRA value (`kind: lora`, a LoRA-adapted backbone of the first layers with a head, scored by
the server's scorer). A key that does not belong to the kind is refused, never ignored.

    >>> cfg = ValueTrainConfig.from_preset("smoke-lora", epochs=2, lr="1e-3", **{"model.lora_r": "4"})
    >>> cfg.epochs, cfg.lr, cfg.model.kind, cfg.model.num_layers, cfg.model.lora_r
    (2, 0.001, 'lora', 4, 4)
    >>> ValueTrainConfig.from_preset("smoke", **{"model.lora_r": "8"})
    Traceback (most recent call last):
    ...
    ValueError: invalid value-training options: model.lora_r applies to a LoRA value (model.kind=lora), not an engine value (model.kind=engine, keys: kind, value_layers, dtype); set model.kind=lora too, or use a preset of that kind
    >>> ValueTrainConfig.from_preset("smoke", **{"model.kind": "lora", "model.lora_r": "8"}).model.lora_r
    8
    >>> ValueTrainConfig.from_dict({"eval_fraction": 1.5})
    Traceback (most recent call last):
    ...
    ValueError: invalid value-training options: eval_fraction: Input should be less than 1 (got 1.5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.engine_args import resolve_value_layers
from trainer.options import load_preset, merge, nest, short_error
from valuefn.model import ValueModelConfig

PRESETS_DIR = Path(__file__).parent / "presets"


class EngineValue(BaseModel):
    """An engine value (the default): a linear head on hidden states of the frozen base model that the
    serving engine computes while it generates (no LoRA, `mean_before` pooling), so guided decoding
    needs no value forward pass. Only the head trains."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["engine"] = "engine"
    value_layers: str = "auto"
    """The residual-stream layers the head reads: "auto" (the layers a server exposes by default,
    `common.engine_args.default_value_layers`), "none" (the final normed hidden state) or "8,15".
    Must be layers the serving engine exposes (`iro serve --engine-value-layers`)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """The dtype it trains in ("auto": this machine's choice, `common.dtype`)."""

    @field_validator("value_layers")
    @classmethod
    def _layers_parse(cls, spec: str) -> str:
        resolve_value_layers(spec, 1 << 16)  # refused here, with the option's name, if malformed
        return spec

    def architecture(self, total_layers: int) -> ValueModelConfig:
        """The value model on a base model of `total_layers` decoder layers."""
        layers = resolve_value_layers(self.value_layers, total_layers)
        return ValueModelConfig.for_engine_value(value_layers=list(layers) or None, dtype=self.dtype)


class LoraValue(ValueModelConfig):
    """A LoRA value: the first `num_layers` decoder layers of the base model with LoRA adapters and a
    head (valuefn.model.ValueModelConfig's fields), scored by the server's scorer: the option for values
    on another backbone or where the engine cannot compute values."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["lora"] = "lora"
    num_layers: int | None = Field(4, ge=1)
    """Decoder layers of the backbone to keep (None: all). 4 of SmolLM2's 30: on 1,760 labelled demo
    rollouts the first 4 layers ranked held-out rewards as well as the first 8 (Spearman 0.60 vs
    0.57) at half the training and scoring cost (scoring is what guided decoding pays for)."""

    value_layers: list[int] | None = None
    """Residual-stream layers whose states feed the head ("8,15" or a list; "none" or unset: the
    kept layers' final normed state). With layers, the value keeps the decoder layers up to the last
    of them (`num_layers` follows; a preset's `num_layers` gives way to them)."""

    @field_validator("value_layers", mode="before")
    @classmethod
    def _layers_as_written(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, str):
            spec = value.strip().lower()
            if spec == "auto":
                raise ValueError("'auto' picks the layers the engine exposes, for an engine value (model.kind=engine); "
                                 "a LoRA value names its layers ('8,15') or 'none'")
            try:
                return None if spec in ("", "none") else [int(part) for part in spec.split(",") if part.strip()]
            except ValueError:
                raise ValueError("value layers must be layer numbers like '8,15' or 'none'") from None
        return value

    @model_validator(mode="after")
    def _value_layers_fit(self) -> "LoraValue":  # ValueModelConfig's, with num_layers following the layers
        if self.value_layers and "num_layers" not in self.model_fields_set:
            self.num_layers = None
        return ValueModelConfig._value_layers_fit(self)

    def architecture(self, total_layers: int) -> ValueModelConfig:
        return ValueModelConfig(**self.model_dump(exclude={"kind"}))


ValueArchitecture = Annotated[Union[EngineValue, LoraValue], Field(discriminator="kind")]
KINDS: dict[str, type[BaseModel]] = {"engine": EngineValue, "lora": LoraValue}
RENAMED = {"engine_head": "model.kind (engine or lora)", "engine_layers": "model.value_layers"}
"""Options of earlier releases and what replaced them (refused with this hint)."""


class ValueTrainConfig(BaseModel):
    """Everything `train_value` needs besides the data, the base model and the registry."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    # --- the value's architecture (when initialising from the previous version, that version's is kept)
    model: ValueArchitecture = Field(default_factory=EngineValue)
    """`kind: engine` (EngineValue: value_layers, dtype) or `kind: lora` (LoraValue: num_layers,
    lora_r, lora_alpha, lora_dropout, target_modules, dtype, pooling, value_layers). A LoRA value's
    keys may also be given at the top level (`lora_r: 8`)."""
    init_from_previous: bool = True
    """Start from the CURRENT version of the value in the registry (V_{t-1}) when there is one."""

    # --- optimisation
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate of the LoRA adapters and the head (peak, after warmup; cosine decay)."""
    epochs: int = Field(2, ge=1)
    """Passes over the training split."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (None: run all epochs)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per optimizer step."""
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Fraction of the steps with a linear learning-rate warmup."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping (0: off)."""
    seed: int = 0
    """Seeds the head/LoRA initialisation, the split and the batch order: same seed, same model."""

    # --- data
    max_len: int = Field(512, ge=1)
    """Longest prompt + response in tokens; the tail of longer sequences is cut (their targets still
    come from the full response). Sequences whose prompt alone fills it are skipped."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of prompts (all samples of a prompt go to the same side) held out for metrics."""
    eval_batch_size: int = Field(32, ge=1)

    # --- targets
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount of the final reward per token (1: every response token regresses the reward)."""
    gae_lambda: float | None = Field(None, ge=0, le=1)
    """None: Monte-Carlo returns. A number (the reference uses 0.95): GAE(lambda) targets
    bootstrapped from the model's own (detached) per-token values."""

    # --- runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    """torch CPU threads (None: torch's default)."""
    progress: bool = True
    """Show a tqdm progress bar (rate and ETA)."""

    @model_validator(mode="before")
    @classmethod
    def _model_keys(cls, data: Any) -> Any:
        """`lora_r: 8` means `model: {lora_r: 8}`; unknown keys, the options of earlier releases and
        keys of the other kind are refused, naming what applies."""
        if not isinstance(data, dict):
            return data
        renamed = sorted(set(data) & set(RENAMED))
        if renamed:
            raise ValueError("; ".join(f"{k} was replaced by {RENAMED[k]}" for k in renamed)
                             + " (see trainer/presets/full.yaml and full-lora.yaml)")
        model_keys = set(KINDS["engine"].model_fields) | set(KINDS["lora"].model_fields)
        flat = {k: data[k] for k in data if k in model_keys and k not in cls.model_fields}
        unknown = sorted(set(data) - set(cls.model_fields) - set(flat))
        if unknown:
            known = sorted(set(cls.model_fields) | model_keys)
            raise ValueError(f"unknown value-training option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        model = data.get("model")
        if isinstance(model, BaseModel):
            model = model.model_dump(exclude_unset=True) | {"kind": model.kind}
        model = {**(model or {}), **flat}
        kind = model.setdefault("kind", "engine")
        if kind in KINDS:
            other = next(k for k in KINDS if k != kind)
            wrong = sorted(set(model) - set(KINDS[kind].model_fields))
            if wrong:
                mine = ", ".join(KINDS[kind].model_fields)
                known = set(KINDS[other].model_fields)
                for key in wrong:
                    if key in known:
                        raise ValueError(f"model.{key} applies to {_label(other, article=True)} (model.kind={other}), not "
                                         f"{_label(kind, article=True)} (model.kind={kind}, keys: {mine}); "
                                         f"set model.kind={other} too, or use a preset of that kind")
                raise ValueError(f"unknown value model option(s) {', '.join(wrong)} for model.kind={kind}; "
                                 f"known: {mine}")
        return {**{k: v for k, v in data.items() if k not in flat}, "model": model}

    def architecture(self, total_layers: int) -> ValueModelConfig:
        """The value model to build on a base model of `total_layers` decoder layers."""
        return self.model.architecture(total_layers)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ValueTrainConfig":
        """Build from a mapping: dotted keys reach into `model`, strings (from the command line)
        are read as YAML scalars."""
        try:
            return cls.model_validate(nest(values))
        except ValidationError as exc:
            raise short_error(exc, "value-training options", hide=frozenset(KINDS)) from None

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "ValueTrainConfig":
        """A preset by name (`smoke`, `full`; see trainer/presets/) or a path to a YAML file, then
        overrides (`epochs=2`, `**{"model.lora_r": 8}`). An override of `model.kind` to another kind
        replaces the preset's `model:` section (its keys belong to the other kind)."""
        base, extra = nest(load_preset(preset, PRESETS_DIR)), nest(overrides)
        base_model, extra_model = base.get("model") or {}, extra.get("model") or {}
        layers_set = "value_layers" in extra or isinstance(extra_model, dict) and "value_layers" in extra_model
        num_layers_set = "num_layers" in extra or isinstance(extra_model, dict) and "num_layers" in extra_model
        if layers_set and not num_layers_set and isinstance(base_model, dict):
            base_model.pop("num_layers", None)  # a LoRA value's depth follows the layers it reads
        if isinstance(extra_model, dict) and "kind" in extra_model and isinstance(base_model, dict) \
                and base_model.get("kind", "engine") != extra_model["kind"]:
            base = {k: v for k, v in base.items() if k != "model"}
        return cls.from_dict(merge(base, extra))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _label(kind: str, article: bool = False) -> str:
    label = {"engine": "engine value", "lora": "LoRA value"}[kind]
    return f"{'an' if kind == 'engine' else 'a'} {label}" if article else label


__all__ = ["PRESETS_DIR", "EngineValue", "LoraValue", "ValueArchitecture", "ValueTrainConfig"]
