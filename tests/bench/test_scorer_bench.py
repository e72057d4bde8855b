"""`iro bench --scorer` on a tiny shape: the table's figures exist and its checks hold."""

from __future__ import annotations

import json

import pytest

from bench import scorer


@pytest.mark.slow
def test_scorer_bench_runs_and_checks_on_cpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(scorer.SHAPES, "tiny", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                    num_key_value_heads=2, head_dim=8, vocab_size=256))
    monkeypatch.setattr(scorer, "STEPS", 4)
    monkeypatch.setattr(scorer, "PROMPT", 16)
    out = tmp_path / "scorer.json"
    scorer.main(["--device", "cpu", "--dtype", "float32", "--shapes", "tiny", "--searches", "1", "3", "--repeats", "1",
                 "--json", str(out)])  # float32: the reuse-vs-recompute bound below is float32's
    results = json.loads(out.read_text())
    assert results["dtype"] == "float32" and results["dtype_reason"].startswith("set explicitly")
    rows = results["rows"]
    assert [r["searches"] for r in rows] == [1, 3]
    assert rows[1]["candidates"] == 3 * scorer.W * scorer.K
    for r in rows:
        assert r["kv_mean_ms"] > 0 and r["recompute_mean_ms"] > 0
        assert r["max_abs_diff_kv_vs_recompute"] < 1e-4 * max(1.0, r["value_scale"])
    assert rows[0]["ops_per_step"] == rows[1]["ops_per_step"]  # constant in the number of candidates
    assert "| tiny | 3 | 48 |" in capsys.readouterr().out
