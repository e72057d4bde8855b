"""Configuration of value training: the value model's architecture nested in the training
options (as TRL keeps model arguments apart from trainer arguments), a YAML preset and `--set`
overrides (trainer.options), bounds in the types.

    >>> cfg = ValueTrainConfig.from_preset("smoke", epochs=2, lr="1e-3", **{"model.lora_r": "4"})
    >>> cfg.epochs, cfg.lr, cfg.model.num_layers, cfg.model.lora_r
    (2, 0.001, 4, 4)
    >>> ValueTrainConfig.from_dict({"eval_fraction": 1.5})
    Traceback (most recent call last):
    ...
    ValueError: invalid value-training options: eval_fraction: Input should be less than 1 (got 1.5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.engine_args import resolve_value_layers
from trainer.options import load_preset, merge, nest, short_error
from valuefn.model import ValueModelConfig

PRESETS_DIR = Path(__file__).parent / "presets"


def default_model() -> ValueModelConfig:
    """4 of SmolLM2's 30 decoder layers: on 1,760 labelled demo rollouts the first 4 layers ranked
    held-out rewards as well as the first 8 (Spearman 0.60 vs 0.57) at half the training and
    scoring cost (scoring is what guided decoding pays for)."""
    return ValueModelConfig(num_layers=4)


class ValueTrainConfig(BaseModel):
    """Everything `train_value` needs besides the data, the base model and the registry."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    # --- the value model (ignored when initialising from the previous version: it fixes the architecture)
    model: ValueModelConfig = Field(default_factory=default_model)
    """Architecture of a new value (valuefn.model.ValueModelConfig: num_layers, lora_r, lora_alpha,
    lora_dropout, dtype, pooling). Its keys may also be given at the top level (`lora_r: 8`)."""
    engine_head: bool = True
    """True (the default): an engine value, a linear head on hidden states of the frozen base model
    that the serving engine computes while it generates (no LoRA, `mean_before` pooling): guided
    decoding then needs no value forward pass. Replaces `model` (keeping its dtype). False: the
    value is `model` (a LoRA value on the first layers, scored by the server's scorer)."""
    engine_layers: str = "auto"
    """With `engine_head`: the residual-stream layers the head reads ("auto": the layers a server
    exposes by default, `common.engine_args.default_value_layers`; "none": the final normed hidden
    state; or "8,15"). Must be layers the serving engine exposes (`iro serve --engine-value-layers`)."""
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
    def _model_keys_at_the_top(cls, data: Any) -> Any:
        """`lora_r: 8` means `model: {lora_r: 8}`; unknown keys are refused with the known ones."""
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in data if k in ValueModelConfig.model_fields and k not in cls.model_fields}
        unknown = sorted(set(data) - set(cls.model_fields) - set(flat))
        if unknown:
            known = sorted(set(cls.model_fields) | set(ValueModelConfig.model_fields))
            raise ValueError(f"unknown value-training option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        model = data.get("model")
        if isinstance(model, dict):
            unknown = sorted(set(model) - set(ValueModelConfig.model_fields))
            if unknown:
                raise ValueError(f"unknown value model option(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(ValueModelConfig.model_fields)}")
        if not flat:
            return data
        model = model.model_dump(exclude_unset=True) if isinstance(model, ValueModelConfig) else dict(model or {})
        return {**{k: v for k, v in data.items() if k not in flat}, "model": {**model, **flat}}

    @model_validator(mode="after")
    def _engine_layers_parse(self) -> "ValueTrainConfig":
        resolve_value_layers(self.engine_layers, 1 << 16)  # refused here, with the option's name, if malformed
        return self

    def architecture(self, total_layers: int) -> ValueModelConfig:
        """The value model to build on a base model of `total_layers` decoder layers."""
        if not self.engine_head:
            return self.model
        layers = resolve_value_layers(self.engine_layers, total_layers)
        return ValueModelConfig.for_engine_head(feature_layers=list(layers) or None, dtype=self.model.dtype)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ValueTrainConfig":
        """Build from a mapping: dotted keys reach into `model`, strings (from the command line)
        are read as YAML scalars."""
        try:
            return cls.model_validate(nest(values))
        except ValidationError as exc:
            raise short_error(exc, "value-training options") from None

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "ValueTrainConfig":
        """A preset by name (`smoke`, `full`; see trainer/presets/) or a path to a YAML file, then
        overrides (`epochs=2`, `**{"model.lora_r": 8}`)."""
        return cls.from_dict(merge(nest(load_preset(preset, PRESETS_DIR)), nest(overrides)))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


__all__ = ["PRESETS_DIR", "ValueTrainConfig"]
