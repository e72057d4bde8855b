"""Configuration of policy distillation (`iro distill`): a pydantic config, YAML presets, `--set` overrides
(the trainer's one preset loader and parser, `trainer.options`).

    >>> cfg = DistillConfig.from_preset("smoke", method="is-dpo")
    >>> cfg.method, cfg.beta, cfg.clip_eps
    ('is-dpo', 0.1, 1.0)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.distill_losses import APA_LAMBDA, IS_BETA, IS_CLIP_EPS
from trainer.options import load_preset, merge, nest, short_error
from trainer.value_config import PRESETS_DIR

METHODS = ("apa", "is-dpo", "is-ipo")


class DistillConfig(BaseModel):
    """Everything `DistillTrainer` needs besides the rollouts, the base model and the registry."""

    model_config = ConfigDict(extra="forbid")

    # --- method and its hyper-parameters (defaults: the papers')
    method: Literal["apa", "is-dpo", "is-ipo"] = "apa"
    lam: float = Field(APA_LAMBDA, gt=0)
    """APA's lambda: the policy's log-ratio to the base regresses A / lambda."""
    beta: float = Field(IS_BETA, gt=0)
    """IS-DAAs' beta (DPO/IPO regularisation strength)."""
    clip_eps: float | None = Field(IS_CLIP_EPS, ge=0)
    """IS-DAAs' clipping constant: importance ratios are capped at exp(2 * clip_eps) (null: no weights, plain DPO/IPO)."""
    pairs_per_prompt: int = Field(1, ge=1)
    """IS-DPO pairs per prompt: the best sample against the worst, then the 2nd best against the 2nd worst, ..."""

    # --- optimisation
    lr: float = Field(2e-4, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    """Sequences (APA) or pairs (IS-DPO) per optimizer step."""
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 0

    # --- data
    max_len: int = Field(512, ge=1)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    eval_batch_size: int = Field(16, ge=1)

    # --- adapter
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Projections that get LoRA (vLLM serves adapters on these)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Base model dtype ("auto": this machine's choice, `common.dtype`); the adapters train in float32."""

    # --- held-out sampling (the reward of samples; needs a reward)
    eval_prompts: int = Field(16, ge=0)
    """Held-out prompts to sample from, with the policy and the base model (0: skip)."""
    eval_samples: int = Field(2, ge=0)
    eval_max_tokens: int = Field(48, ge=1)
    eval_temperature: float = Field(1.0, gt=0)

    # --- runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    progress: bool = True

    @field_validator("target_modules", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else value

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        """Build from a mapping; strings (from the command line) are read as YAML scalars."""
        try:
            return cls.model_validate(nest(values))
        except ValidationError as exc:
            raise short_error(exc, "distillation options") from None

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "DistillConfig":
        """A preset by name (`smoke`, `full`; see trainer/presets/distill/) or a path to a YAML file,
        then overrides."""
        return cls.from_dict(merge(nest(load_preset(preset, PRESETS_DIR / "distill")), nest(overrides)))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def hyperparameters(self) -> dict:
        """What the manifest records as the method's hyper-parameters."""
        method = {"lambda": self.lam} if self.method == "apa" else {"beta": self.beta, "clip_eps": self.clip_eps,
                                                                     "pairs_per_prompt": self.pairs_per_prompt}
        return {**method, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "target_modules": self.target_modules}


__all__ = ["DistillConfig", "METHODS"]
