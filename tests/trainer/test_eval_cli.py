"""`iro eval` end to end against the real server: base, Best-of-N by the value and by the reward
(from one set of samples), and IRO, with the table, JSON and plot it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAME = "eval-cli"


@pytest.mark.e2e
def test_iro_eval_reports_every_method(server, tmp_path):
    from common.model_store import resolve_model
    from valuefn.loader import init_value
    from valuefn.model import ValueModelConfig
    from valuefn.registry import Registry

    from clients import IroClient

    init_value(Registry(server.values_dir), NAME, resolve_model(None), ValueModelConfig(num_layers=2, lora_r=4))
    with IroClient(server.url, api_key=server.api_key, admin_key=server.admin_key, timeout=300) as client:
        assert client.load_value(NAME).serving_version == 1  # served now, not whenever the watcher sees it
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "iro.cli", "eval", "--out", str(out), "--server", server.url, "--api-key",
           server.api_key, "--value", NAME, "--n-prompts", "3", "--bon", "1,2,4", "--w", "2", "--k", "2", "--l", "4",
           "--max-tokens", "8", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    results = {r["name"]: r for r in json.loads((out / "eval.json").read_text())["results"]}
    assert sorted(results) == ["base", "bon-2", "bon-4", "iro", "oracle-2", "oracle-4"]
    assert all(r["prompts"] == 3 and -1 <= r["mean"] <= 1 for r in results.values())
    assert results["bon-4"]["value"] == f"{NAME}@1" and results["bon-4"]["versions"] == [1]
    assert results["bon-4"]["tokens"] == sum(  # Best-of-4 costs the first 4 samples of every prompt
        r["usage"]["completion_tokens"] for r in map(json.loads, (out / "oracle.jsonl").read_text().splitlines()) if r["sample"] < 4)
    assert results["oracle-4"]["mean"] >= results["oracle-2"]["mean"]  # more samples, the reward picks: never worse
    assert "| IRO |" in (out / "eval.md").read_text() and (out / "reward_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
