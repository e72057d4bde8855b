"""`iro bench --json` writes the documented fields (schema only; timings are not tested)."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.guided import (ENGINE_VALUE_GUIDANCE, GUIDANCE, TARGETS, BenchReport, concurrency_figures,
                          evaluate_targets, print_table)

EXAMPLE = Path(__file__).resolve().parents[2] / "bench" / "example-bench.json"


def test_example_report_matches_the_schema_and_names_every_target():
    data = json.loads(EXAMPLE.read_text())
    report = BenchReport.model_validate(data)
    assert set(report.targets) == set(TARGETS)
    print_table(data)  # renders without error


def test_targets_are_evaluated_from_the_values():
    results = {"guided_vs_plain_time_ratio": 1.2, "guided_engine_value_vs_plain_time_ratio": 1.31,
               "speedup_vs_reference_loop": 3.0, "speedup_vs_reference_loop_engine_value": 6.5,
               "scoring_growth_ratio": 1.5, "hot_swap_lora_value_seconds": 0.8,
               "concurrency_speedup": 5, "concurrency_vs_plain_ceiling": 0.9, "hot_swap_seconds": 0.5,
               "failed_requests_during_swap": 0}
    t = evaluate_targets(results)
    assert t["concurrency_vs_plain_ceiling"] == {"op": ">=", "target": 0.95, "value": 0.9, "met": False}
    assert t["guided_vs_plain_time_ratio"]["met"] and not t["speedup_vs_reference_loop"]["met"]
    assert not t["guided_engine_value_vs_plain_time_ratio"]["met"]
    assert t["scoring_growth_ratio"]["met"] and not t["hot_swap_seconds"]["met"]
    assert t["failed_requests_during_swap"]["met"] and t["speedup_vs_reference_loop_engine_value"]["met"]
    assert t["hot_swap_lora_value_seconds"]["met"]


def test_missing_field_is_rejected():
    data = json.loads(EXAMPLE.read_text())
    del data["scoring_growth_ratio"]
    with pytest.raises(ValidationError):
        BenchReport.model_validate(data)


def test_concurrency_ceiling_is_the_engine_values_gain_over_plain_samplings_gain():
    f = concurrency_figures(2, 16, seq_t=4.0, conc_t=8.0, plain_seq_t=2.0, plain_conc_t=4.0,
                            engine_seq_t=3.0, engine_conc_t=8.0)
    assert f["plain_concurrency_speedup"] == pytest.approx(4.0)  # 16/4 req/s against 2/2
    assert f["engine_value_concurrency_speedup"] == pytest.approx(3.0)  # 16/8 against 2/3
    assert f["concurrency_vs_plain_ceiling"] == pytest.approx(0.75)
    assert f["concurrency_speedup"] == pytest.approx(4.0) and f["concurrency_vs_plain_ceiling_lora"] == pytest.approx(1.0)


def test_the_ceiling_figure_uses_the_benchs_engine_side_value():
    assert ENGINE_VALUE_GUIDANCE["value"] != GUIDANCE["value"]
    assert {k: v for k, v in ENGINE_VALUE_GUIDANCE.items() if k != "value"} == \
        {k: v for k, v in GUIDANCE.items() if k != "value"}  # same search, 16 sequences per request


def test_example_report_states_its_dtype_and_the_ceiling_target():
    data = json.loads(EXAMPLE.read_text())
    assert data["settings"]["dtype"] in ("bfloat16", "float32") and data["settings"]["dtype_reason"]
    assert data["targets"]["concurrency_vs_plain_ceiling"]["target"] == TARGETS["concurrency_vs_plain_ceiling"][1]
