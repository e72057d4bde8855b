"""Evaluation metrics, reports and plots, and the loop's config and state (no server)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from common.search_settings import SearchOverrides, SearchSettings
from trainer.evaluate import (
    Method, MethodResult, distinct_n, markdown_table, mean_ci, standard_methods, summarize, write_results,
)
from trainer.loop_config import LoopConfig
from trainer.loop_report import verdict
from trainer.loop_state import LoopError, RunState
from trainer.rollout import RolloutConfig
from trainer.rollout_config import RolloutError


def test_mean_ci_is_reproducible_and_covers_the_mean():
    values = [0.1, 0.9, -0.3, 0.5, 0.7, 0.2, -0.1, 0.4]
    mean, lo, hi = mean_ci(values)
    assert mean == pytest.approx(sum(values) / len(values)) and lo < mean < hi
    assert mean_ci(values) == (mean, lo, hi)
    _, lo_wide, hi_wide = mean_ci(values[:4])
    assert hi_wide - lo_wide > hi - lo  # fewer samples, wider interval


def test_distinct_2_detects_collapse():
    varied = ["The film finds its heart late.", "A warm, funny ending redeems it.", "Great cast, weak script."]
    assert distinct_n(varied) == 1.0
    assert distinct_n(["great great great great"] * 3) < 0.2
    assert distinct_n([]) == 0.0


def test_methods_and_their_requests():
    methods = standard_methods("review@3", bon=[16, 1, 4], cbs=SearchSettings(), iro_label="IRO-3", iro_name="iro-3")
    assert [m.name for m in methods] == ["base", "bon-4", "bon-16", "iro-3"]
    template = RolloutConfig(server="http://x", max_tokens=32, samples_per_prompt=5)
    base, bon4, _, iro = (m.rollout_config(template) for m in methods)
    assert base.guidance() is None and base.samples_per_prompt == 1 and base.record_usage
    assert bon4.guidance() == {"value": "review@3", "mode": "bon", "k": 4}
    assert iro.guidance() == {"value": "review@3", "mode": "cbs", "w": 4, "k": 4, "l": 8}
    assert methods[1].file_stem() == "bon-4__review-v3" and methods[0].file_stem() == "base"
    assert methods[-1].settings() == "w=4 k=4 l=8"
    bon_iro = Method("iro", "IRO", "cbs", "review@3", search=SearchSettings(mode="bon", k=8))
    # only the fields bon uses: the server refuses guidance.w and guidance.l with mode bon
    assert bon_iro.rollout_config(template).guidance() == {"value": "review@3", "mode": "bon", "k": 8}
    assert bon_iro.settings() == "BON k=8"  # a mode other than cbs is named
    default = Method("iro", "IRO", "cbs", "review@3")  # no search: cbs with the value's defaults
    assert default.rollout_config(template).guidance() == {"value": "review@3", "mode": "cbs"}
    assert SearchOverrides(w=2).given() == {"w": 2}
    # a template's beta reaches every guided request (pf's resampling temperature), not plain ones
    cold = replace(template, beta=0.1)
    assert default.rollout_config(cold).guidance() == {"value": "review@3", "mode": "cbs", "beta": 0.1}
    assert methods[0].rollout_config(cold).guidance() is None
    with pytest.raises(RolloutError, match="beta must be > 0"):
        RolloutConfig(beta=0.0)


def _record(i: int, text: str, tokens: int, versions=(1,)):
    return {"id": f"p{i}:0", "prompt_id": f"p{i}", "response": text, "response_token_ids": [1] * 5,
            "policy": {"versions": list(versions)}, "usage": {"completion_tokens": tokens}}


def _result(label: str, kind: str, mean: float, tokens: float, n: int = 1, half: float = 0.05) -> MethodResult:
    return MethodResult(name=label.lower(), label=label, kind=kind, settings="",
                        value="v@1" if kind != "base" else None,
                        versions=[1], prompts=10, mean=mean, ci_low=mean - half, ci_high=mean + half, std=0.1,
                        distinct2=0.9, tokens=int(tokens * 10), tokens_per_prompt=tokens, seconds=1.0, n=n)


def test_summary_table_and_plot(tmp_path):
    method = Method("bon-4", "Best-of-4", "bon", "v@1", n=4)
    records = [_record(i, f"answer number {i}", 40 + i) for i in range(4)]
    result = summarize(method, records, [0.5, 0.25, 0.0, 0.25], seconds=3.0)
    assert (result.mean, result.tokens, result.tokens_per_prompt, result.versions) == (0.25, 166, 41.5, [1])
    assert MethodResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    table = markdown_table([result])
    assert "| Best-of-4 | N=4 | v@1 (chain 1) | +0.250 [" in table
    results = [_result("base (N=1)", "base", 0.0, 32), _result("Best-of-4", "bon", 0.3, 128, n=4), result,
               _result("IRO-1", "cbs", 0.35, 200), _result("Best-of-4 (reward)", "oracle", 0.6, 128, n=4)]
    paths = write_results(results, tmp_path / "eval", meta={"task": "t"})
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    assert "IRO-1" in paths["md"].read_text() and len(json.loads(paths["json"].read_text())["results"]) == 5


def test_oracle_best_of_n_picks_the_best_of_the_first_n(tmp_path):
    from trainer.evaluate import oracle_best_of_n
    from trainer.rollout import JsonlAppender, make_record, plan, prompts_from_dicts

    prompts = prompts_from_dicts([{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(3)])
    template = RolloutConfig(server="http://unused", max_tokens=8, seed=1, progress=False)
    words = ["bad", "good", "terrible", "wonderful"]
    with JsonlAppender(tmp_path / "oracle.jsonl") as sink:  # already sampled: no server needed
        for task in plan(prompts, RolloutConfig(server="http://unused", max_tokens=8, seed=1, samples_per_prompt=4)):
            sink.write(make_record(task, model="m", prompt_text="", prompt_token_ids=[1], response=words[task.sample],
                                   response_token_ids=[2, 3], finish_reason="stop", usage={"completion_tokens": 10}))
    results = oracle_best_of_n(prompts, [1, 2, 4], tmp_path, reward="sentiment", template=template)
    assert [(r.name, r.kind, r.n) for r in results] == [("oracle-2", "oracle", 2), ("oracle-4", "oracle", 4)]
    assert results[1].mean > results[0].mean > 0  # best of 2: "good"; best of 4: "wonderful"
    assert (results[0].tokens_per_prompt, results[1].tokens_per_prompt) == (20, 40)


def test_iteration_plot_and_verdict(tmp_path):
    from trainer.plots import plot_iterations

    iro = [_result("IRO-1", "cbs", 0.2, 500), _result("IRO-2", "cbs", 0.3, 500), _result("IRO-3", "cbs", 0.5, 500)]
    baselines = [_result("base (N=1)", "base", 0.0, 32), _result("Best-of-16 (reward)", "oracle", 0.9, 512, n=16),
                 _result("Best-of-16", "bon", 0.35, 512, n=16)]
    path = plot_iterations(iro, baselines, tmp_path / "it.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    lines = verdict(iro, baselines)
    assert lines[0].startswith("- IRO-3 vs Best-of-16: +0.500 vs +0.350 (higher; CIs do not overlap)")
    assert lines[1].startswith("- IRO-3 vs Best-of-16 (reward): +0.500 vs +0.900 (not higher;")
    assert "at least as good" in lines[2] and "at least as good" in lines[3]
    assert "worse" in verdict(iro[::-1], baselines)[2]


def test_loop_presets_and_overrides():
    smoke = LoopConfig.from_preset("smoke", iterations=2, **{"train.max_steps": "3", "bon": "[1, 2]"})
    assert smoke.iterations == 2 and smoke.bon == [1, 2] and smoke.max_tokens == 16
    assert smoke.train["max_steps"] == 3 and smoke.train["batch_size"] == 4
    full = LoopConfig.from_preset("full")
    assert full.search == SearchOverrides() and full.bon == [1, 2, 4, 8, 16]  # the task's search
    assert smoke.search.given() == {"w": 2, "k": 2, "l": 8} and full.max_tokens is None  # max_tokens: the task's
    assert full.rollout_search == SearchSettings(mode="cbs", w=2, k=2, l=8)
    assert LoopConfig().rollout_search == SearchSettings()  # the reference's cbs 4, 4, 8
    with pytest.raises(ValueError, match="unknown loop option 'nope'"):
        LoopConfig.from_preset("smoke", nope=1)
    with pytest.raises(ValueError, match="unknown loop preset"):
        LoopConfig.from_preset("gigantic")
    with pytest.raises(ValueError, match="n_eval_prompts"):
        LoopConfig(n_eval_prompts=0)
    with pytest.raises(ValueError, match="unknown value-training option"):  # refused before any rollout
        LoopConfig.from_preset("smoke", **{"train.lrr": "1"})
    assert smoke.train_config().max_steps == 3
    named = LoopConfig.from_preset("smoke", name="yes", task="review-sentiment")
    assert named.name == "yes"  # names stay text (YAML would read `yes` as true)
    deep = LoopConfig.from_preset("smoke", **{"train_preset": "smoke-lora", "train.model.lora_r": "2"})
    assert deep.train_config().model.lora_r == 2 and deep.train_config().model.lora_alpha == 16


def test_search_sections_and_their_former_flat_keys(tmp_path):
    """`rollout_search` and `search` are SearchSettings / SearchOverrides; the flat keys of earlier
    presets and runs (rollout_w, w, ...) still work, and a `--set` of either kind wins over a preset."""
    dotted = LoopConfig.from_preset("smoke", **{"search.w": "3", "rollout_search.mode": "bon", "rollout_search.k": "6"})
    assert dotted.search.given() == {"w": 3, "k": 2, "l": 8}
    assert dotted.rollout_search == SearchSettings(mode="bon", w=2, k=6, l=8)
    flat = LoopConfig.from_preset("smoke", w="3", rollout_k="6")  # `--set w=3 --set rollout_k=6`
    assert flat.search.given() == {"w": 3, "k": 2, "l": 8} and (flat.rollout_search.k, flat.rollout_search.w) == (6, 2)
    old = tmp_path / "old.yaml"  # a preset written before the sections
    old.write_text("rollout_w: 3\nrollout_k: 1\nrollout_l: 4\nw: 5\niterations: 2\n")
    from_old = LoopConfig.from_preset(str(old))
    assert from_old.rollout_search == SearchSettings(w=3, k=1, l=4) and from_old.search.given() == {"w": 5}
    with pytest.raises(ValueError, match="w=3 and search.w=4 both given"):
        LoopConfig.from_preset("smoke", w="3", **{"search.w": "4"})
    with pytest.raises(ValueError, match="rollout_search.w: Input should be greater than or equal to 1"):
        LoopConfig.from_preset("smoke", rollout_w="0")
    with pytest.raises(ValueError, match="search.mode"):
        LoopConfig.from_preset("smoke", **{"search.mode": "beam"})


def test_a_run_started_with_the_flat_keys_resumes(tmp_path):
    """A `state.json` written before the search sections resumes with the same settings given as sections."""
    config = LoopConfig.from_preset("smoke")
    state = RunState.open(tmp_path / "run", config)
    saved = json.loads(state.path.read_text())
    old = {k: v for k, v in saved["config"].items() if k not in ("search", "rollout_search")}
    old.update(rollout_w=2, rollout_k=2, rollout_l=8, w=2, k=2, l=8)
    state.path.write_text(json.dumps({**saved, "config": old}))
    assert RunState.open(tmp_path / "run", config).run_id == state.run_id
    state.path.write_text(json.dumps({**saved, "config": {**old, "rollout_w": 4}}))
    with pytest.raises(LoopError, match="other settings.*rollout_search"):
        RunState.open(tmp_path / "run", config)


def test_run_state_resumes_and_refuses_other_settings(tmp_path):
    config = LoopConfig.from_preset("smoke")
    state = RunState.open(tmp_path / "run", config)
    state.finish("it1/rollout", {"seconds": 1.0})
    state.set_version(1, 7)
    again = RunState.open(tmp_path / "run", LoopConfig.from_preset("smoke", iterations=5))  # more iterations: fine
    assert again.run_id == state.run_id and again.stage("it1/rollout") == {"seconds": 1.0} and again.version(1) == 7
    with pytest.raises(LoopError, match="other settings.*max_tokens"):
        RunState.open(tmp_path / "run", LoopConfig.from_preset("smoke", max_tokens=64))
