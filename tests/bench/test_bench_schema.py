"""`iro bench --json` writes the documented fields (schema only; timings are not tested)."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.guided import TARGETS, BenchReport, evaluate_targets, print_table

EXAMPLE = Path(__file__).resolve().parents[2] / "bench" / "example-bench.json"


def test_example_report_matches_the_schema_and_names_every_target():
    data = json.loads(EXAMPLE.read_text())
    report = BenchReport.model_validate(data)
    assert set(report.targets) == set(TARGETS)
    print_table(data)  # renders without error


def test_targets_are_evaluated_from_the_values():
    results = {"guided_vs_plain_time_ratio": 1.2, "guided_engine_head_vs_plain_time_ratio": 1.31,
               "speedup_vs_reference_loop": 3.0, "speedup_vs_reference_loop_engine_head": 4.0,
               "scoring_growth_ratio": 1.5,
               "concurrency_speedup": 5, "hot_swap_seconds": 1.0, "failed_requests_during_swap": 0}
    t = evaluate_targets(results)
    assert t["guided_vs_plain_time_ratio"]["met"] and not t["speedup_vs_reference_loop"]["met"]
    assert not t["guided_engine_head_vs_plain_time_ratio"]["met"]
    assert t["scoring_growth_ratio"]["met"] and not t["hot_swap_seconds"]["met"]
    assert t["failed_requests_during_swap"]["met"] and t["speedup_vs_reference_loop_engine_head"]["met"]


def test_missing_field_is_rejected():
    data = json.loads(EXAMPLE.read_text())
    del data["scoring_growth_ratio"]
    with pytest.raises(ValidationError):
        BenchReport.model_validate(data)
