"""What a method scored on the evaluation prompts (`MethodResult`, plain data saved in a run's state
and `eval.json`) and the markdown table of results; evaluation, plots and the loop's report read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class MethodResult:
    """What one method scored on the evaluation prompts."""

    name: str
    label: str
    kind: str
    settings: str
    value: str | None
    versions: list[int]
    prompts: int
    mean: float
    ci_low: float
    ci_high: float
    std: float
    distinct2: float
    tokens: int
    """Completion tokens generated in all (every candidate of a search)."""
    tokens_per_prompt: float
    seconds: float
    n: int = 1
    kl_to_base: float | None = None
    """Distilled policies: KL(policy || base) per response token on the distillation's held-out rollouts."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def ci_text(self) -> str:
        return f"{self.mean:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]"



def markdown_table(results: Sequence[MethodResult]) -> str:
    """A markdown table of results (one row per method); a `KL to base` column when a distilled
    policy is among them."""
    kl = any(r.kl_to_base is not None for r in results)
    lines = ["| method | settings | value | mean reward [95% CI] | distinct-2 | tokens/prompt | wall s |"
             + (" KL to base |" if kl else ""), "|---|---|---|---|---|---|---|" + ("---|" if kl else "")]
    for r in results:
        value = f"{r.value} (chain {','.join(map(str, r.versions))})" if r.value else "-"
        row = (f"| {r.label} | {r.settings} | {value} | {r.ci_text()} | {r.distinct2:.3f} | "
               f"{r.tokens_per_prompt:.0f} | {r.seconds:.0f} |")
        if kl:
            row += " - |" if r.kl_to_base is None else f" {r.kl_to_base:.4f} |"
        lines.append(row)
    return "\n".join(lines)


__all__ = ["MethodResult", "markdown_table"]
