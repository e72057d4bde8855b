"""One frozen description of how to sample, built once from a request (`request.to_generation()`).

Serving passes it unchanged to plain sampling or to the value-guided search; only the engine
turns it into vLLM's `SamplingParams` (`server.engine.to_sampling_params`). A field added here
must reach that function, or `tests/server/test_sampling.py` fails.

    >>> s = Sampling(temperature=0.0, logit_bias=((42, -100.0),))
    >>> s.logit_bias_dict()
    {42: -100.0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text (the request's `response_format`)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None
    """The JSON schema, as JSON text (hashable), for kind "json_schema"."""


@dataclass(frozen=True)
class Sampling:
    """Per-token sampling settings of one request (the same for every choice and every chunk)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: every token."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs, sorted by token id."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    """Top logprobs to return per sampled token (None: none)."""
    structured: StructuredOutput | None = None

    def logit_bias_dict(self) -> dict[int, float] | None:
        return dict(self.logit_bias) or None


@dataclass(frozen=True)
class Generation:
    """What a generation request asks for: sampling, how many choices and tokens, and guidance."""

    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    max_tokens: int | None = None
    """None: up to the context length (serving fills it in)."""
    guidance: object | None = None
    """The request's `GuidanceParams` (frozen), or None for plain sampling."""
    adapter: object | None = None
    """The LoRA adapter of the policy the request's model names (vLLM's `LoRARequest`, set by serving
    where the model id is resolved), or None for the base model. Every engine request of this
    generation, plain or a search chunk, carries it."""
    reasoning_effort: str | None = None
    """The request's `reasoning_effort` (OpenAI's none..xhigh): a guided search's token budget."""
