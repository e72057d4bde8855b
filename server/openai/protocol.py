"""Wire schemas of the OpenAI-compatible API (requests convert themselves to engine parameters).

OpenAI fields come first, in the order of the OpenAI reference; our extension, `guidance`, sits
in one marked block at the end of each request.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    """Base of every wire schema: unknown fields are accepted and logged once per field name."""

    model_config = ConfigDict(extra="allow")
    _warned: ClassVar[set[str]] = set()

    @model_validator(mode="after")
    def _log_extra_fields(self):
        for name in (self.model_extra or {}):
            key = f"{type(self).__name__}.{name}"
            if key not in OpenAIBaseModel._warned and len(OpenAIBaseModel._warned) < 1000:  # bounded: names are input
                OpenAIBaseModel._warned.add(key)
                log.info("ignoring unknown field %r in %s", name, type(self).__name__)
        return self


# ----------------------------------------------------------------------------- guidance block
class GuidanceParams(OpenAIBaseModel):
    """Value-guided decoding settings (iro extension; the openai SDK sends it via `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    value: str | None = Field(None, description='Value function: "name" or "name@3" (a version). '
                              "Defaults to the value named in `model` (`<base>+<value>`).")
    mode: Literal["cbs", "bon"] | None = Field(None, description="cbs: chunk-level beam search; bon: Best-of-N.")
    w: int | None = Field(None, ge=1, description="Beam width: beams kept after each chunk (cbs).")
    k: int | None = Field(None, ge=1, description="Successors sampled per beam (cbs) or N (bon).")
    l: int | None = Field(None, ge=1, description="Chunk length in tokens (cbs).")
    beta: float | None = Field(None, gt=0, description="One temperature for every value in the chain.")
    betas: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="One beta per value in the chain (V_1..V_t).")
    align_chunks: bool = Field(
        True, description="cbs: lengthen the first chunk by fewer than gcd(l, KV block size) tokens (and shorten "
                          "the last) so that every later chunk starts 1 token past the engine's prefix-cache grid "
                          "(faster: chunk requests re-prefill less). false: every chunk is exactly l tokens.")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


# ----------------------------------------------------------------------------- requests
class _SamplingFields(OpenAIBaseModel):
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM extras
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="Sample from the k most likely tokens (0: all).")
    return_token_ids: bool = Field(False, description="Include prompt and completion token ids (like vLLM).")
    # --- iro extension -------------------------------------------------------------------
    guidance: GuidanceParams | None = Field(None, description="Value-guided decoding (iro extension).")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def to_sampling_params(self, max_tokens: int, *, logprobs: int | None, stream: bool) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        from server.errors import InvalidRequestError

        try:
            return SamplingParams(
                n=self.n, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k if self.top_k > 0 else -1,
                seed=self.seed, stop=self.stop_list() or None, max_tokens=max_tokens, logprobs=logprobs,
                logit_bias=dict(self.logit_bias) if self.logit_bias else None,
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            )
        except VLLMClientError as exc:  # e.g. n > 1 with temperature 0 (greedy)
            raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None), code="invalid_value") from exc


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=1)
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        return self.logprobs


# ----------------------------------------------------------------------------- responses
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class GuidanceInfo(OpenAIBaseModel):
    """How a guided answer was produced (iro extension on the response object)."""

    value: str
    versions: list[int]
    betas: list[float]
    mode: Literal["cbs", "bon"]
    w: int
    k: int
    l: int
    chunks: int = Field(description="Chunk sampling calls made to the engine.")
    candidates_generated: int
    candidates_scored: int
    score: float | None = Field(None, description="Chain score of the returned answer.")
    scores: list[float] = Field(default_factory=list, description="Chain score of each returned choice.")


class CompletionLogprobs(OpenAIBaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    token_ids: list[int] | None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    guidance: GuidanceInfo | None = None
    prompt_token_ids: list[list[int]] | None = Field(None, description="One list per prompt (return_token_ids).")


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    guidance: GuidanceInfo | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    guidance: GuidanceInfo | None = None
    prompt_token_ids: list[int] | None = None


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    guidance: GuidanceInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "iro"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- server info
class HealthStatus(OpenAIBaseModel):
    """`GET /health` when the engine is up (503 with an `ErrorResponse` otherwise)."""

    status: Literal["ok"] = "ok"


class VersionInfo(OpenAIBaseModel):
    """`GET /version`."""

    version: str = Field(description="iro-serve version.")
    vllm: str | None = Field(None, description="vLLM version.")
    model: str | None = Field(None, description="Base model id (None while the engine starts).")


# ----------------------------------------------------------------------------- iro: scoring
class ScoreRequest(OpenAIBaseModel):
    """Score responses to one prompt with a value chain (iro extension: `POST /v1/score`)."""

    value: str = Field(description='"name" or "name@N".')
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat prompt (rendered with the chat "
                                                                         "template).")
    prompt: str | None = Field(None, description="Raw text prompt (instead of messages).")
    responses: list[str] = Field(..., min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        return self


class ScoreResponse(OpenAIBaseModel):
    object: Literal["score"] = "score"
    value: str
    versions: list[int]
    scores: list[float] = Field(description="Chain score of each response within this set.")
    values: list[list[float]] = Field(description="Raw V_1..V_t of each response.")
