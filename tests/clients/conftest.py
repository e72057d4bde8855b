"""Fixtures for the client tests: canned server answers and one driver per client flavour, so the
same test runs against `IroClient` and `AsyncIroClient` (both over `httpx.MockTransport`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from clients import AsyncIroClient, IroClient

BASE = "base-model"


def chat_body(text: str = "Hello!", *, model: str = BASE, guidance: dict | None = None, **extra) -> dict:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, **extra}
    if guidance is not None:
        body["guidance"] = guidance
    return body


def completion_body(text: str = " world", *, model: str = BASE) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}


def models_body(*ids: str) -> dict:
    ids = ids or (BASE,)
    return {"object": "list", "data": [{"id": i, "object": "model", "created": 1, "owned_by": "iro",
                                        "root": BASE, "parent": BASE if "+" in i else None} for i in ids]}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


GUIDANCE_INFO = {"value": "helpful", "versions": [1, 2], "betas": [1.0, 1.0], "mode": "cbs", "w": 2, "k": 2, "l": 4,
                 "chunks": 6, "candidates_generated": 24, "candidates_scored": 24, "score": 0.75, "scores": [0.75]}


def sse(*events: Any, done: bool = True) -> bytes:
    """An SSE body as the server writes it: `data: <json>` events, then `data: [DONE]`."""
    lines = [f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n" for e in events]
    return ("".join(lines) + ("data: [DONE]\n\n" if done else "")).encode()


def chat_chunk(content: str | None, *, finish: str | None = None, usage: dict | None = None,
               guidance: dict | None = None) -> dict:
    choices = [] if content is None and finish is None else [
        {"index": 0, "delta": {"content": content}, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": BASE, "choices": choices,
            "usage": usage, "guidance": guidance}


class Recorder:
    """A MockTransport handler that records requests and answers from a script or a function."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | list[httpx.Response | Exception]):
        self.requests: list[httpx.Request] = []
        self._answer = answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if callable(self._answer):
            return self._answer(request)
        item = self._answer.pop(0) if len(self._answer) > 1 else self._answer[0]
        if isinstance(item, Exception):
            raise item
        return item

    def json(self, i: int = -1) -> Any:
        return json.loads(self.requests[i].content)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


def routes(table: dict[str, Any]) -> Callable[[httpx.Request], httpx.Response]:
    """Answer by "METHOD /path": a JSON body (200) or an httpx.Response."""

    def answer(request: httpx.Request) -> httpx.Response:
        found = table.get(f"{request.method} {request.url.path}")
        if found is None:
            return httpx.Response(404, json=error_body("no route", code="not_found"))
        return found if isinstance(found, httpx.Response) else httpx.Response(200, json=found)

    return answer


class SyncDriver:
    """Runs client calls on `IroClient`."""

    flavour = "sync"

    def __init__(self, handler, **options):
        self.client = IroClient("http://iro.test", transport=httpx.MockTransport(handler), **options)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.client, method)(*args, **kwargs)

    def stream(self, method: str, *args, **kwargs) -> list:
        with getattr(self.client, method)(*args, stream=True, **kwargs) as stream:
            return list(stream)

    def generate_many(self, requests, **kwargs) -> list:
        return list(self.client.generate_many(requests, **kwargs))

    def fake_time(self) -> list[float]:
        """Sleeps are recorded instead of slept; the clock moves by what was slept."""
        slept: list[float] = []
        self.client._sleep = slept.append
        self.client._clock = lambda: sum(slept)
        return slept

    def close(self):
        self.client.close()


class AsyncDriver:
    """Runs client calls on `AsyncIroClient`, in one event loop kept for the driver's life."""

    flavour = "async"

    def __init__(self, handler, **options):
        self.runner = asyncio.Runner()
        self.client = AsyncIroClient("http://iro.test", transport=httpx.MockTransport(handler), **options)

    def call(self, method: str, *args, **kwargs):
        return self.runner.run(getattr(self.client, method)(*args, **kwargs))

    def stream(self, method: str, *args, **kwargs) -> list:
        async def collect():
            async with await getattr(self.client, method)(*args, stream=True, **kwargs) as stream:
                return [chunk async for chunk in stream]

        return self.runner.run(collect())

    def generate_many(self, requests, **kwargs) -> list:
        async def collect():
            return [item async for item in self.client.generate_many(requests, **kwargs)]

        return self.runner.run(collect())

    def fake_time(self) -> list[float]:
        """Sleeps are recorded instead of slept; the clock moves by what was slept."""
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        self.client._sleep = sleep
        self.client._clock = lambda: sum(slept)
        return slept

    def close(self):
        self.runner.run(self.client.aclose())
        self.runner.close()


@pytest.fixture(params=[SyncDriver, AsyncDriver], ids=["sync", "async"])
def make_client(request, monkeypatch):
    """`make_client(handler, **options)` -> a driver around a fresh sync or async client."""
    for name in ("IRO_BASE_URL", "IRO_API_KEY", "IRO_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    drivers = []

    def make(handler, **options):
        options.setdefault("retry_backoff", 0.001)
        driver = request.param(handler, **options)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()
