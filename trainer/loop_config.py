"""The loop's config: sizes and settings of one run (`LoopConfig`), from a preset plus `--set` options.

    config = LoopConfig.from_preset("smoke", iterations=2, **{"search.w": "2", "train.lr": "1e-4"})
    config.rollout_search      # SearchSettings of the guided rollouts (t > 1)
    config.search              # SearchOverrides of IRO-t's evaluation, laid over the task's search

The search of each stage is one `common.search_settings` type in its own section. The flat keys of
earlier presets and runs (`rollout_w`, `rollout_k`, `rollout_l`, `w`, `k`, `l`) are still read, as the
section fields they name (`upgrade_options`); giving one both ways at once is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.search_settings import SearchOverrides, SearchSettings
from trainer.options import load_preset, merge, nest, short_error

PRESETS_DIR = Path(__file__).parent / "presets" / "loop"

FORMER_KEYS: dict[str, tuple[str, str]] = {
    "rollout_w": ("rollout_search", "w"), "rollout_k": ("rollout_search", "k"), "rollout_l": ("rollout_search", "l"),
    "w": ("search", "w"), "k": ("search", "k"), "l": ("search", "l"),
}
"""Flat search keys of earlier presets and runs -> (section, field)."""


def upgrade_options(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with the former flat search keys moved into their sections (a None is dropped: it meant
    "the default"); a key given both ways is refused.

    >>> upgrade_options({"rollout_w": 2, "w": None, "iterations": 3})
    {'iterations': 3, 'rollout_search': {'w': 2}}
    """
    if not any(key in data for key in FORMER_KEYS):
        return data
    out = {k: v for k, v in data.items() if k not in FORMER_KEYS}
    for key, (section, field) in FORMER_KEYS.items():
        if key not in data or data[key] is None:
            continue
        given = out.get(section)
        given = given.model_dump(exclude_none=True) if isinstance(given, BaseModel) else dict(given or {})
        if given.get(field) is not None and given[field] != data[key]:
            raise ValueError(f"{key}={data[key]!r} and {section}.{field}={given[field]!r} both given; "
                             f"{key} is the former name of {section}.{field}: give it once")
        out[section] = {**given, field: data[key]}
    return out


class LoopConfig(BaseModel):
    """Sizes and settings of one loop run (connection settings are `IroLoop` arguments)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    task: str = "review-sentiment"
    """A built-in task's name, a task file, or a folder with task.yaml (see trainer.tasks)."""
    iterations: int = Field(3, ge=1)
    name: str | None = None
    """Value name in the registry (default: the task's name)."""
    # --- rollouts (training data)
    n_train_prompts: int = Field(64, ge=1)
    samples_per_prompt: int = Field(2, ge=1)
    rollout_search: SearchSettings = Field(default_factory=SearchSettings)
    """The search of the guided rollouts of iterations t > 1, every field pinned (default: the
    reference's cbs with w=4, k=4, l=8). Formerly `rollout_w`, `rollout_k`, `rollout_l`, still read."""
    # --- evaluation
    n_eval_prompts: int = Field(32, ge=1)
    bon: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    """N of the Best-of-N baselines (1 is plain base sampling)."""
    oracle: bool = True
    """Also Best-of-N ranked by the reward itself (the headroom a value could reach)."""
    search: SearchOverrides = Field(default_factory=SearchOverrides)
    """The search of IRO-t at evaluation: what it sets replaces the task's `search` (whose own default
    is the reference's cbs with w=4, k=4, l=8). Formerly `w`, `k`, `l`, still read."""
    # --- sampling (all stages)
    max_tokens: int | None = Field(None, ge=1)
    """Response length (default: the task's)."""
    temperature: float | None = Field(None, ge=0)
    """Sampling temperature (default: the task's)."""
    concurrency: int = Field(16, ge=1)
    seed: int = 0
    # --- value training
    train_preset: str = "full"
    """Value-training preset (trainer/presets/*.yaml) or a YAML path."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the value-training preset (ValueTrainConfig options, `model:` nested)."""
    beta: float = Field(1.0, gt=0)
    publish_timeout: float = Field(180.0, gt=0)
    """Seconds to wait for the server to serve a new version."""
    # --- distillation (after the last iteration)
    distill: list[Literal["apa", "is-dpo", "is-ipo"]] = Field(default_factory=list)
    """Distil the final guided policy into a LoRA policy per method (`apa`, `is-dpo`, `is-ipo`;
    a comma list is fine); empty: no distillation."""
    distill_preset: str = "full"
    """Distillation preset (trainer/presets/distill/*.yaml) or a YAML path."""
    distill_options: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the distillation preset (DistillConfig options); a method's name as the key
    holds overrides for that method alone (`distill_options.apa.lam=0.025`)."""
    distill_from: Literal["last", "base"] | SearchSettings = "last"
    """The rollouts distillation learns from. `last`: iteration T's training rollouts (V_1..V_{T-1}
    with `rollout_search`). `base`: plain samples of the training prompts by the base model, seeded as
    iteration 1's. A search (`distill_from.mode=pf ...`): the training prompts answered afresh by the
    final chain V_1..V_T with it, seeded as iteration T+1's. The last two are collected by the
    stages `distill-data/*` into `distill-data/`, `samples_per_prompt` each."""
    distill_name: str | None = None
    """The distilled policies are published as `<distill_name>-<method>` (default: the value's name),
    so a copy of a run distilled again (another seed, other options) does not replace the first."""
    progress: bool = True

    @field_validator("distill", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else list(value)
        methods = [m.strip() for item in items for m in str(item).split(",") if m.strip()]
        return list(dict.fromkeys(methods))  # once each, in the order given

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = upgrade_options(data)
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown loop option {unknown[0]!r}; known: {', '.join(sorted(cls.model_fields))} "
                                 "(value-training options as train.KEY)")
        return data

    @model_validator(mode="after")
    def _train_options_are_known(self) -> "LoopConfig":
        self.train_config()  # refuses a bad train.KEY now rather than after an hour of rollouts
        for method in self.distill:
            self.distill_config(method)
        return self

    def distill_source(self) -> str | dict[str, Any]:
        """`distill_from` as stages record it (`last`, `base`, or the search's fields)."""
        source = self.distill_from
        return source.model_dump() if isinstance(source, SearchSettings) else source

    def distill_config(self, method: str, **overrides: Any):
        """The distillation config of `method`: `distill_preset` with `distill_options` over it. The
        trainer samples a few held-out prompts at each checkpoint (`eval_prompts`) to select the one
        it publishes on reward and distinct-2; the loop's own evaluation goes through the server."""
        from trainer.distill_config import METHODS, DistillConfig

        shared = {k: v for k, v in self.distill_options.items() if k not in METHODS}
        own = self.distill_options.get(method) or {}
        if not isinstance(own, dict):
            raise ValueError(f"distill_options.{method} must hold options of that method (e.g. "
                             f"distill_options.{method}.lr=1e-4), not {own!r}")
        return DistillConfig.from_preset(self.distill_preset,
                                         **{**overrides, **flatten(shared), **flatten(own),
                                            "method": method})

    def train_config(self, **overrides: Any):
        """The value-training config of every iteration: `train_preset` with `train` over it."""
        from trainer.value_config import ValueTrainConfig

        return ValueTrainConfig.from_preset(self.train_preset, **{**overrides, **flatten(self.train)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopConfig:
        """Build from a mapping; dotted keys reach into sections (`train.lr`, `train.model.lora_r`),
        strings are read as YAML scalars (so `--set bon=[1,4]` and `--set iterations=2` work)."""
        try:
            return cls.model_validate(nest(values, TEXT_OPTIONS))
        except ValidationError as exc:
            raise short_error(exc, "loop options") from None

    @classmethod
    def comparable(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A config saved by an earlier version (a run's `state.json`) in today's shape, for comparing
        with a new config: former keys moved to their sections, missing ones at their defaults. As
        saved (former keys moved) when it does not validate any more."""
        data = upgrade_options(data)
        try:
            return cls.model_validate(data).to_dict()
        except (ValidationError, ValueError):
            return {**cls.model_construct().to_dict(), **data}

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> LoopConfig:
        """A preset by name (`smoke`, `full`; trainer/presets/loop/) or a YAML path, plus overrides.

        A distillation option given for all methods (`distill_options.lr=...`) replaces the preset's
        per-method value of it (`distill_options.apa.lr`): what the user sent wins."""
        from trainer.distill_config import METHODS

        base = upgrade_options(nest(load_preset(preset, PRESETS_DIR, "loop preset")))
        extra = upgrade_options(nest(overrides, TEXT_OPTIONS))  # so `--set w=2` replaces a preset's `search.w`
        shared = {k for k in (extra.get("distill_options") or {}) if k not in METHODS}
        for method, options in (base.get("distill_options") or {}).items():
            if method in METHODS and isinstance(options, dict):
                base["distill_options"][method] = {k: v for k, v in options.items() if k not in shared}
        return cls.from_dict(merge(base, extra))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


TEXT_OPTIONS = frozenset({"task", "name", "train_preset", "distill_preset", "distill_name"})
"""Loop options taken as text from the command line (a value named `null` or `yes` is a name)."""


def flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as dotted keys (the inverse of trainer.options.nest)."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


RESUMABLE_OPTIONS = frozenset({"iterations", "progress", "publish_timeout", "concurrency", "distill"})
"""Options a run may be resumed with changed (more iterations, distillation added afterwards)."""
DISTILL_OPTIONS = frozenset({"distill_preset", "distill_options", "distill_name", "distill_from"})
"""Options a run may be resumed with changed until its first distillation stage has finished."""


__all__ = ["DISTILL_OPTIONS", "FORMER_KEYS", "LoopConfig", "PRESETS_DIR", "RESUMABLE_OPTIONS", "TEXT_OPTIONS",
           "flatten", "upgrade_options"]
