"""A client hangs up in the middle of a guided (CBS) stream: the search stops, its chunk requests
are aborted in vLLM, and no further chunks are generated."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.e2e.test_guided import iro_values_init, wait_serving
from tests.reliability.conftest import metric, wait_until

pytestmark = pytest.mark.e2e
NAME = "hangup"
TEXT = re.compile(r'"(content|text)":"[^"]')  # an event carrying some text


def steady(read, seconds: float) -> list[float]:
    """Samples of `read()` over a window (an observation, not a wait for something)."""
    samples, end = [read()], time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.25)
        samples.append(read())
    return samples


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_guided_stream_disconnect_stops_the_search(server, endpoint):
    version = iro_values_init(server, NAME)
    wait_serving(server, NAME, version)
    in_flight = lambda: metric(server.url, "iro_engine_requests_in_flight")  # noqa: E731
    chunks = lambda: metric(server.url, "iro_guided_chunks_total")  # noqa: E731
    assert wait_until(in_flight, lambda v: v == 0, 30) == 0
    body = {"model": f"{server.model_id}+{NAME}", "max_tokens": 1500, "stream": True,
            "guidance": {"w": 2, "k": 2, "l": 4}}
    if endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "Write a very long story."}]
    else:
        path, body["prompt"] = "/v1/completions", "Chapter one. It was a dark and stormy night, and"
    before = chunks()
    with server.http() as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            texts = 0
            for line in response.iter_lines():  # a few pieces of final text, then hang up
                if line.startswith("data: {") and TEXT.search(line):
                    texts += 1
                if texts >= 2:
                    break
            assert texts >= 2
            assert chunks() > before  # the search was running
    assert wait_until(in_flight, lambda v: v == 0, 10) == 0, "chunk requests were not aborted"
    stopped = chunks()
    assert set(steady(chunks, 2.0)) == {stopped}, "the search kept sampling chunks after the client left"
    assert stopped - before < 1500 / 4 * 2, "the search ran to the end instead of stopping"
    with server.http() as http:  # and the server is fine
        r = http.post("/v1/completions", json={"model": f"{server.model_id}+{NAME}", "prompt": "Hi", "max_tokens": 4,
                                               "guidance": {"w": 2, "k": 2, "l": 2}})
        assert r.status_code == 200 and r.json()["guidance"]["chunks"] >= 1
    httpx.get(server.url + "/health").raise_for_status()
