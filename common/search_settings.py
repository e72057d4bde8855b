"""How a value-guided search runs: one frozen type for the wire schema, checkpoints, tasks, the loop,
evaluation and the search itself.

`SearchSettings` is complete (every field has a value); `SearchOverrides` is what a request, a
rollout job or a CLI flag may set (every field optional). A value's manifest carries its
`SearchSettings` as defaults; a request's overrides are laid over them with `resolve`:

>>> SearchSettings(w=2).resolve(SearchOverrides(k=3)).model_dump()
{'mode': 'cbs', 'w': 2, 'k': 3, 'l': 8}
>>> SearchSettings().resolve(None) == SearchSettings()
True
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SearchMode = Literal["cbs", "bon"]
"""cbs: chunk-level beam search (w beams, k successors each, chunks of l tokens); bon: Best-of-N (N = k)."""

SEARCH_MODES: tuple[str, ...] = SearchMode.__args__  # type: ignore[attr-defined]


class SearchOverrides(BaseModel):
    """Search fields a caller may set; None keeps the value's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SearchMode | None = Field(None, description="cbs: chunk-level beam search; bon: Best-of-N.")
    w: int | None = Field(None, ge=1, description="Beam width: beams kept after each chunk (cbs).")
    k: int | None = Field(None, ge=1, description="Successors sampled per beam (cbs) or N (bon).")
    l: int | None = Field(None, ge=1, description="Chunk length in tokens (cbs).")

    def given(self) -> dict:
        """The fields that were set (for a request body or a log line)."""
        return self.model_dump(exclude_none=True)


class SearchSettings(BaseModel):
    """A complete search setting (IRO's reference: cbs with w=4, k=4, l=8)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SearchMode = "cbs"
    w: int = Field(4, ge=1)
    k: int = Field(4, ge=1)
    l: int = Field(8, ge=1)

    def resolve(self, overrides: SearchOverrides | None) -> SearchSettings:
        """These settings with every field the overrides set replaced."""
        if overrides is None:
            return self
        return self.model_copy(update=overrides.given())

    @property
    def candidates_per_step(self) -> int:
        """Engine samples one search step asks for (w*k for cbs, k for bon)."""
        return self.w * self.k if self.mode == "cbs" else self.k

    @property
    def beams(self) -> int:
        """Answers the search can return at most (the largest `n`)."""
        return self.w if self.mode == "cbs" else self.k


__all__ = ["SEARCH_MODES", "SearchMode", "SearchOverrides", "SearchSettings"]
