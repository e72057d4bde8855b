"""bench/deadlines.py's accounting: per-request figures from a response, the distributions, the
count within deadline + one chunk's time, and the markdown (no server)."""

from __future__ import annotations

import doctest

import pytest

import bench.deadlines
from bench.deadlines import markdown, record, summarise


def body(elapsed_ms: float, steps: int, stopped_by: str | None = "deadline") -> dict:
    return {"choices": [{"finish_reason": "length", "message": {"content": "partial"}}],
            "guidance": {"elapsed_ms": elapsed_ms, "steps": steps, "stopped_by": stopped_by, "tokens": 128}}


def test_doctests():
    assert doctest.testmod(bench.deadlines).failed == 0


def test_a_request_is_within_bound_when_it_returns_before_deadline_plus_its_own_chunk_time():
    inside = record("pf", 1500, 1.9, body(1800.0, 4))  # chunk 0.45 s: bound 1.95 s
    outside = record("pf", 1500, 2.0, body(1800.0, 4))
    assert inside["within_bound"] and not outside["within_bound"]
    assert inside["overrun_s"] == pytest.approx(0.4) and inside["search_overrun_s"] == pytest.approx(0.3)
    assert inside["finish_reason"] == ["length"] and inside["stopped_by"] == "deadline"
    assert not record("cbs", 1500, 0.1, {"choices": []})["within_bound"]  # no metadata: not counted as honoured


def test_summary_counts_and_distributions_over_all_and_per_mode():
    records = [record("cbs", 1000, 1.2, body(1100.0, 2)), record("cbs", 1000, 1.9, body(1500.0, 3)),
               record("pf", 1000, 0.9, body(800.0, 8, stopped_by=None))]
    s = summarise(records)
    assert s["all"]["requests"] == 3 and s["all"]["within_deadline_plus_one_chunk"] == 2
    assert s["all"]["within_deadline"] == 1
    assert s["all"]["overrun_s"]["max"] == pytest.approx(0.9) and s["all"]["overrun_s"]["p50"] == pytest.approx(0.2)
    assert s["all"]["stopped_by"] == {"deadline": 2, "None": 1} and s["all"]["finish_reason"] == {"length": 3}
    assert s["by_mode"]["cbs"]["within_deadline_plus_one_chunk"] == 1 and s["by_mode"]["pf"]["requests"] == 1
    result = {"date": "d", "command": "python -m bench.deadlines", "summary": s,
              "machine": {"cpu_model": "AMD EPYC", "cores": 2, "load_average_before": [1, 2, 3],
                          "load_average_after": [3, 2, 1], "load_1min_during": {"min": 1.0, "max": 4.0}},
              "settings": {"requests": 3, "clients": 2, "deadline_ms": 1000, "max_tokens": 64,
                           "guidance": {"cbs": {"mode": "cbs"}, "pf": {"mode": "pf"}}}}
    text = markdown(result)
    assert "**2 of 3**" in text and "| cbs | 2 | 1 |" in text and "AMD EPYC" in text
