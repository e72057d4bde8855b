"""A task file written by hand (tiny prompts, a `python:` reward in a file beside it) drives
`iro loop --preset smoke` end to end against the real server, and `iro eval` reuses it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.loop import LoopConfig
from valuefn.registry import Registry

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

TASK = """\
# a hand-written task: short answers that end with a question
name: hand-task
prompts:
  train: data/train.jsonl
  eval: data/eval.jsonl
reward: 0.7*python:checks.py:ends_with_question+0.3*length:10
max_tokens: 24
temperature: 0.8
stop: ["\\n\\n"]
search: {w: 2, k: 2, l: 4}
"""

CHECKS = '''
def ends_with_question(prompts, responses):
    """1 when the answer ends with a question mark, else 0."""
    return [float(r.strip().endswith("?")) for r in responses]
'''


def test_hand_written_task_file_drives_the_smoke_loop_and_eval(server, tmp_path):
    folder = tmp_path / "task"
    (folder / "data").mkdir(parents=True)
    (folder / "task.yaml").write_text(TASK)
    (folder / "checks.py").write_text(textwrap.dedent(CHECKS))
    questions = ["Name a fruit.", "Say hello.", "Pick a colour.", "Name a city.", "Count to three."]
    (folder / "data/train.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions[:4]))
    (folder / "data/eval.jsonl").write_text("".join(json.dumps({"id": f"e{i}", "messages": [
        {"role": "user", "content": q}]}) + "\n" for i, q in enumerate(questions[2:])))

    run_dir = tmp_path / "run"
    common = ["--server", server.url, "--api-key", server.api_key, "--no-progress"]
    loop = subprocess.run([sys.executable, "-m", "iro.cli", "loop", "--task", str(folder / "task.yaml"), "--preset",
                           "smoke", "--iterations", "1", "--admin-key", server.admin_key, "--values-dir",
                           str(server.values_dir), "--run-dir", str(run_dir), *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert loop.returncode == 0, loop.stdout[-3000:] + loop.stderr[-5000:]

    report = (run_dir / "report.md").read_text()
    assert "on task `hand-task`" in report and "| 1 | hand-task@1 (1) |" in report
    assert f"python:{folder.resolve() / 'checks.py'}:ends_with_question" in report
    assert "IRO-1" in report and "Best-of-4 (reward)" in report and "- held-out reward: base" in report
    for png in ("reward_vs_tokens.png", "reward_per_iteration.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    # the task's prompts, reward and stop strings reached the rollouts; the value is named after the task
    rollouts = [json.loads(line) for line in (run_dir / "it1/labelled.jsonl").read_text().splitlines()]
    samples = LoopConfig.from_preset("smoke").samples_per_prompt
    assert sorted(r["messages"][0]["content"] for r in rollouts) == sorted(questions[:4] * samples)
    assert all(r["reward"] == pytest.approx(0.7 * r["response"].strip().endswith("?")
                                            + 0.3 * min(len(r["response"].split()), 10) / 10) for r in rollouts)
    assert all("\n\n" not in r["response"] for r in rollouts)
    assert Registry(server.values_dir).current("hand-task") == 1
    state = json.loads((run_dir / "state.json").read_text())
    iro = state["stages"]["it1/eval"]["result"]
    assert iro["prompts"] == 3 and iro["settings"] == "w=2 k=2 l=8"  # the smoke preset's w/k/l win over the task's

    out = tmp_path / "eval"
    evaluated = subprocess.run([sys.executable, "-m", "iro.cli", "eval", "--task", str(folder), "--value",
                                "hand-task@1", "--bon", "1,2", "--n-prompts", "2", "--out", str(out), *common],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-5000:]
    results = {r["name"]: r for r in json.loads((out / "eval.json").read_text())["results"]}
    assert set(results) == {"base", "bon-2", "oracle-2", "iro"} and results["iro"]["settings"] == "w=2 k=2 l=4"
    assert all(r["prompts"] == 2 for r in results.values())
