"""A real `iro serve` started with flags (not environment variables): `/health` answers 503
while the engine starts, a client with retries rides over that 503 and over a 429 from the
queue bound, and the flags' limits hold. Its own server (the session's is already up)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bench import server as bench_server
from clients import IroClient, errors
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

KEY = "flag-key"
HI = [{"role": "user", "content": "hi"}]


class Recording(httpx.HTTPTransport):
    """A real transport that remembers the status of every answer (and when one is 429)."""

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


@pytest.fixture(scope="module")
def starting(tmp_path_factory):
    """`iro serve --api-key ... --max-n 2 --max-guided-candidates 4 --max-queue 1`, not yet ready, with
    a published value; the environment asks for other limits, which the flags must override."""
    from common.model_store import resolve_model
    from valuefn.loader import init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry

    work = tmp_path_factory.mktemp("flags")
    init_value(Registry(work / "values"), "flagged", resolve_model(None), ValueModelConfig(num_layers=2, lora_r=4))
    port = bench_server.free_port()
    srv = bench_server.start(work, cwd=ROOT, ready=False, env={"IRO_MAX_N": "16", "IRO_MAX_QUEUE": "64"}, args=[
        "--port", str(port), "--api-key", KEY, "--max-n", "2", "--max-guided-candidates", "4", "--max-queue", "1",
        "--enforce-eager", "--max-num-batched-tokens", "256", "--kv-cache-gib", "2"])
    srv.url = f"http://127.0.0.1:{port}"  # the flag's port, not the environment's
    yield srv
    srv.stop()


def test_health_is_503_while_starting_and_a_retrying_client_gets_its_answer(starting):
    seen: list[int | str] = []
    deadline = time.monotonic() + 300
    while 503 not in seen and time.monotonic() < deadline:
        assert starting.proc.poll() is None, starting.log_path.read_text(errors="replace")[-3000:]
        try:
            r = httpx.get(starting.url + "/health", timeout=5)
            seen.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "engine_starting"
        except httpx.TransportError:
            seen.append("no connection yet")
        time.sleep(0.1)  # polling the start, bounded by the deadline
    assert 503 in seen and 200 not in seen, seen  # the API is up before the engine
    transport = Recording()
    with IroClient(starting.url, api_key=KEY, max_retries=1000, max_retry_delay=1.0, transport=transport) as client:
        answer = client.chat("Say hi.", max_tokens=4)  # sent while the engine is still starting
    assert answer.choices[0].message.content is not None
    assert 503 in transport.statuses and transport.statuses[-1] == 200  # retried over the start
    assert httpx.get(starting.url + "/health").status_code == 200


def wait_ready(srv, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)  # polling the start, bounded by the deadline
    raise AssertionError(srv.log_path.read_text(errors="replace")[-3000:])


def test_the_flags_set_the_limits(starting):
    wait_ready(starting)
    with httpx.Client(base_url=starting.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
        assert httpx.get(starting.url + "/v1/models").status_code == 401  # --api-key
        model = http.get("/v1/models").json()["data"][0]["id"]
        r = http.post("/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 2, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # --max-n 2 (the environment said 16)
        guided = {"model": model, "messages": HI, "max_tokens": 4, "guidance": {"value": "flagged", "w": 2, "k": 3}}
        r = http.post("/v1/chat/completions", json=guided)
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_candidates"  # --max-guided-candidates 4
        guided["guidance"]["k"] = 2
        r = http.post("/v1/chat/completions", json=guided)
        assert r.status_code == 200 and r.json()["guidance"]["value"] == "flagged"


def test_a_retrying_client_rides_over_the_queue_bound(starting):
    """--max-queue 1: while one request runs, the next is turned away with 429; the client retries
    and is answered once the slot is free."""
    wait_ready(starting)
    long = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 1000, "stream": True}
    with httpx.Client(base_url=starting.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=long) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # the slot is taken
            transport, result = Recording(), {}

            def ask():
                with IroClient(starting.url, api_key=KEY, max_retries=1000, max_retry_delay=0.5,
                               transport=transport) as client:
                    try:
                        result["answer"] = client.chat("Say hi.", model=long["model"], max_tokens=2)
                    except errors.IroClientError as exc:  # pragma: no cover - reported below
                        result["error"] = exc

            thread = threading.Thread(target=ask)
            thread.start()
            assert transport.saw_429.wait(60), transport.statuses
        # leaving the stream hangs up: the long request is aborted and its slot freed
        thread.join(120)
    assert not thread.is_alive() and "error" not in result, result
    assert result["answer"].choices[0].message.content is not None
    assert 429 in transport.statuses and transport.statuses[-1] == 200
