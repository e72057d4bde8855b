"""`iro rollout --backend ray`: the same job as offline vLLM batch generation in a local Ray
instance (one actor with the real engine and the embedded model), checked against the server
backend's records for the same prompts."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.rollout import RolloutConfig, RolloutError, prompts_from_dicts, read_records, run_rollout

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

PROMPTS = [{"id": "chat-1", "messages": [{"role": "user", "content": "Describe a rainy day in one sentence."}]},
           {"id": "chat-2", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Name a colour."}]},
           {"id": "text-1", "prompt": "The old lighthouse keeper"}]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.e2e
def test_ray_backend_matches_the_server_job_format_and_resumes(local_ray, server, tmp_path):
    items = prompts_from_dicts(PROMPTS)
    config = RolloutConfig(server=server.url, api_key=server.api_key, samples_per_prompt=2, max_tokens=12,
                           temperature=0.7, seed=11, progress=False)
    ray_out, http_out = tmp_path / "ray.jsonl", tmp_path / "server.jsonl"

    stats = run_rollout(items, ray_out, dataclasses.replace(config, backend="ray"))
    assert stats.complete and stats.written == 6 and stats.completion_tokens > 0
    again = run_rollout(items, ray_out, dataclasses.replace(config, backend="ray"))
    assert again.written == 0 and again.skipped == 6  # resumable: nothing left to do

    run_rollout(items, http_out, config)
    by_ray = {r["id"]: r for r in read_records(ray_out)}
    by_server = {r["id"]: r for r in read_records(http_out)}
    assert sorted(by_ray) == sorted(by_server) == sorted(f"{p['id']}:{j}" for p in PROMPTS for j in range(2))
    for key, r in by_ray.items():
        s = by_server[key]
        assert set(r) == set(s)  # one record format for both backends
        # the prompt is rendered exactly as the server renders it (same chat template, same ids)
        assert r["prompt_token_ids"] == s["prompt_token_ids"] and r["prompt_text"] == s["prompt_text"]
        assert 0 < len(r["response_token_ids"]) <= 12 and r["finish_reason"] in ("stop", "length")
        assert r["policy"]["value"] is None and r["sampling"] == s["sampling"]


def test_ray_backend_refuses_guided_rollouts(tmp_path):
    config = RolloutConfig(backend="ray", value="demo", progress=False)
    with pytest.raises(RolloutError, match="base model only"):
        run_rollout(prompts_from_dicts(PROMPTS[:1]), tmp_path / "out.jsonl", config)
