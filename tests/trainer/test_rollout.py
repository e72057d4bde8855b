"""The rollout job: input parsing, resumable output, records, and a kill -9 in the middle of a
real run against the server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from common.protocol import ChatCompletionRequest, CompletionRequest
from common.search_settings import SearchOverrides, SearchSettings
from trainer.rollout import (
    SAMPLING_KEYS, JsonlAppender, PromptItem, RolloutConfig, RolloutError, arun_rollout, parse_prompt_line, plan,
    read_prompts, read_records, scan_output,
)
from trainer.rollout_records import SEARCH_FIELDS

ROOT = Path(__file__).resolve().parents[2]
RECORD_KEYS = ["id", "prompt_id", "sample", "messages", "prompt_text", "prompt_token_ids", "response",
               "response_token_ids", "finish_reason", "policy", "sampling", "reward"]


# --------------------------------------------------------------------------- input
def test_plain_lines_chat_and_prompt(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"}]}) + "\n\n"
                    + json.dumps({"prompt": "Once upon a time", "temperature": 0.2}) + "\n")
    a, b = read_prompts(path)
    assert (a.id, a.messages, a.prompt) == ("a", [{"role": "user", "content": "Hi"}], None)
    assert (b.id, b.prompt, b.sampling) == ("3", "Once upon a time", {"temperature": 0.2})  # id = line number


def test_batch_file_lines(tmp_path):
    lines = [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-x", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello"}],
                  "max_completion_tokens": 12, "temperature": 0.3, "seed": 5, "n": 3, "top_p": 0.9}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-x", "prompt": "The sea is", "max_tokens": 7, "stop": ["\n"]}},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    chat, completion = read_prompts(path)
    assert chat.id == "req-1" and chat.messages[1]["content"] == "Hello" and chat.samples == 3
    assert chat.sampling == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 12, "seed": 5}
    assert completion.id == "req-2" and completion.prompt == "The sea is"
    assert completion.sampling == {"max_tokens": 7, "stop": ["\n"]} and completion.samples is None
    tasks = plan([chat, completion], RolloutConfig(samples_per_prompt=2, temperature=1.0, max_tokens=64, seed=1))
    assert [t.id for t in tasks] == ["req-1:0", "req-1:1", "req-1:2", "req-2:0", "req-2:1"]
    assert tasks[0].sampling["temperature"] == 0.3 and tasks[0].sampling["max_tokens"] == 12  # the body wins
    assert tasks[3].sampling["temperature"] == 1.0 and tasks[3].sampling["max_tokens"] == 7
    assert len({t.sampling["seed"] for t in tasks}) == 5  # one derived seed per sample


def test_a_line_may_set_every_sampling_field_of_the_request():
    """SAMPLING_KEYS comes from the one sampling type: a field both request kinds accept is taken from
    a line (min_p, repetition_penalty, ... were dropped silently before), and is a valid request field."""
    body = {"min_p": 0.1, "repetition_penalty": 1.2, "stop_token_ids": [7], "ignore_eos": True, "min_tokens": 2,
            "logit_bias": {"42": -5}, "top_k": 5, "presence_penalty": 0.5, "frequency_penalty": 0.1}
    item = parse_prompt_line({"prompt": "x", **body}, 1)
    assert item.sampling == body
    for request in (CompletionRequest(model="m", prompt="x", **body),
                    ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **body)):
        assert request.min_p == 0.1 and request.to_sampling().logit_bias == ((42, -5.0),)
    assert "logprobs" not in SAMPLING_KEYS and "stream" not in SAMPLING_KEYS and "max_tokens" in SAMPLING_KEYS


@pytest.mark.parametrize("line,message", [
    ({"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {"messages": []}}, "method"),
    ({"custom_id": "x", "url": "/v1/embeddings", "body": {"input": "a"}}, "url"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"prompt": "a"}}, "needs `messages`"),
    ({"custom_id": "x", "url": "/v1/chat/completions"}, "body"),
    ({"custom_id": "x", "body": {"prompt": "a", "stream": True}}, "stream"),
    ({"custom_id": "x", "body": {"prompt": "a", "n": 0}}, "`n`"),
    ({"messages": "hi"}, "messages"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),
    ({"text": "a"}, "exactly one"),
    ([1, 2], "JSON object"),
])
def test_bad_lines_name_the_line(line, message):
    with pytest.raises(RolloutError, match=message) as info:
        parse_prompt_line(line, 7, "in.jsonl")
    assert "in.jsonl:7" in str(info.value)


def test_duplicate_ids_and_bad_json(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(RolloutError, match="duplicate id 'a'"):
        read_prompts(path)
    path.write_text('{"id": "a", "prompt": "x"}\n{oops\n')
    with pytest.raises(RolloutError, match=r"in.jsonl:2: not JSON"):
        read_prompts(path)


def test_mode_without_value_is_refused():
    with pytest.raises(RolloutError, match="--value"):
        RolloutConfig(search=SearchOverrides(mode="cbs"))
    assert RolloutConfig(search=SearchOverrides()).guidance() is None  # nothing set: plain sampling
    bon = RolloutConfig(value="v@2", search=SearchOverrides(mode="bon", k=4))
    assert bon.guidance() == {"value": "v@2", "mode": "bon", "k": 4}
    assert RolloutConfig(value="v", search={"w": 2}).guidance() == {"value": "v", "w": 2}
    pinned = RolloutConfig(value="v", search=SearchSettings(w=2)).guidance()  # complete: every field sent
    assert {k: pinned[k] for k in ("mode", "w", "k", "l")} == {"mode": "cbs", "w": 2, "k": 4, "l": 8}
    with pytest.raises(RolloutError, match="w"):
        RolloutConfig(value="v", search={"w": 0})


# --------------------------------------------------------------------------- output
def test_torn_last_line_is_cut_off(tmp_path):
    out = tmp_path / "out.jsonl"
    with JsonlAppender(out) as sink:
        for i in range(3):
            sink.write({"id": f"p:{i}", "response": "é" * i})
    intact = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"id": "p:3", "respo')  # the process died in the middle of a write
    with pytest.raises(RolloutError, match="torn"):
        scan_output(out, repair=False)
    assert scan_output(out) == {"p:0", "p:1", "p:2"}
    assert out.read_bytes() == intact  # repaired in place: appending continues on a clean line
    with open(out, "ab") as f:
        f.write(b'{"id": "p:3", "not json"}\n')  # complete but garbage, still the last line
    assert scan_output(out) == {"p:0", "p:1", "p:2"} and out.read_bytes() == intact


def test_bad_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(RolloutError, match=r"out.jsonl:2"):
        scan_output(out)
    assert scan_output(tmp_path / "missing.jsonl") == set()


# --------------------------------------------------------------------------- the job, against a fake server
class FakeServer:
    """Answers chat/completion requests like iro-serve with return_token_ids (httpx.MockTransport)."""

    def __init__(self, fail_prompts: set[str] = frozenset(), status: int = 500):
        self.bodies: list[dict] = []
        self.fail_prompts = set(fail_prompts)
        self.status = status
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        if text in self.fail_prompts:
            return httpx.Response(self.status, json={"error": {"message": "boom", "type": "server_error"}})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        ids = [len(text), (body.get("seed") or 0) % 1000]
        guidance = None
        if body.get("guidance"):
            g = body["guidance"]
            guidance = {"value": g["value"].partition("@")[0], "versions": [1, 2], "betas": [1.0, 1.0],
                        "mode": g.get("mode", "cbs"), "w": g.get("w", 4), "k": g.get("k", 4), "l": g.get("l", 8),
                        "chunks": 3, "candidates_generated": 12, "candidates_scored": 12}
        usage = {"prompt_tokens": 3, "completion_tokens": 12 if guidance else 2, "total_tokens": 0}
        if "messages" in body:
            return httpx.Response(200, json={
                "model": body["model"], "prompt_token_ids": [1, 2, 3], "usage": usage, "guidance": guidance,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"re: {text}"},
                             "finish_reason": "stop", "token_ids": ids}]})
        return httpx.Response(200, json={
            "model": body["model"], "prompt_token_ids": [[4, 5]], "usage": usage, "guidance": guidance,
            "choices": [{"index": 0, "text": f" and {text}", "finish_reason": "length", "token_ids": ids}]})


def _run(items, out, config, fake):
    from clients import AsyncIroClient

    async def go():
        async with AsyncIroClient("http://fake", transport=httpx.MockTransport(fake), max_retries=0) as client:
            return await arun_rollout(items, out, config, client=client)

    return asyncio.run(go())


def _items(n: int) -> list[PromptItem]:
    return [PromptItem(f"q{i}", messages=[{"role": "user", "content": f"prompt {i}"}]) for i in range(n - 1)] + [
        PromptItem("c", prompt="raw text")]


def test_records_have_the_exact_format_and_resume(tmp_path):
    out, fake = tmp_path / "out.jsonl", FakeServer(fail_prompts={"prompt 2"})
    config = RolloutConfig(samples_per_prompt=3, concurrency=4, seed=7, max_tokens=20, progress=False)
    stats = _run(_items(5), out, config, fake)
    assert (stats.total, stats.written, stats.failed, stats.complete) == (15, 12, 3, False)
    assert fake.max_in_flight <= 4 and all(b["return_token_ids"] and b["model"] == "fake-model" for b in fake.bodies)

    records = read_records(out)
    chat = next(r for r in records if r["id"] == "q0:1")
    assert list(chat) == RECORD_KEYS
    assert chat["prompt_id"] == "q0" and chat["sample"] == 1 and chat["response"] == "re: prompt 0"
    assert chat["prompt_token_ids"] == [1, 2, 3] and chat["finish_reason"] == "stop" and chat["reward"] is None
    assert chat["prompt_text"] == "user: prompt 0"  # no tokenizer for this model: plain rendering
    assert chat["policy"] == {"model": "fake-model", "value": None, "versions": [], **dict.fromkeys(SEARCH_FIELDS)}
    assert {"mode", "w", "k", "l"} <= set(SEARCH_FIELDS)
    assert chat["sampling"]["temperature"] == 0.7 and chat["sampling"]["max_tokens"] == 20
    raw = next(r for r in records if r["id"] == "c:0")
    assert raw["prompt"] == "raw text" and "messages" not in raw and raw["prompt_token_ids"] == [4, 5]

    fake.fail_prompts.clear()  # the failures were transient: a re-run fills exactly the gaps
    stats = _run(_items(5), out, config, fake)
    assert (stats.skipped, stats.written, stats.complete) == (12, 3, True)
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) == len(set(ids)) == 15
    seeds = {r["id"]: r["sampling"]["seed"] for r in read_records(out)}
    stats = _run(_items(5), tmp_path / "again.jsonl", config, FakeServer())
    assert {r["id"]: r["sampling"]["seed"] for r in read_records(tmp_path / "again.jsonl")} == seeds


def test_guided_records_and_a_changed_job_is_refused(tmp_path):
    out, fake = tmp_path / "out.jsonl", FakeServer()
    config = RolloutConfig(value="review@2", search=SearchOverrides(mode="cbs", w=2, k=2, l=4), record_usage=True,
                           progress=False)
    _run(_items(2), out, config, fake)
    assert fake.bodies[-1]["guidance"] == {"value": "review@2", "mode": "cbs", "w": 2, "k": 2, "l": 4}
    record = read_records(out)[0]
    assert {k: record["policy"][k] for k in ("model", "value", "versions", "mode", "w", "k", "l")} == {
        "model": "fake-model", "value": "review", "versions": [1, 2], "mode": "cbs", "w": 2, "k": 2, "l": 4}
    assert record["usage"]["completion_tokens"] == 12
    with pytest.raises(RolloutError, match="made otherwise.*value"):
        _run(_items(3), out, RolloutConfig(progress=False), fake)
    with pytest.raises(RolloutError, match="made otherwise.*w: 2 there, 3 now"):  # another search pinned
        _run(_items(3), out, RolloutConfig(value="review", search=SearchOverrides(w=3), record_usage=True,
                                           progress=False), fake)
    _run(_items(3), out, RolloutConfig(value="review", search=SearchOverrides(k=2), record_usage=True,
                                       progress=False), fake)  # what it pins matches: resumed
    with pytest.raises(RolloutError, match="max_tokens"):
        _run(_items(3), out, RolloutConfig(value="review", max_tokens=99, progress=False), fake)


def test_authentication_errors_stop_the_job(tmp_path):
    from clients import AuthenticationError

    fake = FakeServer(fail_prompts={"prompt 0"}, status=401)
    with pytest.raises(AuthenticationError):
        _run(_items(3), tmp_path / "out.jsonl", RolloutConfig(concurrency=1, progress=False), fake)


# --------------------------------------------------------------------------- kill -9 against the real server
@pytest.mark.e2e
def test_rollout_survives_kill_9(server, tmp_path):
    lines = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me something about the number {i}."}]}
             for i in range(6)]
    lines.append({"custom_id": "batch-1", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "whatever", "prompt": "My favourite season is", "max_tokens": 8, "n": 2}})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "iro.cli", "rollout", str(prompts), "-o", str(out), "--server", server.url,
           "--api-key", server.api_key, "--samples-per-prompt", "4", "--concurrency", "2", "--max-tokens", "32",
           "--seed", "3", "--no-progress"]
    expected = 6 * 4 + 2

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.05)  # polling the output file for progress
    assert proc.poll() is None, "finished before it could be killed:\n" + proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    written = out.read_bytes().count(b"\n")
    assert 4 <= written < expected
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"id": "p5:3", "prompt_id": "p5", "sample": 3, "messages": [{"ro')

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{written} already there" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses: nothing torn
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == expected
    assert set(ids) == {f"p{i}:{j}" for i in range(6) for j in range(4)} | {"batch-1:0", "batch-1:1"}
    for r in records:
        assert list(r)[:3] == ["id", "prompt_id", "sample"] and r["reward"] is None
        assert r["response_token_ids"] and r["prompt_token_ids"] and r["finish_reason"] in ("stop", "length")
        assert r["policy"]["model"] == server.model_id and r["policy"]["value"] is None
    chat = next(r for r in records if r["prompt_id"] == "p0")
    assert chat["prompt_text"].startswith("<|im_start|>") and "number 0" in chat["prompt_text"]
    batch = [r for r in records if r["prompt_id"] == "batch-1"]
    assert all(r["prompt"] == "My favourite season is" and len(r["response_token_ids"]) <= 8 for r in batch)


def test_ray_backend_without_ray_says_how_to_install(tmp_path, monkeypatch):
    from trainer.rollout import run_rollout

    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray now fails, as when the extra is missing
    with pytest.raises(RolloutError, match=r"pip install 'iro-serve\[ray\]'"):
        run_rollout(_items(2), tmp_path / "out.jsonl", RolloutConfig(backend="ray", progress=False))
