"""bench/distill_seeds.py's parts without a server: the per-seed copy of a run (its own distillation
dropped), the config each copy resumes with, and the table's verdict per row."""

from __future__ import annotations

import json

import pytest

from bench.distill_seeds import seed_config, seed_run, table
from trainer.eval_results import MethodResult
from trainer.loop_config import LoopConfig
from trainer.loop_state import LoopError, RunState


def finished_run(tmp_path):
    """A run directory as a finished `iro loop --distill apa` leaves it."""
    config = LoopConfig.from_preset("smoke", name="rev", distill=["apa"])
    run = tmp_path / "rev"
    state = RunState.open(run, config)
    state.finish("it1/rollout", {"seconds": 1.0})
    state.finish("distill/apa/train", {"policy": "rev-apa", "version": 1})
    (run / "it1").mkdir()
    (run / "it1" / "labelled.jsonl").write_text('{"prompt": "x"}\n')
    (run / "eval").mkdir()
    (run / "eval" / "base.jsonl").write_text("{}\n")
    (run / "eval" / "distilled-apa.jsonl").write_text("{}\n")
    (run / "report.md").write_text("# report\n")
    return run


def test_a_seed_copies_the_run_without_its_distillation(tmp_path):
    run = finished_run(tmp_path)
    copy = seed_run(run, 2)
    assert copy == tmp_path / "rev-seed2"
    assert (copy / "it1" / "labelled.jsonl").read_text() == '{"prompt": "x"}\n'
    assert (copy / "eval" / "base.jsonl").exists() and not (copy / "eval" / "distilled-apa.jsonl").exists()
    state = json.loads((copy / "state.json").read_text())
    assert list(state["stages"]) == ["it1/rollout"]
    assert state["run_id"] == json.loads((run / "state.json").read_text())["run_id"]  # the run's values stay its own
    (copy / "it1" / "labelled.jsonl").write_text("changed\n")
    assert seed_run(run, 2) == copy and (copy / "it1" / "labelled.jsonl").read_text() == "changed\n"  # made once
    assert seed_run(run, 2, "lam0.02-") == tmp_path / "rev-lam0.02-seed2"  # another sweep of the same run
    assert seed_config(run, 2, ["apa"], {}, "full", "lam0.02-").distill_name == "rev-lam0.02-seed2"


def test_each_seed_resumes_with_its_own_policy_names_and_seed(tmp_path):
    run = finished_run(tmp_path)
    config = seed_config(run, 1, ["apa", "is-dpo"], {"apa": {"lam": 0.02}}, "full")
    assert config.distill == ["apa", "is-dpo"] and config.distill_name == "rev-seed1"
    assert (config.distill_config("apa").seed, config.distill_config("apa").lam) == (1, 0.02)
    assert config.distill_config("is-dpo").seed == 1
    copy = seed_run(run, 1)
    state = RunState.open(copy, config)  # the copy has no distillation yet: its settings may change
    assert state.stage("it1/rollout") == {"seconds": 1.0}
    with pytest.raises(LoopError, match="other settings"):  # the original run distilled already
        RunState.open(run, config)


def result(label, kind, mean, d2):
    return MethodResult(label, label, kind, "", None, [], 64, mean, mean - 0.1, mean + 0.1, 0.0, d2, 64 * 32,
                        32.0, 1.0)


def test_the_table_says_which_runs_land_inside_the_bounds():
    base, iro = result("base (N=1)", "base", 0.1, 0.70), result("IRO-3", "cbs", 0.9, 0.60)
    rows = [{"method": "apa", "seed": 0, "reward": 0.7, "ci": [0.6, 0.8], "share_of_gain": 0.75,
             "distinct2": 0.65, "distinct2_vs_base": 0.65 / 0.70 - 1, "kl_to_base": 0.1, "distill_seconds": 600.0,
             "checkpoint": 120, "checkpoints": 6, "inside": True},
            {"method": "is-dpo", "seed": 0, "reward": 0.6, "ci": [0.5, 0.7], "share_of_gain": 0.625,
             "distinct2": 0.66, "distinct2_vs_base": 0.66 / 0.70 - 1, "kl_to_base": None, "distill_seconds": None,
             "checkpoint": 90, "checkpoints": 6, "inside": False}]
    text = table(rows, iro, base, min_share=0.7, max_drop=0.1)
    assert "its gain is +0.800, so 70% of it is +0.660" in text
    assert "| apa | 0 | +0.700 [+0.600, +0.800] | 75% | 0.650 (-7.1%) | 0.100 | 120, 6 | 600 | yes |" in text
    assert "| 62% | 0.660 (-5.7%) | - | 90, 6 | - | **no** |" in text
    assert text.rstrip().endswith("1 of 2 runs inside both bounds.")


def test_seeds_share_the_final_policys_rollouts_collected_once(tmp_path):
    from bench.distill_seeds import share_data

    run = finished_run(tmp_path)
    pf = {"mode": "pf", "k": 16}
    first, second = seed_run(run, 0), seed_run(run, 1)
    assert share_data(run, second, pf) is None  # no copy has them yet: the first seed collects them
    state = RunState.open(first, seed_config(run, 0, ["apa"], {}, "full", distill_from=pf))
    assert state.data["config"]["distill_from"]["k"] == 16
    state.finish("distill-data/rollout", {"source": state.data["config"]["distill_from"], "records": 2})
    (first / "distill-data").mkdir()
    (first / "distill-data" / "labelled.jsonl").write_text('{"prompt": "y"}\n')
    assert share_data(run, second, {"mode": "pf", "k": 16}) is None  # not labelled yet: nothing to share
    state.finish("distill-data/reward", {"records": 2})
    assert share_data(run, second, {"mode": "pf", "k": 8}) is None  # another search's rollouts are not these
    assert share_data(run, second, "base") is None  # nor the base model's
    assert share_data(run, second, pf) == first
    assert (second / "distill-data" / "labelled.jsonl").read_text() == '{"prompt": "y"}\n'
    shared = RunState.open(second, seed_config(run, 1, ["apa"], {}, "full", distill_from=pf))
    assert shared.stage("distill-data/rollout")["records"] == 2 and shared.stage("distill-data/reward")
    assert share_data(run, second, pf) is None  # it has them now
