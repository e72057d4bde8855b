"""Wire schemas of the OpenAI-compatible API (requests convert themselves to engine parameters).

OpenAI fields come first, in the order of the OpenAI reference; our extension, `guidance`, sits
in one marked block at the end of each request.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.sampling import Generation, Sampling, StructuredOutput
from common.search_settings import CHUNK_PRESETS, ReasoningEffort, SearchMode, SearchOverrides

log = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    """Base of every response schema: unknown fields (from a newer server) are kept and logged once."""

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


# Published bounds of list fields (the OpenAPI document carries them; `ServerSettings` may set
# lower limits, checked by serving before any work starts).
MAX_STOP = 16
"""`stop` strings per request."""
MAX_STOP_CHARS = 256
"""Characters per `stop` string."""
MAX_STOP_TOKEN_IDS = 64
"""`stop_token_ids` per request."""
MAX_LOGIT_BIAS = 300
"""Entries of `logit_bias` (OpenAI's limit)."""
MAX_PROMPTS = 64
"""Prompts in one completion request (a list of strings or of token id lists)."""
MAX_SCORE_RESPONSES = 256
"""Responses in one /v1/score request."""

_SURROGATE = re.compile("[\ud800-\udfff]")
UNICODE_ERROR = "text must be valid Unicode: lone UTF-16 surrogates (\\ud800-\\udfff) are not allowed"


def has_lone_surrogate(value: Any) -> bool:
    """Whether `value` (a string, or lists / dicts of them, keys included) holds a UTF-16 surrogate:
    JSON may escape one (`"\\ud800"`) but it is no Unicode text, so no tokenizer, encoder or engine can
    take it. Iterative, so a deeply nested value cannot exhaust the stack."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return False


class OpenAIRequestModel(BaseModel):
    """Base of every request schema: an unknown field is refused (400 naming it), as OpenAI does,
    never silently dropped; so are non-finite numbers (`NaN`, `Infinity`, which Python's JSON
    decoder accepts) and text holding lone UTF-16 surrogates, in every field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        if has_lone_surrogate(value):
            raise ValueError(UNICODE_ERROR)
        return value


# ----------------------------------------------------------------------------- guidance block
MAX_CHUNK_DELIMITERS = 8
"""Delimiters in `guidance.chunk_until`."""
MAX_DEADLINE_MS = 3_600_000
"""The longest `guidance.deadline_ms` (one hour)."""


class GuidanceParams(OpenAIRequestModel, SearchOverrides):
    """Value-guided decoding settings (iro extension; the openai SDK sends it via `extra_body`). The search
    fields (mode, w, k, l, s, budget_tokens) are `common.search_settings.SearchOverrides`'."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    value: str | None = Field(None, description='Value function: "name" or "name@3" (a version). '
                              "Defaults to the value named in `model` (`<base>+<value>`).")
    beta: float | None = Field(None, gt=0, description="One temperature for every value in the chain (pf: the "
                                                       "resampling temperature).")
    betas: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(
        None, description="One beta per value in the chain (V_1..V_t).")
    align_chunks: bool = Field(
        True, description="cbs: lengthen the first chunk by fewer than gcd(l, KV block size) tokens (and shorten "
                          "the last) so that every later chunk starts 1 token past the engine's prefix-cache grid "
                          "(faster: chunk requests re-prefill less). false: every chunk is exactly l tokens.")
    chunk_until: (Annotated[str, Field(description="A preset: " + ", ".join(
                      f"{name} ({list(d)!r})" for name, d in CHUNK_PRESETS.items()))]
                  | Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]],
                              Field(min_length=1, max_length=MAX_CHUNK_DELIMITERS)]
                  | None) = Field(
        None, description='Step-aware chunks: a chunk ends at the first of these strings (e.g. ["\\n\\n"], kept '
                          "in the text) or after l tokens, whichever comes first, so the value scores whole steps; "
                          "or the name of a preset. Unlike `stop`, a delimiter ends the chunk, not the answer.")
    deadline_ms: int | None = Field(
        None, ge=1, le=MAX_DEADLINE_MS,
        description="Anytime search: once this many milliseconds have passed since the search started, no new "
                    "step starts and the best candidate so far is returned, finished or not (finish_reason "
                    "'length'; guidance.stopped_by 'deadline'). The first step always runs; a step in flight "
                    "finishes, so an answer may come up to one step's time after the deadline.")

    @field_validator("chunk_until")
    @classmethod
    def _known_preset(cls, value):
        if isinstance(value, str) and value not in CHUNK_PRESETS:
            raise ValueError(f"unknown chunk_until preset {value!r} (known: {', '.join(CHUNK_PRESETS)}); give "
                             "delimiters as a list of strings")
        return value

    def chunk_delimiters(self) -> tuple[str, ...]:
        """`chunk_until` as the strings that end a chunk (a preset resolved)."""
        if self.chunk_until is None:
            return ()
        if isinstance(self.chunk_until, str):
            return CHUNK_PRESETS[self.chunk_until]
        return tuple(dict.fromkeys(self.chunk_until))


class StreamOptions(OpenAIRequestModel):
    include_usage: bool = False


class JsonSchemaFormat(OpenAIRequestModel):
    name: str = Field(..., max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(OpenAIRequestModel):
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (JSON valid
    against `json_schema.schema`); enforced by vLLM's structured outputs, on guided requests too."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema (and only then)")
        return self

    def to_structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json_object")
        schema = self.json_schema.json_schema or {}
        return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True))


# ----------------------------------------------------------------------------- requests
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _SamplingFields(OpenAIRequestModel):
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="On a value-guided model (`<base>+<value>` or with `guidance`): the search's token "
                          "budget, from the server's table (a multiple of max_tokens). On a plain model only "
                          "'none' is accepted (plain sampling does no search).")
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- vLLM extras (fields of vLLM's SamplingParams) ---------------------------------------
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="Sample from the k most likely tokens (0: all).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens less likely than min_p x the most likely.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="> 1 discourages tokens already in the prompt "
                                                                       "or the output (vLLM's repetition_penalty).")
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens before EOS or a stop token.")
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="Token ids that end a choice.")
    ignore_eos: bool = Field(False, description="Keep generating after EOS.")
    return_token_ids: bool = Field(False, description="Include prompt and completion token ids (like vLLM).")
    # --- iro extension -------------------------------------------------------------------
    guidance: GuidanceParams | None = Field(None, description="Value-guided decoding (iro extension).")

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        return None

    def to_sampling(self) -> Sampling:
        """The request's sampling settings, as one frozen object (see `common.sampling`)."""
        return Sampling(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())), seed=self.seed,
            stop=tuple(self.stop_list()), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=self.logprobs_k(),
            structured=self.response_format.to_structured() if self.response_format else None)

    def to_generation(self) -> Generation:
        """Everything serving needs to generate: sampling, n, max_tokens and guidance."""
        guidance = self.guidance
        if guidance is None and self.reasoning_effort not in (None, "none"):
            guidance = GuidanceParams()  # an effort asks for a search: guided serving refuses it without a value
        return Generation(sampling=self.to_sampling(), n=self.n, max_tokens=self.requested_max_tokens(),
                          guidance=guidance, reasoning_effort=self.reasoning_effort)


class ChatMessage(OpenAIRequestModel):
    """One chat message; its shape is checked per role as OpenAI does."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = Field(None, description="role tool: the call this message answers.")
    tool_calls: list[dict[str, Any]] | None = Field(None, description="role assistant: calls it made earlier.")

    @model_validator(mode="after")
    def _shape(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError(f"tool_call_id is only allowed on role 'tool' messages, not {self.role!r}")
        if self.role != "assistant" and self.tool_calls is not None:
            raise ValueError(f"tool_calls is only allowed on role 'assistant' messages, not {self.role!r}")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a message with role {self.role!r} needs content")
        if isinstance(self.content, list):
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported; "
                                     f"got type {part.get('type')!r}")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def check_metadata(metadata: dict | None) -> dict | None:
    """OpenAI's limits on `metadata`: at most 16 pairs, keys <= 64 and values <= 512 characters."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs; got {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise ValueError(f"keys may have at most {MAX_METADATA_KEY} characters; {key[:20]!r}... has {len(key)}")
        if len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"values may have at most {MAX_METADATA_VALUE} characters; {key!r} has {len(value)}")
    return metadata


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs kept with a stored completion "
                                            "(keys <= 64, values <= 512 characters); needs store: true.")
    store: bool | None = Field(None, description="Keep the request and its answer (GET /v1/chat/completions).")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, description="Refused: this server does not call tools.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Refused: this server does not call tools.")

    @field_validator("tools", "tool_choice")
    @classmethod
    def _no_tools(cls, value, info):
        # Refused, not ignored: a client that sends tools expects tool calls back.
        if value is not None and value != "none" and value != []:
            raise ValueError(f"{info.field_name} is not supported: this server does not call tools")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value):
        return check_metadata(value)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    model: str
    prompt: (str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[int]
             | Annotated[list[list[int]], Field(max_length=MAX_PROMPTS)])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=1)
    suffix: str | None = None

    def logprobs_k(self) -> int | None:
        return self.logprobs


# ----------------------------------------------------------------------------- responses
class CompletionTokensDetails(OpenAIBaseModel):
    reasoning_tokens: int = Field(0, description="Tokens generated and not returned: a guided search's other "
                                                 "candidates (counted in completion_tokens, as OpenAI counts a "
                                                 "reasoning model's hidden tokens).")


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = Field(0, description="Every token generated for the answer: with guidance, each "
                                                  "candidate of the search (the returned choices' tokens plus "
                                                  "completion_tokens_details.reasoning_tokens).")
    total_tokens: int = 0
    completion_tokens_details: CompletionTokensDetails | None = Field(
        None, description="Guided answers: how many of completion_tokens were not returned (null without guidance: "
                          "all were).")


class GuidanceInfo(OpenAIBaseModel):
    """How a guided answer was produced (iro extension on the response object)."""

    value: str
    versions: list[int]
    betas: list[float]
    mode: SearchMode
    w: int
    k: int
    l: int
    s: int | None = Field(None, description="dvts: independent subtrees.")
    pf_temperature: float | None = Field(
        None, description="pf: particles were resampled by softmax(chain score / pf_temperature) (the server's "
                          "setting without guidance.beta/betas; 1 with them, beta being the temperature).")
    chunk_until: list[str] | None = Field(None, description="Strings that ended a chunk early (step-aware chunks).")
    chunks: int = Field(description="Chunk sampling calls made to the engine.")
    candidates_generated: int
    candidates_scored: int
    steps: int = Field(0, description="Search steps (the most over the request's prompts).")
    tokens: int = Field(0, description="Tokens generated by the searches, every candidate counted (the budget's unit; "
                                       "summed over the request's prompts, like usage.completion_tokens).")
    budget_tokens: int | None = Field(None, description="The token budget each prompt's search ran under.")
    budget_from: Literal["budget_tokens", "reasoning_effort"] | None = Field(
        None, description="Where the budget came from: guidance.budget_tokens or the server's reasoning_effort table.")
    reasoning_effort: ReasoningEffort | None = None
    planned: list[str] = Field(default_factory=list, description="Search widths planned from the budget "
                                                                 "(not given by the request or the value).")
    deadline_ms: int | None = None
    elapsed_ms: float | None = Field(None, description="Search time (the longest over the request's prompts).")
    stopped_by: Literal["budget", "deadline", "max_steps"] | None = Field(
        None, description="What ended a search before every candidate finished (None: they all finished).")
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

    status: Literal["ok", "degraded"] = "ok"
    reason: str | None = Field(None, description="Why the server is degraded: it serves what it has loaded but cannot "
                                                 "read a registry (new versions wait until it can).")


class VersionInfo(OpenAIBaseModel):
    """`GET /version`."""

    version: str = Field(description="iro-serve version.")
    vllm: str | None = Field(None, description="vLLM version.")
    model: str | None = Field(None, description="Base model id (None while the engine starts).")


# ----------------------------------------------------------------------------- iro: scoring
class ScoreRequest(OpenAIRequestModel):
    """Score responses to one prompt with a value chain (iro extension: `POST /v1/score`)."""

    value: str = Field(description='"name" or "name@N".')
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat prompt (rendered with the chat "
                                                                         "template).")
    prompt: str | None = Field(None, description="Raw text prompt (instead of messages).")
    responses: list[str] = Field(..., min_length=1, max_length=MAX_SCORE_RESPONSES)

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
