"""How a value-guided search runs: one frozen type for the wire schema, checkpoints, tasks, the loop,
evaluation and the search itself.

`SearchSettings` is complete (every field has a value); `SearchOverrides` is what a request, a
rollout job or a CLI flag may set (every field optional). A value's manifest carries its
`SearchSettings` as defaults; a request's overrides are laid over them with `resolve`:

>>> SearchSettings(w=2).resolve(SearchOverrides(k=3)).model_dump(exclude_none=True)
{'mode': 'cbs', 'w': 2, 'k': 3, 'l': 8}
>>> SearchSettings().resolve(None) == SearchSettings()
True
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SearchMode = Literal["cbs", "bon", "pf", "dvts"]
"""cbs: chunk-level beam search (w beams, k successors each, chunks of l tokens); bon: Best-of-N (N = k);
pf: particle filtering (k particles, one chunk each per step, resampled by softmax(chain score));
dvts: diverse verifier tree search (s independent subtrees, each a beam search of width w)."""

SEARCH_MODES: tuple[str, ...] = SearchMode.__args__  # type: ignore[attr-defined]

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
"""OpenAI's `reasoning_effort` values."""

REASONING_EFFORTS: tuple[str, ...] = ReasoningEffort.__args__  # type: ignore[attr-defined]

REASONING_EFFORT_BUDGETS: dict[str, float] = {"none": 1.0, "minimal": 2.0, "low": 4.0, "medium": 16.0,
                                              "high": 32.0, "xhigh": 64.0}
"""Default token budget of each `reasoning_effort`, as a multiple of the request's max_tokens (1: what
one plain answer may cost). `medium` (OpenAI's default) is what IRO's reference search (cbs, w=4,
k=4: 16 candidates per step) costs at most."""

CHUNK_PRESETS: dict[str, tuple[str, ...]] = {"steps": ("\n\n",), "lines": ("\n",),
                                             "sentences": (". ", "! ", "? ", "\n")}
"""Named delimiter sets for `chunk_until` ("steps": search-and-learn's reasoning steps)."""


class SearchOverrides(BaseModel):
    """Search fields a caller may set; None keeps the value's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SearchMode | None = Field(
        None, description="cbs: chunk-level beam search; bon: Best-of-N; pf: particle filtering (k particles, "
                          "resampled each step by softmax(value / beta)); dvts: diverse verifier tree search "
                          "(s independent beam searches of width w, the best leaf wins).")
    w: int | None = Field(None, ge=1, description="Beam width: beams kept after each chunk (cbs; per subtree in dvts).")
    k: int | None = Field(None, ge=1, description="Successors sampled per beam (cbs, dvts), N (bon), particles (pf; "
                                                  "default: the value's w*k, its cbs's samples per step).")
    l: int | None = Field(None, ge=1, description="Chunk length in tokens (cbs, pf, dvts): the most a chunk may add.")
    s: int | None = Field(None, ge=1, description="dvts: independent subtrees (default: the value's w subtrees "
                                                  "of one beam each, search-and-learn's DVTS).")
    budget_tokens: int | None = Field(
        None, ge=1, description="Tokens the search of each prompt may generate, summed over every candidate "
                                "(exact: it never generates more; usage counts the same tokens). Without w/k "
                                "the search plans its widths from it.")

    def given(self) -> dict:
        """The search fields that were set (for a request body or a log line)."""
        return self.model_dump(include=set(SearchOverrides.model_fields), exclude_none=True)


class SearchSettings(BaseModel):
    """A complete search setting (IRO's reference: cbs with w=4, k=4, l=8)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SearchMode = "cbs"
    w: int = Field(4, ge=1)
    k: int = Field(4, ge=1)
    l: int = Field(8, ge=1)
    s: int | None = Field(None, ge=1)
    """dvts: independent subtrees of w beams each (None: w subtrees of one beam, search-and-learn's DVTS)."""
    budget_tokens: int | None = Field(None, ge=1)
    """Tokens the search may generate, every candidate counted (None: no budget)."""

    def resolve(self, overrides: SearchOverrides | None) -> SearchSettings:
        """These settings with every field the overrides set replaced."""
        if overrides is None:
            return self
        return self.model_copy(update=overrides.given())

    def for_request(self) -> dict:
        """The fields a request with these settings sends: those `mode` uses (pf has no w, bon no w or l,
        only dvts has s), as the server refuses a field the mode has no use for.

        >>> SearchSettings(mode="pf", k=16, budget_tokens=512).for_request()
        {'mode': 'pf', 'k': 16, 'l': 8, 'budget_tokens': 512}
        >>> SearchSettings(mode="bon", k=8).for_request()
        {'mode': 'bon', 'k': 8}
        """
        unused = {"cbs": {"s"}, "pf": {"w", "s"}, "bon": {"w", "l", "s"}, "dvts": set()}[self.mode]
        return self.model_dump(exclude=unused, exclude_none=True)

    @property
    def candidates_per_step(self) -> int:
        """Engine samples one search step asks for at most (w*k for cbs, s*w*k for dvts, k for bon and pf)."""
        if self.mode == "cbs":
            return self.w * self.k
        if self.mode == "dvts":
            return (self.s or 1) * self.w * self.k
        return self.k

    @property
    def beams(self) -> int:
        """Answers the search can return at most (the largest `n`)."""
        if self.mode == "cbs":
            return self.w
        if self.mode == "dvts":
            return (self.s or 1) * self.w
        return self.k


__all__ = ["CHUNK_PRESETS", "REASONING_EFFORTS", "REASONING_EFFORT_BUDGETS", "SEARCH_MODES", "ReasoningEffort",
           "SearchMode", "SearchOverrides", "SearchSettings"]
