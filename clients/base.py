"""What `IroClient` and `AsyncIroClient` share: everything but I/O.

URL and header building, request bodies from the server's own pydantic schemas, parsing answers
back into them, error mapping, SSE decoding and retry delays live here; the two subclasses in
`clients/client.py` only send requests and sleep (httpx `_client.py` style).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from common.version import __version__
from clients.errors import (
    APIStatusError, ConnectError, IroClientError, NotServingError, RateLimitError, ServiceUnavailableError,
    TimeoutError, TransportError, error_class, status_for_type,
)
from common.admin_protocol import (
    DeletedVersion, LoadRequest, PolicyList, PolicyStatus, RegistryEntryStatus, Unloaded, ValueList, ValueStatus,
)
from common.errors import ErrorInfo
from common.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, ChatMessage, CompletionRequest,
    CompletionResponse, CompletionStreamResponse, GuidanceParams, ModelList, ScoreRequest, ScoreResponse,
)

log = logging.getLogger("clients")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
Messages = Union[str, Iterable[Union[ChatMessage, Mapping[str, Any]]]]
Prompt = Union[str, list[str], list[int], list[list[int]]]
Guidance = Union[GuidanceParams, Mapping[str, Any], None]
#: One item of `generate_many`: a dict with `messages` (chat) or `prompt` (completion) plus any
#: keyword of `chat`/`complete` (model, guidance, max_tokens, ...), or a request model.
GenerationRequest = Union[Mapping[str, Any], ChatCompletionRequest, CompletionRequest]


@dataclass(frozen=True)
class Call:
    """One API call, built before any I/O: what to send and how to read the answer."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    admin: bool = False
    """Authenticate with the admin key (falls back to the API key, as the server does)."""
    retry: bool = True
    result: type[BaseModel] | None = None
    """Model of the JSON answer (None: return the decoded JSON as is)."""
    chunk: type[BaseModel] | None = None
    """Model of each SSE data event; set only for streaming calls."""


class SSEDecoder:
    """Incremental `text/event-stream` decoder: feed lines, get each event's data when it ends.

    >>> d = SSEDecoder(); [d.feed(line) for line in ['data: {"a": 1}', '', ': ping', 'data: [DONE]', '']]
    [None, '{"a": 1}', None, None, '[DONE]']
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:  # a blank line dispatches the event
            return self.flush()
        if line.startswith(":"):  # comment / keep-alive
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def _messages(messages: Messages) -> list[ChatMessage]:
    if isinstance(messages, str):
        return [ChatMessage(role="user", content=messages)]
    return [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(dict(m)) for m in messages]


def _guidance(guidance: Guidance) -> GuidanceParams | None:
    if guidance is None or isinstance(guidance, GuidanceParams):
        return guidance
    return GuidanceParams.model_validate(dict(guidance))


def _error_info(response: httpx.Response) -> ErrorInfo | None:
    try:
        error = response.json().get("error")
        return ErrorInfo.model_validate(error) if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None


def retry_after_seconds(response: httpx.Response, now: float | None = None) -> float | None:
    """The server's `Retry-After` (seconds or an HTTP date) in seconds, or None.

    >>> retry_after_seconds(httpx.Response(503, headers={"Retry-After": "2"}))
    2.0
    """
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0)


class BaseIroClient:
    """Configuration and all non-I/O logic of the iro clients.

    Args:
        base_url: server root (default `$IRO_BASE_URL` or http://127.0.0.1:8000); a trailing
            `/v1`, as given to OpenAI SDKs, is accepted and removed.
        api_key: bearer token for `/v1` routes (default `$IRO_API_KEY`).
        admin_key: bearer token for value admin routes (default `$IRO_ADMIN_KEY`, then `api_key`).
        model: model id used when a call gives none (default: the first id of `/v1/models`,
            the base model, asked once).
        timeout: seconds, or an `httpx.Timeout`; connecting is capped at 10 s.
        max_retries: retries after 429, recoverable 503 and connection errors.
        retry_backoff: first retry delay in seconds, doubled on each retry, with jitter.
        max_retry_delay: cap on any delay, including the server's `Retry-After`.
        headers: extra headers sent with every request.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, admin_key: str | None = None,
                 model: str | None = None, timeout: float | httpx.Timeout = 600.0, max_retries: int = 2,
                 retry_backoff: float = 0.5, max_retry_delay: float = 8.0,
                 headers: Mapping[str, str] | None = None) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        url = (base_url or os.environ.get("IRO_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api_key = api_key if api_key is not None else os.environ.get("IRO_API_KEY") or None
        self.admin_key = admin_key if admin_key is not None else os.environ.get("IRO_ADMIN_KEY") or None
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_retry_delay = max_retry_delay
        self.headers = {"User-Agent": f"iro-client/{__version__}", "Accept": "application/json",
                        **dict(headers or {})}
        self._model = model
        self._http: httpx.Client | httpx.AsyncClient  # set by the subclass
        self._clock = time.monotonic  # what waits measure their deadline with (tests replace it)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # ------------------------------------------------------------------ requests
    def _build_request(self, call: Call) -> httpx.Request:
        key = (self.admin_key or self.api_key) if call.admin else self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if call.chunk is not None:
            headers["Accept"] = "text/event-stream"
        return self._http.build_request(call.method, call.path, json=call.json, headers=headers)

    @staticmethod
    def _body(request: BaseModel) -> dict[str, Any]:
        return request.model_dump(mode="json", exclude_unset=True)

    def _chat_call(self, messages: Messages, *, model: str, guidance: Guidance = None, stream: bool = False,
                   **sampling: Any) -> Call:
        extra = {"guidance": _guidance(guidance)} if guidance is not None else {}
        body = ChatCompletionRequest(model=model, messages=_messages(messages), stream=stream, **extra, **sampling)
        return Call("POST", "/v1/chat/completions", json=self._body(body), result=ChatCompletionResponse,
                    chunk=ChatCompletionStreamResponse if stream else None)

    def _completion_call(self, prompt: Prompt, *, model: str, guidance: Guidance = None,
                         stream: bool = False, **sampling: Any) -> Call:
        extra = {"guidance": _guidance(guidance)} if guidance is not None else {}
        body = CompletionRequest(model=model, prompt=prompt, stream=stream, **extra, **sampling)
        return Call("POST", "/v1/completions", json=self._body(body), result=CompletionResponse,
                    chunk=CompletionStreamResponse if stream else None)

    def _score_call(self, value: str, responses: list[str], *, messages: Messages | None = None,
                    prompt: str | None = None) -> Call:
        where = {"messages": _messages(messages)} if messages is not None else {"prompt": prompt}
        body = ScoreRequest(value=value, responses=responses, **where)
        return Call("POST", "/v1/score", json=self._body(body), result=ScoreResponse)

    @staticmethod
    def _models_call() -> Call:
        return Call("GET", "/v1/models", result=ModelList)

    @staticmethod
    def _health_call() -> Call:
        return Call("GET", "/health", retry=False)

    # The watched registries (admin key): one route shape for values and policies.
    @staticmethod
    def _registry_call(method: str, kind: str, name: str | None = None, action: str = "", body: BaseModel | None = None,
                       result: type[BaseModel] | None = None) -> Call:
        """`kind` is "values" or "policies"; the answer is that kind's status unless `result` says."""
        path = f"/v1/{kind}" + (f"/{quote(name, safe='')}" if name is not None else "") + (f"/{action}" if action else "")
        if result is None:
            result = {"values": ValueStatus, "policies": PolicyStatus}[kind]
        return Call(method, path, json=body.model_dump(mode="json") if body else None, admin=True, result=result)

    def _values_call(self) -> Call:
        return self._registry_call("GET", "values", result=ValueList)

    def _value_status_call(self, name: str) -> Call:
        return self._registry_call("GET", "values", name)

    def _load_value_call(self, name: str, version: int | None) -> Call:
        return self._registry_call("POST", "values", name, "load", LoadRequest(version=version))

    def _rollback_value_call(self, name: str) -> Call:
        return self._registry_call("POST", "values", name, "rollback")

    def _unload_value_call(self, name: str) -> Call:
        return self._registry_call("DELETE", "values", name, result=Unloaded)

    def _policies_call(self) -> Call:
        return self._registry_call("GET", "policies", result=PolicyList)

    def _policy_status_call(self, name: str) -> Call:
        return self._registry_call("GET", "policies", name)

    def _load_policy_call(self, name: str, version: int | None) -> Call:
        return self._registry_call("POST", "policies", name, "load", LoadRequest(version=version))

    def _rollback_policy_call(self, name: str) -> Call:
        return self._registry_call("POST", "policies", name, "rollback")

    def _unload_policy_call(self, name: str) -> Call:
        return self._registry_call("DELETE", "policies", name, result=Unloaded)

    def _delete_policy_version_call(self, name: str, version: int) -> Call:
        return self._registry_call("DELETE", "policies", name, f"versions/{int(version)}", result=DeletedVersion)

    def _serving(self, call: Call, status: RegistryEntryStatus, version: int, deadline: float) -> bool:
        """Whether a wait for `version` is over: True once it serves; raises `NotServingError` once
        the server refused it or `deadline` (of `_clock`) passed; False: ask again."""
        if status.serving_version == version:
            return True
        refused = next((r for r in status.refused if r.version == version), None)
        request = self._build_request(call)
        if refused is not None:
            raise NotServingError(f"the server refused {status.name}@{version}: {refused.reason}", request=request,
                                  status=status, refused=refused)
        if self._clock() >= deadline:
            raise NotServingError(f"{status.name}@{version} is not served before the deadline (serving "
                                  f"{status.serving_version}, CURRENT {status.current_on_disk})", request=request,
                                  status=status)
        return False

    @staticmethod
    def _split_request(request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """("chat" | "complete", keyword arguments) for one `generate_many` item."""
        if isinstance(request, BaseModel):
            request = request.model_dump(exclude_unset=True)
        kwargs = dict(request)
        if kwargs.pop("stream", False):
            raise ValueError("generate_many returns whole responses; remove `stream` from the request")
        if "messages" in kwargs:
            return "chat", kwargs
        if "prompt" in kwargs:
            return "complete", kwargs
        raise ValueError("each generate_many request needs `messages` (chat) or `prompt` (completion)")

    # ------------------------------------------------------------------ answers
    @staticmethod
    def _pick_model(models: ModelList) -> str:
        """The base model: the first listed model without a parent (aligned ids have one)."""
        if not models.data:
            raise ValueError("the server lists no models; pass model=")
        return next((card.id for card in models.data if card.parent is None), models.data[0].id)

    @staticmethod
    def _parse(call: Call, response: httpx.Response) -> Any:
        data = response.json()
        return call.result.model_validate(data) if call.result is not None else data

    @staticmethod
    def _status_error(response: httpx.Response) -> APIStatusError:
        """The typed error for a (read) error response."""
        body = _error_info(response)
        message = body.message if body else (response.text[:500] or response.reason_phrase)
        return error_class(response.status_code)(message, request=response.request, response=response, body=body)

    @staticmethod
    def _transport_error(exc: httpx.TransportError, request: httpx.Request) -> TransportError:
        if isinstance(exc, httpx.TimeoutException):
            cls: type[TransportError] = TimeoutError
        elif isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
            cls = ConnectError
        else:
            cls = TransportError
        error = cls(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, request=request)
        error.__cause__ = exc
        return error

    @staticmethod
    def _decode_event(call: Call, data: str, response: httpx.Response) -> BaseModel | None:
        """One SSE data payload as a chunk model; None at `[DONE]`; raises error events."""
        if data.strip() == "[DONE]":
            return None
        payload = json.loads(data)
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            body = ErrorInfo.model_validate(payload["error"])
            status = status_for_type(body.type, body.code)
            raise error_class(status)(body.message, request=response.request, response=response, body=body,
                                      status_code=status)
        assert call.chunk is not None
        return call.chunk.model_validate(payload)

    # ------------------------------------------------------------------ retries
    def _retry_delay(self, attempt: int, error: IroClientError) -> float | None:
        """Seconds to wait before retry `attempt + 1`, or None when `error` must be raised.

        Retried: 429, 503 (unless the engine is dead), connection errors and connect timeouts.
        The delay is the server's Retry-After if it sent one, else exponential backoff with
        jitter; both are capped at `max_retry_delay`.
        """
        if attempt >= self.max_retries or not self._retryable(error):
            return None
        retry_after = retry_after_seconds(error.response) if isinstance(error, APIStatusError) else None
        if retry_after is not None:
            delay = min(retry_after, self.max_retry_delay)
        else:
            delay = min(self.retry_backoff * 2**attempt, self.max_retry_delay) * (1 - 0.25 * random.random())
        log.info("retrying %s %s in %.2fs (%d/%d) after: %s", error.request.method, error.request.url.path, delay,
                 attempt + 1, self.max_retries, error)
        return delay

    @staticmethod
    def _retryable(error: IroClientError) -> bool:
        if isinstance(error, (RateLimitError, ConnectError)):
            return True
        if isinstance(error, ServiceUnavailableError):
            return error.code != "engine_dead"
        # A connect or pool timeout means the request was never sent; a read timeout may have cost
        # the server a whole generation, so it is not repeated.
        return isinstance(error, TimeoutError) and isinstance(error.__cause__, (httpx.ConnectTimeout,
                                                                                  httpx.PoolTimeout))
