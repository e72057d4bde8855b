"""`iro rollout --via-batch`: the rollout job through the Batch API of an app with a scripted
engine and a real database, its batch runner in a thread; the records match the HTTP path's."""

from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest

from server.store.startup import open_store
from tests.server.conftest import API_KEY, ScriptedEngine, make_client
from trainer.rollout import run_rollout
from trainer.rollout_config import RolloutConfig
from trainer.rollout_records import prompts_from_dicts


@pytest.fixture
def served(tmp_path):
    engine = ScriptedEngine()
    client = make_client(engine, data_dir=tmp_path / "data")
    runner = open_store(client.app, client.app.state.settings)
    thread = threading.Thread(target=lambda: asyncio.run(runner.run_forever()), daemon=True)
    thread.start()
    yield openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=client, max_retries=0), engine
    runner.stop()
    thread.join(10)


def test_rollout_via_batch_writes_records_and_a_rerun_asks_nothing(served, tmp_path):
    sdk, engine = served
    items = prompts_from_dicts([{"id": "p1", "messages": [{"role": "user", "content": "hi"}]},
                                {"id": "p2", "messages": [{"role": "user", "content": "yo"}]}])
    out = tmp_path / "rollouts.jsonl"
    config = RolloutConfig(server="http://testserver", samples_per_prompt=2, max_tokens=3, progress=False, seed=7,
                           backend="batch")
    stats = run_rollout(items, out, config, client=sdk, poll_interval=0.05)
    assert (stats.written, stats.failed) == (4, 0), stats.errors
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["p1:0", "p1:1", "p2:0", "p2:1"]
    r = next(r for r in records if r["id"] == "p1:0")
    assert (r["response"], r["response_token_ids"]) == ("abc", list(b"abc"))
    assert r["prompt_token_ids"] == list(b"<user>hi\n<assistant>") and r["policy"]["model"] == "tiny"
    assert not (tmp_path / "rollouts.jsonl.batch").exists()
    assert sdk.files.list().data == []  # input and output files deleted: they would fill the key's quota
    asked = len(engine.requests)
    assert run_rollout(items, out, config, client=sdk, poll_interval=0.05).written == 0
    assert len(engine.requests) == asked


def test_rollout_via_batch_keeps_its_files_when_asked(served, tmp_path):
    sdk, _ = served
    items = prompts_from_dicts([{"id": "p1", "messages": [{"role": "user", "content": "hi"}]}])
    config = RolloutConfig(server="http://testserver", max_tokens=3, progress=False, seed=7, backend="batch",
                           keep_batch_files=True)
    stats = run_rollout(items, tmp_path / "kept.jsonl", config, client=sdk, poll_interval=0.05)
    assert (stats.written, stats.failed) == (1, 0), stats.errors
    batch = sdk.batches.list().data[0]
    kept = {f.id for f in sdk.files.list().data}
    assert batch.input_file_id in kept and batch.output_file_id in kept


def test_cli_refusals():
    from typer.testing import CliRunner

    from iro.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["rollout", "/dev/null", "-o", "/tmp/x.jsonl", "--via-batch", "--backend", "ray"])
    assert r.exit_code == 2 and "--via-batch" in r.output
    r = runner.invoke(app, ["rollout", "/dev/null", "-o", "/tmp/x.jsonl", "--keep-batch-files"])
    assert r.exit_code == 2 and "give --via-batch too" in r.output
    r = runner.invoke(app, ["loop", "--metadata", "task=a"])
    assert r.exit_code == 2 and "--from-stored" in r.output
