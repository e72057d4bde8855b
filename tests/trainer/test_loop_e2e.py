"""`iro loop --preset smoke` end to end against the real server: two iterations, a report with
plots, the chain [1, 2] in the registry, a re-run that skips every finished stage, and a new run that
continues the served chain (`--continue`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from valuefn.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
NAME = "loop-smoke"
STAGES = [f"it{t}/{s}" for t in (1, 2) for s in ("rollout", "reward", "train", "serve", "eval")] + ["baselines/v2"]


@pytest.mark.e2e
def test_smoke_loop_two_iterations_and_resume(server, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "iro.cli", "loop", "--preset", "smoke", "--iterations", "2", "--server", server.url,
           "--api-key", server.api_key, "--admin-key", server.admin_key, "--values-dir", str(server.values_dir),
           "--name", NAME, "--run-dir", str(run_dir), "--no-progress"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]

    report = (run_dir / "report.md").read_text()
    assert "| 1 | loop-smoke@1 (1) |" in report and "| 2 | loop-smoke@2 (1,2) |" in report
    assert "Best-of-4" in report and "Best-of-4 (reward)" in report and "IRO-2" in report and "## Verdict" in report
    # value-ranked Best-of-N: every sample scored by the final chain, the best of the first N picked
    scored = json.loads((run_dir / f"eval/bon-scores__{NAME}-v2.json").read_text())
    samples = [json.loads(line) for line in (run_dir / "eval/oracle.jsonl").read_text().splitlines()]
    assert scored["versions"] == [1, 2] and set(scored["scores"]) == {r["id"] for r in samples}
    for png in ("reward_vs_tokens.png", "reward_per_iteration.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    registry = Registry(server.values_dir)
    assert registry.current(NAME) == 2
    assert [link.version for link in registry.manifest(NAME, 2).chain] == [1, 2]
    assert registry.manifest(NAME, 2).training["init_from"] == 1
    state = json.loads((run_dir / "state.json").read_text())
    assert list(state["stages"]) == STAGES and state["versions"] == {"1": 1, "2": 2}
    assert all(r["policy"]["value"] is None for r in map(json.loads, (run_dir / "it1/rollouts.jsonl").read_text().splitlines()))
    guided = [json.loads(line)["policy"] for line in (run_dir / "it2/rollouts.jsonl").read_text().splitlines()]
    assert all(p["value"] == NAME and p["versions"] == [1] and p["mode"] == "cbs" for p in guided)
    with server.admin() as admin:
        status = admin.get(f"/v1/values/{NAME}").json()
    assert status["serving_version"] == 2 and status["chain"] == [1, 2]

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert all(f"stage {key}: done already" in again.stderr for key in STAGES), again.stderr[-3000:]
    assert registry.versions(NAME) == [1, 2]  # nothing retrained or republished
    assert json.loads((run_dir / "state.json").read_text())["stages"] == state["stages"]

    # `--continue`: a new run takes the served chain [1, 2] as its start (IRO-2 on its held-out prompts is
    # the "before"), its one iteration is guided by it and V_3 is trained from V_2
    cont_dir = tmp_path / "continued"
    cont = [*cmd, "--continue"]
    cont[cont.index("--iterations") + 1], cont[cont.index("--run-dir") + 1] = "1", str(cont_dir)
    third = subprocess.run(cont, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-5000:]
    state = json.loads((cont_dir / "state.json").read_text())
    assert state["adopted"] == [1, 2] and state["versions"] == {"1": 1, "2": 2, "3": 3}
    assert list(state["stages"]) == ["it2/serve", "it2/eval"] + [f"it3/{s}" for s in
                                                                 ("rollout", "reward", "train", "serve", "eval")] + [
        "baselines/v3"]
    assert registry.current(NAME) == 3 and registry.manifest(NAME, 3).training["init_from"] == 2
    assert [link.version for link in registry.manifest(NAME, 3).chain] == [1, 2, 3]
    guided = [json.loads(line)["policy"] for line in (cont_dir / "it3/rollouts.jsonl").read_text().splitlines()]
    assert all(p["value"] == NAME and p["versions"] == [1, 2] for p in guided)
    report = (cont_dir / "report.md").read_text()
    assert f"continues the served chain {NAME}@2" in report
    assert "| 2 | loop-smoke@2 (1,2) |" in report and "| 3 | loop-smoke@3 (1,2,3) |" in report
    assert "\n| 1 | loop-smoke@1" not in report  # the adopted chain's earlier iterations: not evaluated by this run
