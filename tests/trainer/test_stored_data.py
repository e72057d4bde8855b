"""Stored completions as training data, read through the openai SDK from an app with a scripted
engine and a real SQLite database: filters, rollout records with the engine's token ids, prompts
deduplicated with a stable held-out split, and the `iro data` commands."""

from __future__ import annotations

import json

import openai
import pytest
from typer.testing import CliRunner

from server.store.startup import open_store
from tests.server.conftest import API_KEY, ScriptedEngine, make_client
from trainer import data_cli
from trainer.stored_data import is_heldout, metadata_of, list_stored, prompt_key, split_prompts, to_records


@pytest.fixture
def sdk(tmp_path):
    client = make_client(ScriptedEngine(), data_dir=tmp_path)
    open_store(client.app, client.app.state.settings)
    client.app.state.serving.stored = client.app.state.stored
    for content, task in (("hello", "a"), ("hello", "a"), ("bye", "b")):
        r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3, "store": True, "seed": 1,
                                                      "metadata": {"task": task},
                                                      "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
    return openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=client, max_retries=0)


def test_records_carry_the_engine_token_ids_and_the_policy(sdk):
    stored = list_stored(sdk, metadata={"task": "a"})
    assert len(stored) == 2
    [record] = to_records(stored[0])
    assert record["id"] == f"{stored[0].id}:0" and record["messages"] == [{"role": "user", "content": "hello"}]
    assert record["prompt_token_ids"] == list(b"<user>hello\n<assistant>")
    assert record["prompt_text"] == "<user>hello\n<assistant>"
    assert (record["response"], record["response_token_ids"]) == ("abc", list(b"abc"))
    assert record["policy"]["model"] == "tiny" and record["policy"]["value"] is None
    assert record["sampling"] == {"temperature": 1.0, "max_tokens": 3, "seed": 1} and record["reward"] is None


def test_prompts_are_deduplicated_and_the_heldout_split_is_stable(sdk):
    train, heldout = split_prompts(list_stored(sdk), heldout_fraction=0.5)
    assert sorted(p["messages"][0]["content"] for p in train + heldout) == ["bye", "hello"]
    for p in heldout:
        assert is_heldout(prompt_key(p["messages"]), 0.5)
    assert split_prompts(list_stored(sdk), heldout_fraction=0.5) == (train, heldout)
    assert split_prompts(list_stored(sdk), heldout_fraction=0.0)[1] == []


def test_iro_data_export_prompts_and_rm(sdk, tmp_path, monkeypatch):
    monkeypatch.setattr(data_cli, "_client", lambda server, api_key: sdk)
    runner = CliRunner()
    out = tmp_path / "traffic.jsonl"
    result = runner.invoke(data_cli.app, ["export", "-o", str(out), "--metadata", "task=a"])
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["messages"][0]["content"] for x in out.read_text().splitlines()] == ["hello", "hello"]
    result = runner.invoke(data_cli.app, ["prompts", "-o", str(tmp_path / "p.jsonl"), "--heldout-fraction", "0"])
    assert result.exit_code == 0 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
    [row] = runner.invoke(data_cli.app, ["ls", "--metadata", "task=b"]).output.splitlines()
    assert row.split("\t")[2:] == ["tiny", "task=b", "abc"]
    result = runner.invoke(data_cli.app, ["rm", "--metadata", "task=a"])
    assert result.exit_code == 0 and "deleted 2" in result.output
    assert [metadata_of(c) for c in list_stored(sdk)] == [{"task": "b"}]
    assert runner.invoke(data_cli.app, ["export", "-o", str(out), "--metadata", "nokey"]).exit_code == 2


def test_a_task_takes_the_stored_prompts(sdk):
    from trainer.stored_data import stored_task
    from trainer.tasks import load_task

    task = load_task("review-sentiment")
    online = stored_task(task, sdk, metadata={"task": "a"}, heldout_fraction=0.0)
    assert [p.messages for p in online.items("train")] == [[{"role": "user", "content": "hello"}]]
    assert online.eval == task.eval and online.reward == task.reward
    with pytest.raises(ValueError, match="no stored completion matches"):
        stored_task(task, sdk, metadata={"task": "none"})
