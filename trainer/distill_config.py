"""Configuration of policy distillation (`iro distill`): a dataclass, YAML presets, CLI overrides.

    >>> cfg = DistillConfig.from_preset("smoke", method="is-dpo")
    >>> cfg.method, cfg.beta, cfg.clip_eps
    ('is-dpo', 0.1, 1.0)
    >>> DistillConfig(method="ppo")
    Traceback (most recent call last):
    ...
    ValueError: method must be one of apa, is-dpo, is-ipo, got 'ppo'
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from trainer.distill_losses import APA_LAMBDA, IS_BETA, IS_CLIP_EPS
from trainer.value_config import PresetConfig

METHODS = ("apa", "is-dpo", "is-ipo")


@dataclass
class DistillConfig(PresetConfig):
    """Everything `DistillTrainer` needs besides the rollouts, the base model and the registry."""

    _presets_subdir: typing.ClassVar[str] = "distill"
    _what: typing.ClassVar[str] = "distillation option"

    # --- method and its hyper-parameters (defaults: the papers')
    method: Literal["apa", "is-dpo", "is-ipo"] = "apa"
    lam: float = APA_LAMBDA
    """APA's lambda: the policy's log-ratio to the base regresses A / lambda."""
    beta: float = IS_BETA
    """IS-DAAs' beta (DPO/IPO regularisation strength)."""
    clip_eps: float | None = IS_CLIP_EPS
    """IS-DAAs' clipping constant: importance ratios are capped at exp(2 * clip_eps) (null: no weights, plain DPO/IPO)."""
    pairs_per_prompt: int = 1
    """IS-DPO pairs per prompt: the best sample against the worst, then the 2nd best against the 2nd worst, ..."""

    # --- optimisation
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    """Sequences (APA) or pairs (IS-DPO) per optimizer step."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0

    # --- data
    max_len: int = 512
    eval_fraction: float = 0.1
    eval_batch_size: int = 16

    # --- adapter
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Projections that get LoRA (vLLM serves adapters on these)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Base model dtype; the adapters train in float32."""

    # --- held-out sampling (the reward of samples; needs a reward)
    eval_prompts: int = 16
    """Held-out prompts to sample from, with the policy and the base model (0: skip)."""
    eval_samples: int = 2
    eval_max_tokens: int = 48
    eval_temperature: float = 1.0

    # --- runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        for name in ("lam", "beta", "lr", "epochs", "batch_size", "max_len", "eval_batch_size", "lora_r", "lora_alpha",
                     "pairs_per_prompt", "eval_max_tokens", "eval_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.clip_eps is not None and self.clip_eps < 0:
            raise ValueError(f"clip_eps must be >= 0 or null, got {self.clip_eps}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("eval_prompts", "eval_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")

    def hyperparameters(self) -> dict:
        """What the manifest records as the method's hyper-parameters."""
        method = {"lambda": self.lam} if self.method == "apa" else {"beta": self.beta, "clip_eps": self.clip_eps,
                                                                     "pairs_per_prompt": self.pairs_per_prompt}
        return {**method, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "target_modules": self.target_modules}


__all__ = ["DistillConfig", "METHODS"]
