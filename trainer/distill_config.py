"""Configuration of policy distillation (`iro distill`): a pydantic config, YAML presets, `--set` overrides
(the trainer's one preset loader and parser, `trainer.options`).

    >>> cfg = DistillConfig.from_preset("smoke", method="is-dpo")
    >>> cfg.method, cfg.beta, cfg.clip_eps
    ('is-dpo', 0.1, 1.0)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    min_reward_gap: float = Field(0.0, ge=0)
    """IS-DPO / IS-IPO: a pair whose rewards differ by less than this is dropped. Two about equally
    good answers carry no preference, and training on them pushes one good answer down, which
    narrows the policy (distinct-2)."""
    sft_weight: float = Field(0.0, ge=0)
    """IS-DPO / IS-IPO: weight of the chosen answer's per-token negative log-likelihood added to each
    pair's loss (RPO): it keeps the chosen answers likely, where DPO alone moves probability to text
    outside the data (0: off)."""

    cover_weight: float = Field(0.0, ge=0)
    """Every method: weight of KL(base || policy) over each training response (summed over its tokens),
    added to the loss. The forward, mass-covering KL keeps the base model's other answers likely, where
    the method's own loss sharpens the policy onto a few stock phrases. Measured with IS-DPO
    (bench/results/distill-seeds): it bounds how far the policy moves (0.05 held it at KL 0.03-0.04,
    0.3 at 0.004), not how fast distinct-2 falls per unit of reward. 0: off."""

    overuse_weight: float = Field(0.0, ge=0)
    """Every method: a token that ends a bigram the training responses hold more often than the base
    model's samples of the same prompts (`reference`; `trainer.distill.bigram_overuse`) loses this times
    the log of that ratio, in reward units. APA with a value: off the token's positive advantage, down
    to 0 (`overuse_advantages`); IS-DPO/IS-IPO: summed off each response's reward, which ranks the pairs,
    and off each answer's tokens' credit, its pair's reward gap per token (their weight in the log-ratios);
    APA without a value: summed off the reward. The guided rollouts buy reward with stock phrases
    ("I'm glad", "happy to"), which the policy then repeats across answers (distinct-2). 0: off."""

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

    # --- checkpoints: a KL budget, and selection on the held-out samples (trainer/distill_checkpoints.py)
    eval_every: int | None = Field(None, ge=1)
    """Measure a checkpoint every this many optimizer steps (and at the end) and keep its adapter in
    memory: per-token KL to the base on the held-out rollouts, and the reward and distinct-2 of plain
    samples on `eval_prompts` held-out prompts (null: only the end of training)."""
    kl_budget: float | None = Field(None, gt=0)
    """Per-token KL(policy || base) on the held-out rollouts at which training stops (PPO's target
    KL; null: no budget). Needs `eval_every`. `kl_rule` says whether it also bounds eligibility."""
    kl_every: int | None = Field(None, ge=1)
    """Also measure the KL alone (forward passes over the held-out rollouts, no sampling: a few seconds)
    every this many steps between checkpoints. Training then stops within that many steps of the
    budget instead of at the next checkpoint, and the step that reached it becomes a checkpoint (null:
    the KL only at checkpoints). Needs `kl_budget`."""
    kl_rule: Literal["stop", "bound"] = "stop"
    """`stop` (PPO's target KL): the budget stops training, and the checkpoint that reached it can still
    be published unless its KL passed 1.5 times the budget (PPO's early-stop threshold); `bound`: a
    checkpoint above the budget is not eligible."""
    select: Literal["reward", "kl", "last"] = "reward"
    """Which checkpoint is published: `reward`, the highest held-out reward among the eligible ones
    (KL within the budget, distinct-2 within `max_distinct_drop` of the base's; without a reward
    function the `kl` rule, recorded as such); `kl`, the eligible one with the largest KL; `last`."""
    max_distinct_drop: float = Field(0.10, ge=0, le=1)
    """Largest relative drop of distinct-2 below the base model's (same held-out prompts and seeds)
    that leaves a checkpoint eligible."""
    on_none_eligible: Literal["lowest_kl", "refuse"] = "lowest_kl"
    """No checkpoint eligible: publish the lowest-KL one (a warning, and `eligible: false` in the
    manifest) or refuse (nothing is published; the error lists every checkpoint)."""

    # --- runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    progress: bool = True

    @field_validator("target_modules", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _budget_needs_checkpoints(self) -> "DistillConfig":
        if self.kl_budget is not None and self.eval_every is None:
            raise ValueError("kl_budget needs eval_every (how often to measure the KL and keep a checkpoint), "
                             "e.g. eval_every=10")
        if self.kl_every is not None and self.kl_budget is None:
            raise ValueError("kl_every needs kl_budget (the KL between checkpoints only decides when training stops)")
        if self.method == "apa":
            pair_only = [name for name in ("min_reward_gap", "sft_weight") if getattr(self, name)]
            if pair_only:
                raise ValueError(f"{', '.join(pair_only)} apply to the pair methods (is-dpo, is-ipo), not apa")
        return self

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
        then overrides. A section named after a method (`apa: {lam: 0.01}`) holds that method's own
        defaults: it applies over the preset's shared options when that method is trained.

        >>> apa, dpo = DistillConfig.from_preset("full", method="apa"), DistillConfig.from_preset("full", method="is-dpo")
        >>> (apa.lam, apa.kl_budget), (dpo.lr, dpo.kl_budget)
        ((0.01, 0.12), (0.0004, 0.16))
        """
        values = nest(load_preset(preset, PRESETS_DIR / "distill"))
        extra = nest(overrides)
        sections = {m: values.pop(m) for m in METHODS if m in values}
        method = extra.get("method", values.get("method", cls.model_fields["method"].default))
        own = sections.get(method) or {}
        if not isinstance(own, dict):
            raise ValueError(f"preset {preset!r}: the section {method!r} must be a mapping of that method's options")
        return cls.from_dict(merge(merge(values, own), extra))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def hyperparameters(self) -> dict:
        """What the manifest records as the method's hyper-parameters."""
        method = {"lambda": self.lam} if self.method == "apa" else {"beta": self.beta, "clip_eps": self.clip_eps,
                                                                     "pairs_per_prompt": self.pairs_per_prompt,
                                                                     "min_reward_gap": self.min_reward_gap,
                                                                     "sft_weight": self.sft_weight}
        return {**method, "cover_weight": self.cover_weight, "overuse_weight": self.overuse_weight,
                "lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "target_modules": self.target_modules}


__all__ = ["DistillConfig", "METHODS"]
