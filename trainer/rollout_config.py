"""What a rollout job samples and how (`RolloutConfig`), and the request fields a prompt line may set.

    config = RolloutConfig(value="review@2", search=SearchOverrides(mode="cbs", w=2), max_tokens=64)
    config.guidance()   # {'value': 'review@2', 'mode': 'cbs', 'w': 2}: the request's `guidance` block
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from common.protocol import ChatCompletionRequest, CompletionRequest
from common.sampling import Sampling
from common.search_settings import SearchOverrides, SearchSettings

DEFAULT_SERVER = "http://127.0.0.1:8000"


def server_url(url: str | None) -> str:
    """The server a job talks to: `url`, else `IRO_BASE_URL`, else DEFAULT_SERVER."""
    import os

    return url or os.environ.get("IRO_BASE_URL") or DEFAULT_SERVER


def _sampling_keys() -> tuple[str, ...]:
    """The fields of the one sampling type (`common.sampling.Sampling`) that both request kinds carry
    under the same name, and `max_tokens` (`Generation`'s). `logprobs` is left out: it asks for
    output (and means a bool in chat, a count in completions), it does not change how to sample.

    >>> {"temperature", "min_p", "stop_token_ids", "max_tokens"} <= set(SAMPLING_KEYS)
    True
    """
    wire = ChatCompletionRequest.model_fields.keys() & CompletionRequest.model_fields.keys()
    names = [f.name for f in dataclasses.fields(Sampling)] + ["max_tokens"]
    return tuple(n for n in names if n in wire and n != "logprobs")


SAMPLING_KEYS: tuple[str, ...] = _sampling_keys()
"""Request fields a prompt line (or a batch body) may set for itself."""


class RolloutError(ValueError):
    """A bad input line, a bad option, or a server answer the job cannot use."""

    def __init__(self, message: str, *, where: str | None = None):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


@dataclass
class RolloutConfig:
    """What to sample and how; per-prompt fields of the input override the sampling defaults."""

    server: str = DEFAULT_SERVER
    api_key: str | None = None
    model: str | None = None
    """Model id to request (default: the server's base model)."""
    samples_per_prompt: int = 1
    concurrency: int = 8
    """Requests in flight at once."""
    # --- the policy: the base model, or value-guided decoding
    value: str | None = None
    """Value name (`name` or `name@N`) for guided decoding; None samples the base model."""
    search: SearchOverrides | SearchSettings | None = None
    """The search of guided decoding: what it sets replaces the value's defaults (a complete
    `SearchSettings` pins every field); None: the value's defaults."""
    beta: float | None = None
    """`guidance.beta` of the guided requests: one temperature for every value of the chain (pf: the
    resampling temperature, softmax(V / beta)); None: the registry's betas. Plain requests ignore it."""
    # --- sampling
    temperature: float = 0.7
    max_tokens: int = 128
    seed: int | None = None
    """Job seed: sample j of prompt p is requested with a seed derived from (seed, p, j)."""
    # --- runtime
    backend: Literal["server", "ray", "batch"] = "server"
    """server: HTTP requests; batch: the server's Batch API (`--via-batch`); ray: offline vLLM on Ray."""
    keep_batch_files: bool = False
    """backend batch: keep the batch's input, output and error files on the server once the records are
    written (default: delete them, so a long loop does not fill the key's file quota)."""
    fsync_every: int = 16
    progress: bool = True
    record_usage: bool = False
    """Add each answer's `usage` to its record (evaluation counts tokens; training files stay exact)."""
    tokenizer: str | None = None
    """Tokenizer folder used to render `prompt_text` from the prompt's token ids (default: the
    embedded base model when the server serves it)."""
    timeout: float = 900.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise RolloutError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.search, dict):  # from a mapping of search fields (bounds checked there)
            try:
                self.search = SearchOverrides.model_validate(self.search)
            except ValueError as exc:
                raise RolloutError(f"search: {exc}") from None
        if self.search is not None and not isinstance(self.search, (SearchOverrides, SearchSettings)):
            raise RolloutError(f"search must be SearchOverrides or SearchSettings, got {type(self.search).__name__}")
        if self.beta is not None and not self.beta > 0:
            raise RolloutError(f"beta must be > 0, got {self.beta}")
        if self.value is None and self.pinned():
            raise RolloutError("--mode/--w/--k/--l steer value-guided decoding: give --value NAME too")
        if self.backend not in ("server", "ray", "batch"):
            raise RolloutError(f"backend must be 'server', 'ray' or 'batch', got {self.backend!r}")

    def pinned(self) -> dict[str, Any]:
        """The search fields this job sets (the rest are the value's defaults)."""
        if isinstance(self.search, SearchSettings):
            return self.search.for_request()
        return self.search.model_dump(exclude_none=True) if self.search is not None else {}

    def guidance(self) -> dict[str, Any] | None:
        """The requests' `guidance` block (None: plain sampling)."""
        if self.value is None:
            return None
        return {"value": self.value, **self.pinned(), **({"beta": self.beta} if self.beta is not None else {})}


__all__ = ["DEFAULT_SERVER", "SAMPLING_KEYS", "RolloutConfig", "RolloutError"]
