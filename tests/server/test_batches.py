"""Files, batches and stored completions against a scripted engine and a real database, SQLite
and PostgreSQL (`database_url`; no vLLM): upload checks, the runner's output and error files, cancel, resume without repeats,
stored completions listed, filtered, updated and deleted."""

from __future__ import annotations

import io
import json

import pytest

from server.store.startup import open_store
from tests.server.conftest import ScriptedEngine, make_client


def jsonl(lines) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_line(custom_id: str, content: str = "hi", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3, **body}}


def make_stack(tmp_path, database_url: str | None):
    engine = ScriptedEngine()
    client = make_client(engine, data_dir=tmp_path, max_file_bytes=4096, database_url=database_url)
    runner = open_store(client.app, client.app.state.settings)
    assert runner is not None, client.app.state.store_error
    client.app.state.serving.stored = client.app.state.stored
    yield client, runner, engine
    client.app.state.database.close()


@pytest.fixture
def stack(tmp_path, database_url):
    """On SQLite and on PostgreSQL."""
    yield from make_stack(tmp_path, database_url)


@pytest.fixture
def sqlite_stack(tmp_path):
    """Request checks that do not depend on the database: on the default (SQLite) only."""
    yield from make_stack(tmp_path, None)


def upload(client, data: bytes, purpose: str = "batch"):
    return client.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(data), "application/jsonl")},
                       data={"purpose": purpose})


def test_upload_list_retrieve_content_delete(stack):
    client, _, _ = stack
    data = jsonl([chat_line("a"), chat_line("b")])
    r = upload(client, data)
    assert r.status_code == 200, r.text
    f = r.json()
    assert (f["object"], f["purpose"], f["bytes"], f["filename"]) == ("file", "batch", len(data), "in.jsonl")
    assert client.get(f"/v1/files/{f['id']}").json()["id"] == f["id"]
    assert client.get(f"/v1/files/{f['id']}/content").content == data
    assert [x["id"] for x in client.get("/v1/files").json()["data"]] == [f["id"]]
    assert client.delete(f"/v1/files/{f['id']}").json() == {"id": f["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{f['id']}").status_code == 404


@pytest.mark.parametrize("data, needle", [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\nnot json\n',
     "line 2 is not valid JSON"),
    (jsonl([chat_line("a"), {"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {}}]),
     "line 2: method"),
    (jsonl([chat_line("a"), chat_line("a")]), "line 2: custom_id 'a' appears twice"),
    (jsonl([{**chat_line("a"), "body": {"messages": []}}]), "line 1: body.model is required"),
    (b"\n", "holds no request lines"),
])
def test_a_malformed_batch_file_is_refused_naming_the_line(sqlite_stack, data, needle):
    client, _, _ = sqlite_stack
    r = upload(client, data)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["param"] == "file"
    assert client.get("/v1/files").json()["data"] == []


def test_upload_limits_and_fields(sqlite_stack):
    client, _, _ = sqlite_stack
    r = upload(client, jsonl([chat_line(str(i), "x" * 200) for i in range(30)]))
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    r = upload(client, jsonl([chat_line("a")]), purpose="fine-tune")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = client.post("/v1/files", files={"file": ("x", b"{}")}, data={"purpose": "batch", "expires_after": "1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "expires_after"


async def test_a_batch_runs_to_output_and_error_files_in_input_order(stack):
    client, runner, _ = stack
    lines = [chat_line("a"), chat_line("b", stream=True), chat_line("c", bogus=1), chat_line("d", content="yo"),
             {**chat_line("e"), "body": {**chat_line("e")["body"], "model": "nope"}}]
    file_id = upload(client, jsonl(lines)).json()["id"]
    r = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h", "metadata": {"job": "t"}})
    assert r.status_code == 200, r.text
    batch = r.json()
    assert batch["status"] == "validating" and batch["metadata"] == {"job": "t"}
    assert await runner.run_once()
    batch = client.get(f"/v1/batches/{batch['id']}").json()
    assert batch["status"] == "completed" and batch["completed_at"] >= batch["in_progress_at"]
    assert batch["request_counts"] == {"completed": 2, "failed": 3, "total": 5}
    out = [json.loads(x) for x in client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "d"]
    assert out[0]["response"]["status_code"] == 200
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "abc"
    errors = {json.loads(x)["custom_id"]: json.loads(x)
              for x in client.get(f"/v1/files/{batch['error_file_id']}/content").text.splitlines()}
    assert list(errors) == ["b", "c", "e"]
    assert errors["b"]["response"]["body"]["error"]["param"] == "stream"
    assert errors["c"]["response"]["body"]["error"]["param"] == "bogus"
    assert errors["e"]["response"]["status_code"] == 404
    assert batch["usage"]["output_tokens"] == 6
    assert client.get("/v1/batches").json()["data"][0]["id"] == batch["id"]
    assert client.get(f"/v1/files/{batch['output_file_id']}").json()["purpose"] == "batch_output"


async def test_batch_usage_says_how_many_output_tokens_guided_lines_did_not_return(sqlite_stack):
    from server.guided import GuidedGenerator
    from server.openai.serving import OpenAIServing
    from tests.server.conftest import OneValue
    from tests.server.test_search_guided import _ChunkEngine, _Scorer

    client, runner, _ = sqlite_stack
    engine, values = _ChunkEngine(), OneValue(w=2, k=4, l=4)
    client.app.state.serving = OpenAIServing(engine, max_n=4, values=values,
                                             guided=GuidedGenerator(engine, _Scorer(), values))
    batch = create_batch(client, [chat_line("plain"), chat_line("guided", model="tiny+v", max_tokens=8, seed=1)])
    assert await runner.run_once()
    batch = client.get(f"/v1/batches/{batch['id']}").json()
    bodies = {o["custom_id"]: o["response"]["body"] for o in output_lines(client, batch["output_file_id"])}
    hidden = bodies["guided"]["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert hidden > 0 and bodies["plain"]["usage"]["completion_tokens_details"] is None
    assert batch["usage"]["output_tokens"] == sum(b["usage"]["completion_tokens"] for b in bodies.values())
    assert batch["usage"]["output_tokens_details"] == {"reasoning_tokens": hidden}


async def test_resume_skips_lines_already_answered(stack):
    client, runner, engine = stack
    from server.store.db import batch_results

    file_id = upload(client, jsonl([chat_line(c, content=c) for c in "abcd"])).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"}).json()
    client.app.state.database.write_sync(lambda c: c.execute(batch_results.insert().values(
        batch_id=batch["id"], custom_id="b", line=2, ok=True, result={"custom_id": "b", "from": "before"})))
    assert await runner.run_once()
    prompts = [bytes(ids).decode() for ids, _ in engine.requests]
    assert sorted(p.split(">")[1][0] for p in prompts) == ["a", "c", "d"]  # b was not asked again
    output_id = client.get(f"/v1/batches/{batch['id']}").json()["output_file_id"]
    out = [json.loads(x) for x in client.get(f"/v1/files/{output_id}/content").text.splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b", "c", "d"] and out[1]["from"] == "before"


def create_batch(client, lines) -> dict:
    file_id = upload(client, jsonl(lines)).json()["id"]
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"}).json()


def output_lines(client, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.get(f"/v1/files/{file_id}/content").text.splitlines()] if file_id else []


def assert_expired(client, batch_id: str, answered: list[str], expired: list[str]) -> None:
    """OpenAI's expiry: status expired, answered lines in the output file, the rest in the error
    file with code batch_expired (and counted as failed)."""
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "expired" and batch["expired_at"] >= batch["expires_at"]
    assert batch["request_counts"] == {"completed": len(answered), "failed": len(expired),
                                       "total": len(answered) + len(expired)}
    assert [o["custom_id"] for o in output_lines(client, batch["output_file_id"])] == answered
    errors = output_lines(client, batch["error_file_id"])
    assert [e["custom_id"] for e in errors] == expired
    for e in errors:
        assert e["response"] is None and e["error"]["code"] == "batch_expired" and e["error"]["message"]


async def test_a_batch_past_its_window_expires_keeping_what_was_answered(stack):
    client, runner, engine = stack
    from server.store.db import batch_results, batches

    batch = create_batch(client, [chat_line(c, content=c) for c in "abcd"])
    line_a = {"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}

    def answered_then_late(conn):  # a was answered, then the server was down past the window
        conn.execute(batch_results.insert().values(batch_id=batch["id"], custom_id="a", line=1, ok=True,
                                                   result=line_a))
        conn.execute(batches.update().where(batches.c.id == batch["id"]).values(
            status="in_progress", in_progress_at=batch["created_at"], expires_at=batch["created_at"] - 1))

    client.app.state.database.write_sync(answered_then_late)
    assert await runner.run_once()
    assert engine.requests == []  # nothing runs after the window
    assert_expired(client, batch["id"], answered=["a"], expired=["b", "c", "d"])


async def test_the_window_passing_mid_batch_stops_it_at_once(stack):
    from server.batches.runner import BatchRunner

    client, _, engine = stack
    batch = create_batch(client, [chat_line(c, content=c) for c in "abcd"])
    late = batch["expires_at"] + 1
    clock = lambda: late if len(engine.requests) >= 2 else batch["created_at"]  # noqa: E731 (the window ends after b)
    runner = BatchRunner(client.app.state.database, client.app.state.files, lambda: client.app.state.serving,
                         owner="test:1", concurrency=1, clock=clock)
    assert await runner.run_once()
    assert len(engine.requests) == 2
    assert_expired(client, batch["id"], answered=["a", "b"], expired=["c", "d"])
    assert client.get(f"/v1/batches/{batch['id']}").json()["expired_at"] == late


async def test_cancel_before_it_runs(stack):
    client, runner, engine = stack
    file_id = upload(client, jsonl([chat_line("a")])).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"}).json()
    assert client.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "cancelling"
    assert client.delete(f"/v1/files/{file_id}").status_code == 409  # input of an unfinished batch
    assert await runner.run_once()
    done = client.get(f"/v1/batches/{batch['id']}").json()
    assert done["status"] == "cancelled" and done["cancelled_at"] and engine.requests == []
    assert client.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "cancelled"


async def test_lines_of_another_endpoint_fail_the_batch(stack):
    client, runner, _ = stack
    file_id = upload(client, jsonl([chat_line("a")])).json()["id"]
    batch = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                             "completion_window": "24h"}).json()
    assert await runner.run_once()
    failed = client.get(f"/v1/batches/{batch['id']}").json()
    assert failed["status"] == "failed" and failed["errors"]["data"][0]["line"] == 1


def test_batch_create_refusals(sqlite_stack):
    client, _, _ = sqlite_stack
    base = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert client.post("/v1/batches", json={**base, "input_file_id": "file-x"}).status_code == 404
    file_id = upload(client, jsonl([chat_line("a")])).json()["id"]
    r = client.post("/v1/batches", json={**base, "input_file_id": file_id, "completion_window": "1h"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion_window"
    r = client.post("/v1/batches", json={**base, "input_file_id": file_id, "metadata": {"k" * 65: "v"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


# ----------------------------------------------------------------------------- stored completions
def chat(client, **kw):
    return client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hello"}], **kw})


def test_stored_completions_list_filter_update_delete(stack):
    client, _, _ = stack
    ids = [chat(client, store=True, metadata={"task": t, "n": str(i)}).json()["id"] for i, t in enumerate("xyx")]
    assert chat(client).status_code == 200  # not stored
    listed = client.get("/v1/chat/completions").json()
    assert [c["id"] for c in listed["data"]] == ids and listed["has_more"] is False
    x = client.get("/v1/chat/completions", params={"metadata[task]": "x"}).json()["data"]
    assert [c["id"] for c in x] == [ids[0], ids[2]] and x[0]["metadata"] == {"task": "x", "n": "0"}
    page = client.get("/v1/chat/completions", params={"limit": 1, "after": ids[0]}).json()
    assert [c["id"] for c in page["data"]] == [ids[1]] and page["has_more"] is True
    assert [c["id"] for c in client.get("/v1/chat/completions", params={"order": "desc"}).json()["data"]] == ids[::-1]
    updated = client.post(f"/v1/chat/completions/{ids[1]}", json={"metadata": {"task": "x"}}).json()
    assert updated["metadata"] == {"task": "x"}
    assert len(client.get("/v1/chat/completions", params={"metadata[task]": "x"}).json()["data"]) == 3
    msgs = client.get(f"/v1/chat/completions/{ids[0]}/messages").json()["data"]
    assert msgs == [{"id": f"{ids[0]}-0", "role": "user", "content": "hello", "name": None, "content_parts": None}]
    assert client.delete(f"/v1/chat/completions/{ids[0]}").json()["deleted"] is True
    assert client.get(f"/v1/chat/completions/{ids[0]}").status_code == 404
    assert client.delete("/v1/chat/completions", params={"metadata[n]": "2"}).json()["deleted"] == 1
    assert [c["id"] for c in client.get("/v1/chat/completions").json()["data"]] == [ids[1]]
    assert client.delete("/v1/chat/completions").status_code == 400  # no filter: refused
    assert client.get("/v1/chat/completions", params={"colour": "red"}).json()["error"]["param"] == "colour"


def test_stored_completions_deleted_by_metadata_filter_match_every_pair(stack):
    client, _, _ = stack
    a, b, c = (chat(client, store=True, metadata=m).json()["id"] for m in (
        {"task": "x", "split": "a"}, {"task": "x", "split": "b"}, {"task": "y", "split": "a"}))
    r = client.delete("/v1/chat/completions", params={"metadata[task]": "x", "metadata[split]": "a"})
    assert r.json() == {"object": "chat.completion.deleted.list", "deleted": 1}
    assert [x["id"] for x in client.get("/v1/chat/completions").json()["data"]] == [b, c]
    assert client.delete("/v1/chat/completions", params={"model": "other"}).json()["deleted"] == 0
    assert client.delete("/v1/chat/completions", params={"model": "tiny"}).json()["deleted"] == 2
    assert client.get(f"/v1/chat/completions/{a}").status_code == 404


def test_a_stored_record_keeps_token_ids_and_policy(stack):
    client, _, _ = stack
    cid = chat(client, store=True).json()["id"]
    [row] = client.app.state.stored.records_sync()
    assert row.id == cid and row.prompt_token_ids == list(b"<user>hello\n<assistant>")
    assert row.completion_token_ids == [list(b"abcd")]
    assert row.policy == {"base": "tiny", "value": None, "adapter": None}
    got = client.get(f"/v1/chat/completions/{cid}").json()
    assert got["prompt_token_ids"] == row.prompt_token_ids and got["choices"][0]["token_ids"] == list(b"abcd")
    assert got["policy"]["base"] == "tiny" and got["request"]["messages"][0]["content"] == "hello"
    assert got["prompt_text"] == "<user>hello\n<assistant>"


def test_store_refusals(sqlite_stack, tmp_path):
    client, _, _ = sqlite_stack
    r = chat(client, metadata={"a": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    r = chat(client, store=True, stream=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "store"
    r = chat(client, store=True, metadata={str(i): "v" for i in range(17)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


def test_store_everything_stores_unless_told_not_to(tmp_path):
    client = make_client(ScriptedEngine(), data_dir=tmp_path, store_everything=True)
    open_store(client.app, client.app.state.settings)
    serving = client.app.state.serving
    serving.stored, serving.store_everything = client.app.state.stored, True
    kept = chat(client).json()["id"]
    chat(client, store=False)
    assert [c["id"] for c in client.get("/v1/chat/completions").json()["data"]] == [kept]


def test_a_corrupt_database_leaves_plain_traffic_served(tmp_path):
    (tmp_path / "iro.db").write_bytes(b"this is not a database" * 100)
    client = make_client(ScriptedEngine(), data_dir=tmp_path)
    assert open_store(client.app, client.app.state.settings) is None
    client.app.state.serving.store_error = client.app.state.store_error
    assert chat(client).status_code == 200
    health = client.get("/health").json()
    assert health["status"] == "degraded" and "database cannot be opened" in health["reason"]
    for r in (client.get("/v1/files"), client.get("/v1/batches"), client.get("/v1/chat/completions"),
              chat(client, store=True)):
        assert r.status_code == 503 and "file is not a database" in r.json()["error"]["message"], r.text


def test_text_with_a_nul_character_is_stored_and_given_back_whole(stack):
    client, _, _ = stack  # PostgreSQL text cannot hold U+0000; JSON can, escaped
    r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "store": True,
                                                   "metadata": {"k": "a\x00b\\0"},
                                                   "messages": [{"role": "user", "content": "nul\x00here"}]})
    assert r.status_code == 200, r.text
    got = client.get(f"/v1/chat/completions/{r.json()['id']}").json()
    assert got["prompt_text"] == "<user>nul\x00here\n<assistant>" and got["metadata"] == {"k": "a\x00b\\0"}
    assert got["request"]["messages"][0]["content"] == "nul\x00here"
    assert [c["id"] for c in client.get("/v1/chat/completions", params={"metadata[k]": "a\x00b\\0"}).json()["data"]] == [
        r.json()["id"]]
    data = jsonl([chat_line("nul\x00id", content="x\x00y")])
    f = client.post("/v1/files", files={"file": ("in\x00.jsonl", io.BytesIO(data), "application/jsonl")},
                    data={"purpose": "batch"})
    assert f.status_code == 200, f.text
    assert client.get(f"/v1/files/{f.json()['id']}/content").content == data


async def test_two_replicas_on_one_database_answer_each_line_once(stack, tmp_path):
    import asyncio

    from server.batches.runner import BatchRunner

    client, runner, engine = stack
    other = BatchRunner(client.app.state.database, client.app.state.files, lambda: client.app.state.serving,
                        owner="other-replica:1", concurrency=2)
    ids = []
    for n in range(3):
        file_id = upload(client, jsonl([chat_line(f"{n}-{c}", content=c) for c in "abcd"])).json()["id"]
        ids.append(client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                    "completion_window": "24h"}).json()["id"])

    async def drain(r):
        ran = 0
        while await r.run_once():
            ran += 1
        return ran

    assert sum(await asyncio.gather(drain(runner), drain(other))) == 3  # each batch claimed by one replica
    for batch_id in ids:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 4
    assert len(engine.requests) == 12  # no line asked twice


def test_the_document_declares_the_upload_and_the_list_filters(sqlite_stack):
    client, _, _ = sqlite_stack  # what the fuzz (tests/reliability/test_fuzz.py) generates requests from
    paths = client.get("/openapi.json").json()["paths"]
    upload_schema = paths["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload_schema["required"] == ["file", "purpose"]
    assert upload_schema["properties"]["file"]["format"] == "binary"
    listed = {p["name"]: p for p in paths["/v1/chat/completions"]["get"]["parameters"]}
    assert set(listed) == {"after", "limit", "order", "model", "metadata"}
    assert listed["metadata"]["style"] == "deepObject"
    assert {p["name"] for p in paths["/v1/chat/completions"]["delete"]["parameters"]} == {"model", "metadata"}
    for path in ("/v1/files", "/v1/batches", "/v1/chat/completions"):
        assert "404" in paths[path]["get"]["responses"]  # an unknown `after`
    assert "429" in paths["/v1/files"]["post"]["responses"] and "429" in paths["/v1/batches"]["post"]["responses"]


def test_one_line_while_interactive_requests_run_and_for_a_cooldown_after():
    from types import SimpleNamespace

    from server.batches.runner import BatchRunner

    now = [100.0]
    serving = SimpleNamespace(_admitted=0)
    runner = BatchRunner(None, None, lambda: serving, owner="test:1", concurrency=4, interactive_cooldown=1.0,
                         monotonic=lambda: now[0])
    assert runner._capacity() == 4  # no interactive traffic yet
    serving._admitted = 2
    assert runner._capacity() == 1
    serving._admitted = 0  # the gap between two back-to-back interactive requests: still one line
    now[0] += 0.5
    assert runner._capacity() == 1
    now[0] += 0.6  # a second of quiet: the batch takes its whole concurrency again
    assert runner._capacity() == 4
    assert BatchRunner(None, None, lambda: None, owner="test:1")._capacity() == 0  # the engine is starting


def test_a_batch_line_runs_at_low_priority_and_an_interactive_request_does_not():
    import asyncio
    from types import SimpleNamespace

    from server.batches.protocol import BatchInputLine
    from server.batches.runner import BatchRunner
    from server.errors import InvalidRequestError
    from server.priority import LOW_PRIORITY

    seen = []

    async def create_chat_completion(request, api_key_name=None):
        seen.append(LOW_PRIORITY.get())  # what a guided search in this line would yield to
        raise InvalidRequestError("stop here", param="model")

    serving = SimpleNamespace(_admitted=0, engine_check=lambda: None, create_chat_completion=create_chat_completion)
    runner = BatchRunner(None, None, lambda: serving, owner="test:1", max_preemptions=3)
    line = BatchInputLine(custom_id="a", method="POST", url="/v1/chat/completions",
                          body={"model": "m", "messages": [{"role": "user", "content": "hi"}]})

    async def go():
        await asyncio.create_task(runner._call(line, "default"))  # a line's own task, as _answer_lines starts it
        return LOW_PRIORITY.get()

    assert asyncio.run(go()) is None  # the runner's (and an interactive request's) context is untouched
    assert seen == [runner.watch] and runner.watch.max_preemptions == 3  # --batch-max-preemptions
