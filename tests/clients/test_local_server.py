"""The clients against a real (tiny) HTTP server on 127.0.0.1: real sockets, no mock transport."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clients import AsyncIroClient, IroClient, errors
from tests.clients.conftest import chat_body, chat_chunk, error_body, models_body


class FlakyServer(ThreadingHTTPServer):
    """Answers the first `failures` requests with 503 + Retry-After, then like iro-serve."""

    daemon_threads = True

    def __init__(self, failures: int):
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.failures = failures
        self.seen: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length)) if length else None
        with self.server.lock:
            self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
            failing = len(self.server.seen) <= self.server.failures
        if failing:
            body = error_body("value swapping", type="service_unavailable", code="value_swapping")
            return self._reply(503, json.dumps(body).encode(), headers={"Retry-After": "0"})
        if self.path == "/v1/models":
            return self._reply(200, json.dumps(models_body()).encode())
        if self.path == "/v1/chat/completions" and payload and payload.get("stream"):
            events = [chat_chunk("Hel"), chat_chunk("lo", finish="stop")]
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return self._reply(200, body.encode(), content_type="text/event-stream")
        if self.path == "/v1/chat/completions":
            return self._reply(200, json.dumps(chat_body("Hello")).encode())
        return self._reply(404, json.dumps(error_body("no route", code="not_found")).encode())

    do_GET = do_POST = do_DELETE = _handle


@pytest.fixture
def flaky():
    servers = []

    def start(failures: int) -> FlakyServer:
        srv = FlakyServer(failures)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_sync_client_retries_against_a_local_server_that_returns_503_then_200(flaky):
    srv = flaky(failures=1)
    with IroClient(srv.url, api_key="k", max_retries=2) as client:
        answer = client.chat("Hi", model="base-model", max_tokens=2)
        assert answer.choices[0].message.content == "Hello"
        assert [s[:2] for s in srv.seen] == [("POST", "/v1/chat/completions")] * 2
        assert {s[2] for s in srv.seen} == {"Bearer k"}
        chunks = list(client.chat("Hi", stream=True))  # default model from /v1/models
        assert "".join(c.choices[0].delta.content for c in chunks) == "Hello"


async def test_async_client_retries_against_a_local_server_that_returns_503_then_200(flaky):
    srv = flaky(failures=2)
    async with AsyncIroClient(srv.url, max_retries=2) as client:
        models = await client.models()
        assert models.data[0].id == "base-model" and len(srv.seen) == 3
        stream = await client.chat("Hi", stream=True)
        assert "".join([c.choices[0].delta.content async for c in stream]) == "Hello"


def test_local_server_gives_up_after_max_retries(flaky):
    srv = flaky(failures=10)
    with IroClient(srv.url, max_retries=1) as client, pytest.raises(errors.ServiceUnavailableError) as info:
        client.models()
    assert len(srv.seen) == 2 and info.value.code == "value_swapping"
    assert info.value.response.headers["Retry-After"] == "0"


def test_refused_connection_is_a_connect_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with IroClient(f"http://127.0.0.1:{port}", max_retries=1, retry_backoff=0.01) as client:
        with pytest.raises(errors.ConnectError) as info:
            client.health()
    assert info.value.request.url.port == port
