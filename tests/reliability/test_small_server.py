"""A dedicated server started with `iro serve` flags (not environment variables, which ask for
other limits): a tiny admission queue (--max-queue 2), --max-n 2, --max-guided-candidates 4, CORS
and prompt logging on, shared by this module's tests (one ~40 s start). While it starts, /health
answers 503 and a client with retries rides over that to its answer; overload answers 429 fast
and recovers, and a retrying client rides over the 429 too; CORS headers appear for the
configured origin only; prompt logging can be turned on. The last test kills its vLLM engine
process: /health turns 503, requests fail fast, the server exits with 3.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from clients import IroClient
from tests.conftest import start_server, stop_server, wait_ready
from tests.reliability.conftest import engine_core_pid, metric, wait_until

pytestmark = pytest.mark.e2e
ORIGIN = "https://app.example"
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-sequence tokens: requests run for max_tokens


class Recording(httpx.HTTPTransport):
    """A real transport that remembers the status of every answer."""

    def __init__(self):
        super().__init__()
        self.statuses: list[int] = []
        self.saw_429 = threading.Event()

    def handle_request(self, request):
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        if response.status_code == 429:
            self.saw_429.set()
        return response


def ask_with_retries(url: str, api_key: str, result: dict, **chat) -> threading.Thread:
    """`IroClient.chat` with generous retries, in a thread; fills `result` (answer or error, statuses)."""
    def run():
        transport = Recording()
        result["transport"] = transport
        with IroClient(url, api_key=api_key, max_retries=1000, max_retry_delay=0.5, transport=transport) as client:
            try:
                result["answer"] = client.chat("Say hi.", max_tokens=2, **chat)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from common.model_store import resolve_model
    from valuefn.loader import init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry

    work = tmp_path_factory.mktemp("small")
    init_value(Registry(work / "values"), "flagged", resolve_model(None), ValueModelConfig(num_layers=2, lora_r=4))
    srv = start_server(work, ready=False, env={"IRO_MAX_QUEUE": "64", "IRO_MAX_N": "16"}, args=[
        "--max-queue", "2", "--max-n", "2", "--max-guided-candidates", "4", "--cors-origins", f'["{ORIGIN}"]',
        "--log-prompts", "--max-model-len", "1024"])
    srv.during_start = {}  # a client that asks while the engine starts (before /health is 200)
    thread = ask_with_retries(srv.url, srv.api_key, srv.during_start)
    wait_ready(srv)
    thread.join(120)
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


def test_health_is_503_while_starting_and_a_retrying_client_gets_its_answer(small):
    seen = small.process.health_seen
    assert (503, "engine_starting") in seen and seen[-1] == (200, None), seen  # the API is up before the engine
    result = small.during_start
    assert "error" not in result and result["answer"].choices[0].message.content is not None, result
    statuses = result["transport"].statuses
    assert 503 in statuses and statuses[-1] == 200, statuses  # retried over the start


def test_the_flags_set_the_limits(small):
    hi = [{"role": "user", "content": "hi"}]
    with small.http() as http:
        r = http.post("/v1/chat/completions", json={"model": small.model_id, "messages": hi, "max_tokens": 2, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # --max-n 2 (the environment said 16)
        guided = {"model": small.model_id, "messages": hi, "max_tokens": 4,
                  "guidance": {"value": "flagged", "w": 2, "k": 3}}
        r = http.post("/v1/chat/completions", json=guided)
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_candidates"  # --max-guided-candidates 4
        guided["guidance"]["k"] = 2
        r = http.post("/v1/chat/completions", json=guided)
        assert r.status_code == 200 and r.json()["guidance"]["value"] == "flagged"


async def test_a_retrying_client_rides_over_the_queue_bound(small):
    """--max-queue 2 (the environment said 64): with two requests running the next gets 429; the
    client retries and is answered once a slot is free."""
    headers = {"Authorization": f"Bearer {small.api_key}"}
    async with httpx.AsyncClient(base_url=small.url, headers=headers, timeout=60) as http:
        long = [asyncio.create_task(http.post("/v1/chat/completions", json=chat(small, f"A long story {i}", 600)))
                for i in range(2)]
        await asyncio.to_thread(wait_until, lambda: metric(small.url, "iro_engine_requests_in_flight"),
                                lambda v: v >= 2, 30)
        result = {}
        thread = ask_with_retries(small.url, small.api_key, result, model=small.model_id)
        assert await asyncio.to_thread(lambda: wait_until(lambda: result.get("transport"), bool, 10).saw_429.wait(60))
        for task in long:  # hang up: the slots are freed
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
    await asyncio.to_thread(thread.join, 120)
    assert "error" not in result and result["answer"].choices[0].message.content is not None, result
    statuses = result["transport"].statuses
    assert 429 in statuses and statuses[-1] == 200, statuses


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
