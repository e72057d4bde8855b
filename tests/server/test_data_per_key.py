"""Files, batches and stored completions per API key: each key sees and touches only its own (404
for another key's), and each has quotas (files kept, bytes kept, batches not yet ended) answered
with a 429 naming the quota and its limit. Scripted engine, real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import io

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from server.app import build_app
from server.openai.serving import OpenAIServing
from server.settings import ServerSettings
from server.store.startup import open_store
from tests.server.conftest import API_KEY, ScriptedEngine
from tests.server.test_batches import chat, chat_line, jsonl

ALICE = "alice-key"


def make_stack(tmp_path, database_url=None, **settings):
    """An app with the store open; `settings` may turn keys off (`api_key=None`)."""
    settings = {"api_key": API_KEY, "api_keys": {"alice": ALICE}, "max_n": 4, "data_dir": tmp_path,
                "database_url": database_url, **settings}
    app = build_app(ServerSettings(**settings))
    engine = ScriptedEngine()
    app.state.serving = OpenAIServing(engine, max_n=4, max_queue=8)
    runner = open_store(app, app.state.settings)
    assert runner is not None, app.state.store_error
    app.state.serving.stored = app.state.stored
    return TestClient(app), runner


@pytest.fixture
def stack(tmp_path, database_url):
    client, runner = make_stack(tmp_path, database_url, max_files_per_key=3, max_active_batches_per_key=1)
    yield client, runner
    client.app.state.database.close()


def as_key(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def upload(client, key, lines=None):
    return client.post("/v1/files", headers=as_key(key), data={"purpose": "batch"},
                       files={"file": ("in.jsonl", io.BytesIO(jsonl(lines or [chat_line("a")])))})


def create_batch(client, key, file_id):
    return client.post("/v1/batches", headers=as_key(key), json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})


async def test_a_key_neither_sees_nor_touches_another_keys_files_batches_and_completions(stack):
    client, runner = stack
    file_id = upload(client, API_KEY).json()["id"]
    batch_id = create_batch(client, API_KEY, file_id).json()["id"]
    client.headers.update(as_key(API_KEY))
    stored_id = chat(client, store=True, metadata={"task": "t"}).json()["id"]
    alice = as_key(ALICE)
    for r in (client.get(f"/v1/files/{file_id}", headers=alice),
              client.get(f"/v1/files/{file_id}/content", headers=alice),
              client.delete(f"/v1/files/{file_id}", headers=alice), create_batch(client, ALICE, file_id),
              client.get(f"/v1/batches/{batch_id}", headers=alice),
              client.post(f"/v1/batches/{batch_id}/cancel", headers=alice),
              client.get(f"/v1/chat/completions/{stored_id}", headers=alice),
              client.get(f"/v1/chat/completions/{stored_id}/messages", headers=alice),
              client.post(f"/v1/chat/completions/{stored_id}", headers=alice, json={"metadata": {"x": "y"}}),
              client.delete(f"/v1/chat/completions/{stored_id}", headers=alice),
              client.get("/v1/files", headers=alice, params={"after": file_id}),
              client.get("/v1/batches", headers=alice, params={"after": batch_id}),
              client.get("/v1/chat/completions", headers=alice, params={"after": stored_id})):
        assert r.status_code == 404, (r.request.method, r.request.url, r.text)
    assert client.get("/v1/files", headers=alice).json()["data"] == []
    assert client.get("/v1/batches", headers=alice).json()["data"] == []
    assert client.get("/v1/chat/completions", headers=alice).json()["data"] == []
    assert client.delete("/v1/chat/completions", headers=alice, params={"metadata[task]": "t"}).json()["deleted"] == 0
    # the owner's objects are untouched, and the batch's output is the owner's too
    assert await runner.run_once()
    batch = client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed" and batch["metadata"] is None
    assert client.get(f"/v1/files/{batch['output_file_id']}").status_code == 200
    assert client.get(f"/v1/files/{batch['output_file_id']}", headers=alice).status_code == 404
    assert client.get(f"/v1/chat/completions/{stored_id}").json()["metadata"] == {"task": "t"}
    assert {f["id"] for f in client.get("/v1/files").json()["data"]} == {file_id, batch["output_file_id"]}


async def test_what_a_batch_line_stores_is_the_batch_keys(stack):
    client, runner = stack
    file_id = upload(client, ALICE, [chat_line("s", store=True, metadata={"from": "batch"})]).json()["id"]
    assert create_batch(client, ALICE, file_id).status_code == 200
    assert await runner.run_once()
    mine = client.get("/v1/chat/completions", headers=as_key(ALICE), params={"metadata[from]": "batch"}).json()
    assert len(mine["data"]) == 1
    assert client.get("/v1/chat/completions", headers=as_key(API_KEY)).json()["data"] == []


def assert_quota(r, code: str, quota: str, limit: int) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", code)
    assert quota in error["message"] and str(limit) in error["message"]
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers  # it does not clear in a second


def test_the_file_count_quota_is_per_key(stack):
    client, _ = stack
    ids = [upload(client, API_KEY).json()["id"] for _ in range(3)]
    assert_quota(upload(client, API_KEY), "files_quota_exceeded", "max_files_per_key", 3)
    assert upload(client, ALICE).status_code == 200  # another key's files are not counted
    assert client.delete(f"/v1/files/{ids[0]}", headers=as_key(API_KEY)).status_code == 200
    assert upload(client, API_KEY).status_code == 200  # a deleted file frees its place
    assert len(client.get("/v1/files", headers=as_key(API_KEY)).json()["data"]) == 3


def test_the_file_bytes_quota(tmp_path):
    lines = [chat_line("a", "x" * 600)]
    size = len(jsonl(lines))
    client, _ = make_stack(tmp_path, max_file_storage_bytes_per_key=2 * size + 10)
    assert upload(client, API_KEY, lines).status_code == 200
    assert upload(client, API_KEY, lines).status_code == 200
    r = upload(client, API_KEY, lines)  # passes it only with its own bytes: refused after it was received
    assert_quota(r, "file_storage_quota_exceeded", "max_file_storage_bytes_per_key", 2 * size + 10)
    assert len(client.get("/v1/files", headers=as_key(API_KEY)).json()["data"]) == 2
    assert len(list((tmp_path / "files").iterdir())) == 2  # the refused upload's contents are not kept
    client.app.state.database.close()


async def test_the_active_batches_quota_counts_batches_not_yet_ended(stack):
    client, runner = stack
    file_id = upload(client, API_KEY).json()["id"]
    assert create_batch(client, API_KEY, file_id).status_code == 200
    assert_quota(create_batch(client, API_KEY, file_id), "active_batches_quota_exceeded",
                 "max_active_batches_per_key", 1)
    assert create_batch(client, ALICE, upload(client, ALICE).json()["id"]).status_code == 200  # alice has her own
    assert await runner.run_once() and await runner.run_once()  # both end
    assert create_batch(client, API_KEY, file_id).status_code == 200


def test_without_keys_every_caller_is_one_key_with_its_quotas(tmp_path):
    client, _ = make_stack(tmp_path, api_key=None, api_keys={}, max_files_per_key=1)
    first = upload(client, None)
    assert first.status_code == 200
    assert_quota(upload(client, None), "files_quota_exceeded", "max_files_per_key", 1)
    assert client.get(f"/v1/files/{first.json()['id']}").status_code == 200
    client.app.state.database.close()


def test_only_named_keys_close_the_admin_routes(tmp_path):
    client, _ = make_stack(tmp_path, api_key=None)
    assert client.get("/v1/values", headers=as_key(ALICE)).status_code == 403
    assert client.get("/v1/files", headers=as_key(ALICE)).status_code == 200
    assert client.get("/v1/files").status_code == 401
    client.app.state.database.close()


def test_a_key_repeated_or_badly_named_is_refused():
    with pytest.raises(ValueError, match="are the same"):
        ServerSettings(api_key="k", api_keys={"alice": "k"})
    with pytest.raises(ValueError, match="pattern"):
        ServerSettings(api_keys={"no spaces": "k"})


def test_a_database_from_before_key_names_gives_its_rows_to_the_default_key(tmp_path):
    from server.store.db import Database, default_url

    url = default_url(tmp_path)
    db = Database.open(url)
    with db.engine.begin() as conn:  # as an older server made it: no api_key_name columns
        for table in ("files", "batches", "stored_completions"):
            conn.exec_driver_sql(f"DROP INDEX ix_{table}_api_key_name")
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN api_key_name")
        conn.exec_driver_sql("ALTER TABLE batch_results DROP COLUMN reasoning_tokens")
        conn.exec_driver_sql("INSERT INTO files (id, bytes, created_at, filename, purpose, sha256, deleted) "
                             "VALUES ('file-old', 1, 0, 'old.jsonl', 'batch', 'x', 0)")
    db.close()
    client, _ = make_stack(tmp_path)
    assert client.get("/v1/files/file-old", headers=as_key(API_KEY)).json()["filename"] == "old.jsonl"
    assert client.get("/v1/files/file-old", headers=as_key(ALICE)).status_code == 404
    inspector = sa.inspect(client.app.state.database.engine)
    assert "ix_files_api_key_name" in {i["name"] for i in inspector.get_indexes("files")}
    assert "reasoning_tokens" in {c["name"] for c in inspector.get_columns("batch_results")}
    client.app.state.database.close()


def test_uploads_at_once_cannot_both_pass_the_quota(tmp_path, database_url):
    from concurrent.futures import ThreadPoolExecutor

    from server.errors import QuotaExceededError

    client, _ = make_stack(tmp_path, database_url, max_files_per_key=2)
    files = client.app.state.files
    data = jsonl([chat_line("a")])

    def one(_):
        try:
            return files.upload_sync(io.BytesIO(data), "in.jsonl", "batch", api_key_name="default").id
        except QuotaExceededError:
            return None

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(one, range(6)))
    assert sum(i is not None for i in ids) == 2
    assert len(client.get("/v1/files", headers=as_key(API_KEY)).json()["data"]) == 2
    client.app.state.database.close()


def test_named_keys_reach_the_replicas_as_a_secret():
    import json

    from server.scale_out import replica_args, secret_env

    settings = ServerSettings(api_key="k", api_keys={"alice": ALICE})
    assert json.loads(secret_env(settings)["IRO_API_KEYS"]) == {"alice": ALICE}
    assert "api_keys" not in replica_args(settings)  # never in Ray's stored config


@pytest.mark.parametrize("odd", ["a\x00b", "x" * 300, "../../etc/passwd", "file-\u00e9\U0001f600"])
def test_ids_that_cannot_exist_are_404s(stack, odd):
    from urllib.parse import quote

    client, _ = stack  # PostgreSQL cannot compare text with U+0000 at all: never sent there
    client.headers.update(as_key(API_KEY))
    path_odd = quote(odd, safe="")
    for r in (client.get(f"/v1/files/{path_odd}"), client.get(f"/v1/files/{path_odd}/content"),
              client.delete(f"/v1/files/{path_odd}"),
              client.get(f"/v1/batches/{path_odd}"), client.post(f"/v1/batches/{path_odd}/cancel"),
              create_batch(client, API_KEY, odd), client.get(f"/v1/chat/completions/{path_odd}"),
              client.delete(f"/v1/chat/completions/{path_odd}"),
              client.get(f"/v1/chat/completions/{path_odd}/messages"),
              client.post(f"/v1/chat/completions/{path_odd}", json={"metadata": {}}),
              client.get("/v1/files", params={"after": odd}), client.get("/v1/batches", params={"after": odd}),
              client.get("/v1/chat/completions", params={"after": odd})):
        assert r.status_code == 404, (r.request.method, r.request.url, r.text)
    r = client.get("/v1/files", params={"purpose": odd})
    assert r.status_code == 200 and r.json()["data"] == []
