"""bench.batch_arms: repeated bench.batch_api runs pooled per arm, each run's latencies over its own idle p50."""

from __future__ import annotations

import json

import pytest

from bench.batch_arms import main, pool


def run(ramp, preemptions, idle_p50, latencies, tok_s=50.0):
    return {"batch_resume_ramp_s": ramp, "batch_max_preemptions": preemptions, "guided_fraction": 0.25,
            "interactive_idle": {"p50_s": idle_p50}, "interactive_during_batch": {"latencies_s": latencies},
            "batch": {"tokens_per_s": tok_s, "preemptions": 3.0}}


def test_runs_pool_per_arm_each_over_its_own_idle_median():
    rows = pool([run(0.0, 2, 0.5, [0.5, 1.5]), run(0.25, 8, 0.2, [0.2, 0.3]), run(0.0, 2, 1.0, [1.0, 2.5])])
    assert [(r["ramp_s"], r["max_preemptions"], r["runs"], r["requests"]) for r in rows] == [(0.0, 2, 2, 4), (0.25, 8, 1, 2)]
    old, new = rows
    assert old["slow_share"] == 0.5  # 1.5/0.5 = 3x and 2.5/1.0 = 2.5x are slow; 1x twice is not
    assert new["slow_share"] == 0.0 and new["p95"] == pytest.approx(1.5)
    assert old["p95_ci"][0] <= old["p95"] <= old["p95_ci"][1]


def test_main_writes_the_table_and_rows(tmp_path):
    for i, r in enumerate([run(0.0, 2, 0.3, [0.3, 0.9, 0.4]), run(0.5, 8, 0.3, [0.3, 0.33, 0.36])]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "result.json").write_text(json.dumps(r))
    out = tmp_path / "arms.md"
    assert main([str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 0.0 | 2 | 1 | 3 | 1.33x / 3.00x / 3.00x |" in text and "| 0.5 | 8 | 1 | 3 |" in text
    assert [row["runs"] for row in json.loads(out.with_suffix(".json").read_text())] == [1, 1]
