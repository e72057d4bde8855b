"""A dedicated server with a tiny admission queue (IRO_MAX_QUEUE=2), CORS and prompt logging on,
shared by this module's tests (one ~40 s start): overload answers 429 fast and recovers; CORS
headers appear for the configured origin only; prompt logging can be turned on. The last test
kills its vLLM engine process: /health turns 503, requests fail fast, the server exits with 3.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server
from tests.reliability.conftest import engine_core_pid, metric, wait_until

pytestmark = pytest.mark.e2e
ORIGIN = "https://app.example"
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-sequence tokens: requests run for max_tokens


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("small"), env={
        "IRO_MAX_QUEUE": "2", "IRO_CORS_ORIGINS": f'["{ORIGIN}"]', "IRO_LOG_PROMPTS": "true",
        "IRO_MAX_MODEL_LEN": "1024"})
    yield srv
    if srv.proc.poll() is None:
        stop_server(srv)


def chat(server, content: str, max_tokens: int, **extra) -> dict:
    return {"model": server.model_id, "max_tokens": max_tokens, "logit_bias": NO_EOS,
            "messages": [{"role": "user", "content": content}], **extra}


async def test_overload_answers_429_fast_then_recovers(small):
    headers = {"Authorization": f"Bearer {small.api_key}"}
    async with httpx.AsyncClient(base_url=small.url, headers=headers, timeout=120) as http:
        # two long requests take both admission slots
        long = [asyncio.create_task(http.post("/v1/chat/completions", json=chat(small, f"Tell a story {i}", 600)))
                for i in range(2)]
        await asyncio.to_thread(wait_until, lambda: metric(small.url, "iro_engine_requests_in_flight"),
                                lambda v: v >= 2, 30)

        async def timed(body):
            start = time.monotonic()
            response = await http.post("/v1/chat/completions", json=body)
            return response, time.monotonic() - start

        flood = await asyncio.gather(*[timed(chat(small, f"Flood {i}", 8, stream=bool(i % 2))) for i in range(12)])
        assert not any(t.done() for t in long), "the long requests ended early; the flood proved nothing"
        statuses = [r.status_code for r, _ in flood]
        assert statuses == [429] * 12, statuses
        for response, seconds in flood:
            assert seconds < 10, seconds  # turned away, not queued behind the long requests (which still run)
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
            assert response.json()["error"]["type"] == "rate_limit_error"
        for task in long:  # hang up: the engine requests are aborted and the slots freed
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
    assert metric(small.url, "iro_requests_rejected_total") == 12
    assert metric(small.url, "iro_requests_total", endpoint="/v1/chat/completions", status="500") == 0

    def one_request() -> int:
        with small.http() as http:
            return http.post("/v1/chat/completions", json=chat(small, "Hello again", 4)).status_code
    assert wait_until(one_request, lambda s: s == 200, timeout=60) == 200  # recovered


def test_cors_headers_only_for_the_configured_origin(small, server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = httpx.options(small.url + "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    with small.http() as http:
        assert http.get("/v1/models", headers={"Origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN
        other = http.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    # the shared server has no IRO_CORS_ORIGINS: no CORS headers at all
    r = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code in (400, 404, 405) and "access-control-allow-origin" not in r.headers
    with server.http() as http:
        assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": ORIGIN}).headers


def test_prompt_logging_when_asked_for(small):
    """Positive control of test_access's "prompts are not logged": this server opts in, and it shows."""
    marker = f"canary-{os.getpid()}-{time.time_ns()}"
    with small.http() as http:
        assert http.post("/v1/chat/completions", json=chat(small, marker, 2)).status_code == 200
    assert wait_until(lambda: marker in small.log_path.read_text(errors="replace"), bool, 10)


async def test_engine_death_fails_fast_and_exits_nonzero(small):
    headers = {"Authorization": f"Bearer {small.api_key}"}
    async with httpx.AsyncClient(base_url=small.url, headers=headers, timeout=30) as http:
        in_flight = asyncio.create_task(http.post("/v1/chat/completions", json=chat(small, "A long story", 600)))
        await asyncio.to_thread(wait_until, lambda: metric(small.url, "iro_engine_requests_in_flight"),
                                lambda v: v >= 1, 30)
        core = engine_core_pid(small.proc.pid)
        assert core is not None
        os.kill(core, signal.SIGKILL)
        killed = time.monotonic()

        async def health() -> int | None:
            try:
                return (await http.get("/health", timeout=5)).status_code
            except httpx.TransportError:  # the server already went away
                return None

        status = await health()
        while status == 200 and time.monotonic() - killed < 30:
            await asyncio.sleep(0.05)  # bounded polling of /health
            status = await health()
        assert status in (503, None), status
        try:  # a new request right away: 503 (or refused if the server is already gone), never a hang
            start = time.monotonic()
            r = await http.post("/v1/chat/completions", json=chat(small, "hello", 4), timeout=10)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
            assert time.monotonic() - start < 10  # answered, not hung
        except httpx.TransportError:
            pass
        try:
            r = await asyncio.wait_for(in_flight, 30)
            assert r.status_code == 503, r.text
        except httpx.TransportError:
            pass  # connection closed by the exiting server: also a prompt failure
    code = await asyncio.to_thread(small.proc.wait, 60)
    assert code == 3, code
    assert time.monotonic() - killed < 60
    log = small.log_path.read_text(errors="replace")
    assert "engine died" in log
    assert "Exception in ASGI application" not in log  # every failure was an answered, shaped 503
