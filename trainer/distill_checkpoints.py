"""Which distillation checkpoint to publish: a KL budget (PPO's target KL) and the held-out reward
and distinct-2 of samples, as pure functions over a table of evaluated checkpoints.

Every `eval_every` steps the trainer measures a checkpoint (per-token KL to the base model on the
held-out rollouts; the reward and distinct-2 of plain samples on held-out prompts) and keeps its
adapter weights in memory. Training stops once the KL reaches `kl_budget`. A checkpoint is
*eligible* when its distinct-2 is at most `max_distinct_drop` below the base model's (same prompts,
same seeds) and, when a `kl_budget` is given here, its KL is within `kl_slack` times it. The trainer
gives the budget with slack 1 under `kl_rule: bound`; under the default `kl_rule: stop` the budget
stops training, as PPO's target KL does, and the checkpoint that reached it stays eligible up to
`STOP_SLACK` (1.5) times the budget, PPO's own early-stop threshold: one that overshot further
moved too far between two measurements to count as inside the budget. The rules:

- `reward`: the eligible checkpoint with the highest held-out reward (without a reward function the
  trainer falls back to `kl`, and the selection record says so);
- `kl`: the eligible checkpoint with the largest KL (the furthest the policy moved inside the bounds);
- `last`: the last checkpoint, whatever its bounds (the record still says whether it is eligible).

When no checkpoint is eligible, `on_none_eligible="lowest_kl"` takes the checkpoint with the lowest
KL (the nearest to the bounds; logged as a warning and recorded with `eligible: false`), and
`"refuse"` raises `NoEligibleCheckpoint` with the table, so nothing is published.

    >>> cps = [Checkpoint(10, kl_to_base=0.02, reward=0.3, distinct_2=0.70),
    ...        Checkpoint(20, kl_to_base=0.05, reward=0.5, distinct_2=0.66),
    ...        Checkpoint(30, kl_to_base=0.09, reward=0.6, distinct_2=0.55)]
    >>> choice = select_checkpoint(cps, "reward", kl_budget=0.1, max_distinct_drop=0.1, base_distinct_2=0.70)
    >>> choice.step, choice.why
    (20, 'highest held-out reward (+0.5000) of the 2 eligible checkpoints')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Rule = Literal["reward", "kl", "last"]

STOP_SLACK = 1.5
"""Under `kl_rule: stop`, a checkpoint stays eligible up to this multiple of the KL budget (PPO
implementations stop an update once the KL passes 1.5 times the target)."""


class NoEligibleCheckpoint(ValueError):
    """No checkpoint met the KL budget and the distinct-2 bound (with `on_none_eligible="refuse"`)."""

    def __init__(self, message: str, table: list[dict]):
        super().__init__(message)
        self.table = table


@dataclass
class Checkpoint:
    """One evaluated checkpoint; `state` holds its adapter weights (not part of the record)."""

    step: int
    kl_to_base: float
    """Per-token KL(policy || base) on the held-out rollouts."""
    reward: float | None = None
    """Mean reward of plain samples on the held-out prompts (None: no reward function)."""
    distinct_2: float | None = None
    """Distinct-2 of those samples (None: no held-out samples)."""
    loss: float | None = None
    """Held-out loss of the method."""
    epoch: int | None = None
    state: dict | None = field(default=None, repr=False)
    eligible: bool | None = None
    why_not: list[str] = field(default_factory=list)

    def record(self, base_distinct_2: float | None = None) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "state"}
        if self.distinct_2 is not None and base_distinct_2:
            out["distinct_2_vs_base"] = self.distinct_2 / base_distinct_2 - 1
        return out


@dataclass
class Choice:
    index: int
    step: int
    rule: Rule
    """The rule applied (`kl` when `reward` was asked for without a reward function)."""
    why: str
    eligible: bool
    """False when no checkpoint was eligible (or `last` took an ineligible one)."""


def mark_eligible(checkpoints: Sequence[Checkpoint], *, kl_budget: float | None, max_distinct_drop: float,
                  base_distinct_2: float | None, kl_slack: float = 1.0) -> None:
    """Set each checkpoint's `eligible` and `why_not` (the bounds it misses).

    >>> cps = [Checkpoint(30, kl_to_base=0.17), Checkpoint(60, kl_to_base=1.1)]
    >>> mark_eligible(cps, kl_budget=0.12, max_distinct_drop=0.1, base_distinct_2=None, kl_slack=STOP_SLACK)
    >>> [(cp.eligible, cp.why_not) for cp in cps]
    [(True, []), (False, ['KL 1.1000 > 1.5 x budget 0.12'])]
    """
    floor = None if base_distinct_2 is None else (1 - max_distinct_drop) * base_distinct_2
    for cp in checkpoints:
        cp.why_not = []
        if kl_budget is not None and cp.kl_to_base > kl_budget * kl_slack:
            limit = f"budget {kl_budget:g}" if kl_slack == 1 else f"{kl_slack:g} x budget {kl_budget:g}"
            cp.why_not.append(f"KL {cp.kl_to_base:.4f} > {limit}")
        if floor is not None and cp.distinct_2 is not None and cp.distinct_2 < floor:
            cp.why_not.append(f"distinct-2 {cp.distinct_2:.4f} is more than {max_distinct_drop:.0%} below "
                              f"the base's {base_distinct_2:.4f}")
        cp.eligible = not cp.why_not


def select_checkpoint(checkpoints: Sequence[Checkpoint], rule: Rule, *, kl_budget: float | None,
                      max_distinct_drop: float, base_distinct_2: float | None,
                      on_none_eligible: Literal["lowest_kl", "refuse"] = "lowest_kl", kl_slack: float = 1.0) -> Choice:
    """The checkpoint to publish under `rule` (see the module docstring); marks eligibility."""
    if not checkpoints:
        raise ValueError("no checkpoints to choose from (training ran no step)")
    mark_eligible(checkpoints, kl_budget=kl_budget, max_distinct_drop=max_distinct_drop,
                  base_distinct_2=base_distinct_2, kl_slack=kl_slack)
    if rule == "reward" and any(cp.reward is None for cp in checkpoints):
        raise ValueError("select=reward needs the held-out reward of every checkpoint")
    if rule == "last":
        i = len(checkpoints) - 1
        cp = checkpoints[i]
        why = "the last checkpoint" + ("" if cp.eligible else f" (outside the bounds: {'; '.join(cp.why_not)})")
        return Choice(i, cp.step, rule, why, bool(cp.eligible))
    eligible = [i for i, cp in enumerate(checkpoints) if cp.eligible]
    if not eligible:
        table = [cp.record(base_distinct_2) for cp in checkpoints]
        detail = "; ".join(f"step {cp.step}: {', '.join(cp.why_not)}" for cp in checkpoints)
        if on_none_eligible == "refuse":
            raise NoEligibleCheckpoint(f"no checkpoint is inside the bounds ({detail}); raise kl_budget or "
                                       "max_distinct_drop, lower lr, or evaluate more often (eval_every)", table)
        i = min(range(len(checkpoints)), key=lambda j: (checkpoints[j].kl_to_base, j))
        return Choice(i, checkpoints[i].step, rule,
                      f"no checkpoint inside the bounds ({detail}): the lowest-KL one", False)
    if rule == "reward":
        i = max(eligible, key=lambda j: (checkpoints[j].reward, -j))  # ties: the earlier (nearer the base)
        why = f"highest held-out reward ({checkpoints[i].reward:+.4f}) of the {len(eligible)} eligible checkpoints"
    else:
        i = max(eligible, key=lambda j: (checkpoints[j].kl_to_base, -j))
        why = f"largest KL ({checkpoints[i].kl_to_base:.4f}) of the {len(eligible)} eligible checkpoints"
    return Choice(i, checkpoints[i].step, rule, why, True)


__all__ = ["STOP_SLACK", "Checkpoint", "Choice", "NoEligibleCheckpoint", "mark_eligible", "select_checkpoint"]
