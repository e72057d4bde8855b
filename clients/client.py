"""`IroClient` (sync) and `AsyncIroClient`: the I/O halves of `BaseIroClient`.

The two classes mirror each other method for method and line for line; everything that is not
sending, reading or sleeping lives in `clients/base.py`.

    >>> from clients import IroClient
    >>> with IroClient("http://127.0.0.1:8000", api_key="sk-...") as client:   # doctest: +SKIP
    ...     answer = client.chat("Write a haiku about tea.", guidance={"value": "helpful"}, max_tokens=64)
    ...     print(answer.choices[0].message.content, answer.guidance)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Union

import httpx

from clients.base import BaseIroClient, Call, GenerationRequest, Guidance, Messages, Prompt
from clients.errors import IroClientError
from clients.streaming import AsyncStream, Stream
from common.admin_protocol import DeletedVersion, PolicyList, PolicyStatus, Unloaded, ValueList, ValueStatus
from common.protocol import (
    ChatCompletionResponse, ChatCompletionStreamResponse, CompletionResponse, CompletionStreamResponse, ModelList, ScoreResponse,
)

Generation = Union[ChatCompletionResponse, CompletionResponse]
ChatChunk = ChatCompletionStreamResponse
CompletionChunk = CompletionStreamResponse


class IroClient(BaseIroClient):
    """Synchronous client. Options: see `BaseIroClient`; `transport=` replaces httpx's transport
    (e.g. `httpx.MockTransport` in tests)."""

    def __init__(self, base_url: str | None = None, *, transport: httpx.BaseTransport | None = None,
                 **options: Any) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                  transport=transport)
        self._sleep = time.sleep  # retry delays and waits (tests replace it)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IroClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ I/O core
    def _send(self, call: Call) -> httpx.Response:
        """Send `call` (retrying as `_retry_delay` says) and return its successful response."""
        attempt = 0
        while True:
            request = self._build_request(call)
            try:
                response = self._http.send(request, stream=call.chunk is not None)
            except httpx.TransportError as exc:
                error: IroClientError = self._transport_error(exc, request)
            else:
                if response.is_success:
                    return response
                response.read()
                response.close()
                error = self._status_error(response)
            delay = self._retry_delay(attempt, error) if call.retry else None
            if delay is None:
                raise error
            self._sleep(delay)
            attempt += 1

    def _request(self, call: Call) -> Any:
        response = self._send(call)
        if call.chunk is not None:
            return Stream(self, call, response)
        return self._parse(call, response)

    def _default_model(self) -> str:
        if self._model is None:
            self._model = self._pick_model(self.models())
        return self._model

    # ------------------------------------------------------------------ OpenAI API
    def models(self) -> ModelList:
        """`GET /v1/models`: the base model, then one `<base>+<value>` id per loaded value."""
        return self._request(self._models_call())

    def chat(self, messages: Messages, *, model: str | None = None, guidance: Guidance = None,
             stream: bool = False, **sampling: Any) -> ChatCompletionResponse | Stream[ChatChunk]:
        """`POST /v1/chat/completions`. `messages` may be one user message as a string; `guidance`
        (dict or `GuidanceParams`) asks for value-guided decoding; `sampling` takes any other
        request field (max_tokens, temperature, n, seed, stop, ...). With `stream=True` returns a
        `Stream` of chunks."""
        model = model or self._default_model()
        call = self._chat_call(messages, model=model, guidance=guidance, stream=stream, **sampling)
        return self._request(call)

    def complete(self, prompt: Prompt, *, model: str | None = None, guidance: Guidance = None,
                 stream: bool = False, **sampling: Any) -> CompletionResponse | Stream[CompletionChunk]:
        """`POST /v1/completions`; arguments as for `chat`."""
        model = model or self._default_model()
        call = self._completion_call(prompt, model=model, guidance=guidance, stream=stream, **sampling)
        return self._request(call)

    def score(self, value: str, responses: list[str], *, messages: Messages | None = None,
              prompt: str | None = None) -> ScoreResponse:
        """`POST /v1/score`: chain scores (and raw values) of `responses` to one chat or text prompt."""
        return self._request(self._score_call(value, responses, messages=messages, prompt=prompt))

    def health(self) -> dict[str, Any]:
        """`GET /health` (not retried): `{"status": "ok"}`, or ServiceUnavailableError while starting."""
        return self._request(self._health_call())

    # ------------------------------------------------------------------ value admin (admin key)
    def values(self) -> ValueList:
        """`GET /v1/values`: every value function, its serving version and what is on disk."""
        return self._request(self._values_call())

    def value(self, name: str) -> ValueStatus:
        """`GET /v1/values/{name}`: one value function's status."""
        return self._request(self._value_status_call(name))

    def load_value(self, name: str, version: int | None = None) -> ValueStatus:
        """Load and pin `version` of value `name` (the watcher keeps it until CURRENT changes); with
        no version, serve the registry's CURRENT and follow it again (unpin)."""
        return self._request(self._load_value_call(name, version))

    def rollback_value(self, name: str) -> ValueStatus:
        """Serve the version before the one serving now."""
        return self._request(self._rollback_value_call(name))

    def unload_value(self, name: str) -> Unloaded:
        """Stop serving value `name` (its files stay in the registry) until it is loaded again."""
        return self._request(self._unload_value_call(name))

    def wait_value(self, name: str, version: int, *, timeout: float = 60.0, poll_interval: float = 0.25) -> ValueStatus:
        """Poll until value `name` serves `version`; `NotServingError` once the server refused it
        or after `timeout` seconds."""
        return self._wait(self._value_status_call(name), version, timeout, poll_interval)

    # ------------------------------------------------------------------ policy admin (admin key)
    def policies(self) -> PolicyList:
        """`GET /v1/policies`: every policy adapter, its serving version and what is on disk."""
        return self._request(self._policies_call())

    def policy(self, name: str) -> PolicyStatus:
        """`GET /v1/policies/{name}`: one policy's status."""
        return self._request(self._policy_status_call(name))

    def load_policy(self, name: str, version: int | None = None) -> PolicyStatus:
        """Load and pin `version` of policy `name` (the watcher keeps it until CURRENT changes); with
        no version, serve the registry's CURRENT and follow it again (unpin)."""
        return self._request(self._load_policy_call(name, version))

    def rollback_policy(self, name: str) -> PolicyStatus:
        """Serve the newest version before CURRENT that verifies, and point CURRENT at it."""
        return self._request(self._rollback_policy_call(name))

    def unload_policy(self, name: str) -> Unloaded:
        """Stop serving policy `name` (its files stay in the registry) until it is loaded again."""
        return self._request(self._unload_policy_call(name))

    def delete_policy_version(self, name: str, version: int) -> DeletedVersion:
        """Remove one version of policy `name` from the registry (not the serving one, nor CURRENT)."""
        return self._request(self._delete_policy_version_call(name, version))

    def wait_policy(self, name: str, version: int, *, timeout: float = 60.0,
                    poll_interval: float = 0.25) -> PolicyStatus:
        """Poll until policy `name` serves `version`; `NotServingError` once the server refused it
        or after `timeout` seconds."""
        return self._wait(self._policy_status_call(name), version, timeout, poll_interval)

    def _wait(self, call: Call, version: int, timeout: float, poll_interval: float) -> Any:
        deadline = self._clock() + timeout
        while not self._serving(call, status := self._request(call), version, deadline):
            self._sleep(poll_interval)  # polling the server's state against a deadline
        return status

    # ------------------------------------------------------------------ batch rollouts
    def _generate_one(self, request: GenerationRequest) -> Generation:
        kind, kwargs = self._split_request(request)
        return self.chat(**kwargs) if kind == "chat" else self.complete(**kwargs)

    def generate_many(self, requests: Iterable[GenerationRequest], *, concurrency: int = 8,
                      return_exceptions: bool = False) -> Iterator[tuple[int, Generation | IroClientError]]:
        """Run many chat/completion requests, at most `concurrency` at once (threads), and yield
        `(index, response)` as each finishes. `requests` is read lazily. With
        `return_exceptions`, a failed request yields `(index, error)` instead of raising.

            for i, answer in client.generate_many({"prompt": p} for p in prompts):
                ...
        """
        items = enumerate(requests)
        running: dict[Future, int] = {}
        pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="iro-generate")

        def submit_next() -> None:
            for index, request in items:
                running[pool.submit(self._generate_one, request)] = index
                return

        try:
            for _ in range(max(1, concurrency)):
                submit_next()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    submit_next()
                    error = future.exception()
                    if error is not None and not (return_exceptions and isinstance(error, IroClientError)):
                        raise error
                    yield index, future.result() if error is None else error
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class AsyncIroClient(BaseIroClient):
    """Asynchronous client. Options: see `BaseIroClient`; `transport=` replaces httpx's transport
    (e.g. `httpx.MockTransport` in tests)."""

    def __init__(self, base_url: str | None = None, *, transport: httpx.AsyncBaseTransport | None = None,
                 **options: Any) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                       transport=transport)
        self._sleep = asyncio.sleep  # retry delays and waits (tests replace it)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncIroClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ I/O core
    async def _send(self, call: Call) -> httpx.Response:
        """Send `call` (retrying as `_retry_delay` says) and return its successful response."""
        attempt = 0
        while True:
            request = self._build_request(call)
            try:
                response = await self._http.send(request, stream=call.chunk is not None)
            except httpx.TransportError as exc:
                error: IroClientError = self._transport_error(exc, request)
            else:
                if response.is_success:
                    return response
                await response.aread()
                await response.aclose()
                error = self._status_error(response)
            delay = self._retry_delay(attempt, error) if call.retry else None
            if delay is None:
                raise error
            await self._sleep(delay)
            attempt += 1

    async def _request(self, call: Call) -> Any:
        response = await self._send(call)
        if call.chunk is not None:
            return AsyncStream(self, call, response)
        return self._parse(call, response)

    async def _default_model(self) -> str:
        if self._model is None:
            self._model = self._pick_model(await self.models())
        return self._model

    # ------------------------------------------------------------------ OpenAI API
    async def models(self) -> ModelList:
        """`GET /v1/models`: the base model, then one `<base>+<value>` id per loaded value."""
        return await self._request(self._models_call())

    async def chat(self, messages: Messages, *, model: str | None = None, guidance: Guidance = None,
                   stream: bool = False, **sampling: Any) -> ChatCompletionResponse | AsyncStream[ChatChunk]:
        """`POST /v1/chat/completions`; see `IroClient.chat`. With `stream=True` returns an
        `AsyncStream` of chunks."""
        model = model or await self._default_model()
        call = self._chat_call(messages, model=model, guidance=guidance, stream=stream, **sampling)
        return await self._request(call)

    async def complete(self, prompt: Prompt, *, model: str | None = None, guidance: Guidance = None,
                       stream: bool = False, **sampling: Any) -> CompletionResponse | AsyncStream[CompletionChunk]:
        """`POST /v1/completions`; arguments as for `chat`."""
        model = model or await self._default_model()
        call = self._completion_call(prompt, model=model, guidance=guidance, stream=stream, **sampling)
        return await self._request(call)

    async def score(self, value: str, responses: list[str], *, messages: Messages | None = None,
                    prompt: str | None = None) -> ScoreResponse:
        """`POST /v1/score`: chain scores (and raw values) of `responses` to one chat or text prompt."""
        return await self._request(self._score_call(value, responses, messages=messages, prompt=prompt))

    async def health(self) -> dict[str, Any]:
        """`GET /health` (not retried): `{"status": "ok"}`, or ServiceUnavailableError while starting."""
        return await self._request(self._health_call())

    # ------------------------------------------------------------------ value admin (admin key)
    async def values(self) -> ValueList:
        """`GET /v1/values`: every value function, its serving version and what is on disk."""
        return await self._request(self._values_call())

    async def value(self, name: str) -> ValueStatus:
        """`GET /v1/values/{name}`: one value function's status."""
        return await self._request(self._value_status_call(name))

    async def load_value(self, name: str, version: int | None = None) -> ValueStatus:
        """Load and pin `version` of value `name` (the watcher keeps it until CURRENT changes); with
        no version, serve the registry's CURRENT and follow it again (unpin)."""
        return await self._request(self._load_value_call(name, version))

    async def rollback_value(self, name: str) -> ValueStatus:
        """Serve the version before the one serving now."""
        return await self._request(self._rollback_value_call(name))

    async def unload_value(self, name: str) -> Unloaded:
        """Stop serving value `name` (its files stay in the registry) until it is loaded again."""
        return await self._request(self._unload_value_call(name))

    async def wait_value(self, name: str, version: int, *, timeout: float = 60.0,
                         poll_interval: float = 0.25) -> ValueStatus:
        """Poll until value `name` serves `version`; `NotServingError` once the server refused it
        or after `timeout` seconds."""
        return await self._wait(self._value_status_call(name), version, timeout, poll_interval)

    # ------------------------------------------------------------------ policy admin (admin key)
    async def policies(self) -> PolicyList:
        """`GET /v1/policies`: every policy adapter, its serving version and what is on disk."""
        return await self._request(self._policies_call())

    async def policy(self, name: str) -> PolicyStatus:
        """`GET /v1/policies/{name}`: one policy's status."""
        return await self._request(self._policy_status_call(name))

    async def load_policy(self, name: str, version: int | None = None) -> PolicyStatus:
        """Load and pin `version` of policy `name` (the watcher keeps it until CURRENT changes); with
        no version, serve the registry's CURRENT and follow it again (unpin)."""
        return await self._request(self._load_policy_call(name, version))

    async def rollback_policy(self, name: str) -> PolicyStatus:
        """Serve the newest version before CURRENT that verifies, and point CURRENT at it."""
        return await self._request(self._rollback_policy_call(name))

    async def unload_policy(self, name: str) -> Unloaded:
        """Stop serving policy `name` (its files stay in the registry) until it is loaded again."""
        return await self._request(self._unload_policy_call(name))

    async def delete_policy_version(self, name: str, version: int) -> DeletedVersion:
        """Remove one version of policy `name` from the registry (not the serving one, nor CURRENT)."""
        return await self._request(self._delete_policy_version_call(name, version))

    async def wait_policy(self, name: str, version: int, *, timeout: float = 60.0,
                          poll_interval: float = 0.25) -> PolicyStatus:
        """Poll until policy `name` serves `version`; `NotServingError` once the server refused it
        or after `timeout` seconds."""
        return await self._wait(self._policy_status_call(name), version, timeout, poll_interval)

    async def _wait(self, call: Call, version: int, timeout: float, poll_interval: float) -> Any:
        deadline = self._clock() + timeout
        while not self._serving(call, status := await self._request(call), version, deadline):
            await self._sleep(poll_interval)  # polling the server's state against a deadline
        return status

    # ------------------------------------------------------------------ batch rollouts
    async def _generate_one(self, request: GenerationRequest) -> Generation:
        kind, kwargs = self._split_request(request)
        return await (self.chat(**kwargs) if kind == "chat" else self.complete(**kwargs))

    async def generate_many(self, requests: Iterable[GenerationRequest], *, concurrency: int = 8,
                            return_exceptions: bool = False) -> AsyncIterator[tuple[int, Generation | IroClientError]]:
        """Run many chat/completion requests, at most `concurrency` at once (asyncio tasks), and
        yield `(index, response)` as each finishes. `requests` is read lazily. With
        `return_exceptions`, a failed request yields `(index, error)` instead of raising.

            async for i, answer in client.generate_many({"prompt": p} for p in prompts):
                ...
        """
        items = enumerate(requests)
        finished: asyncio.Queue = asyncio.Queue()

        async def worker() -> None:
            try:
                for index, request in items:  # one shared iterator: each worker takes the next item
                    try:
                        result: Any = await self._generate_one(request)
                    except Exception as exc:  # handed to the consumer, which decides
                        result = exc
                    await finished.put((index, result))
            except Exception as exc:  # reading `requests` itself failed
                await finished.put((-1, exc))
            finally:
                finished.put_nowait(None)

        workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
        try:
            running = len(workers)
            while running:
                item = await finished.get()
                if item is None:
                    running -= 1
                    continue
                index, result = item
                if isinstance(result, Exception) and not (return_exceptions and isinstance(result, IroClientError)):
                    raise result
                yield index, result
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
