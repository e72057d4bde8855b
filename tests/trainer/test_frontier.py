"""The frontier sweep's arms and its wall-time plot (no server: the arms' requests and the report)."""

from __future__ import annotations

import doctest

import trainer.frontier
from trainer.eval_results import MethodResult
from trainer.frontier import budget_methods, plot_reward_vs_seconds
from trainer.rollout import RolloutConfig


def test_doctests():
    assert doctest.testmod(trainer.frontier).failed == 0


def test_each_search_arm_asks_for_its_mode_and_budget_only():
    arms = budget_methods("review@2", [1, 2, 8], ["cbs", "pf", "dvts"], 48)
    assert [a.name for a in arms] == ["cbs-2x", "pf-2x", "dvts-2x", "cbs-8x", "pf-8x", "dvts-8x"]
    config = arms[4].rollout_config(RolloutConfig(server="http://x", max_tokens=48))
    assert config.guidance() == {"value": "review@2", "mode": "pf", "budget_tokens": 384}  # widths planned
    assert "384 tokens (8x)" in arms[4].settings()


def test_reward_vs_seconds_plot(tmp_path):
    def result(name, kind, n, mean, seconds):
        return MethodResult(name=name, label=name, kind=kind, settings="", value=None, versions=[], prompts=4,
                            mean=mean, ci_low=mean - 0.1, ci_high=mean + 0.1, std=0.1, distinct2=0.5, tokens=100 * n,
                            tokens_per_prompt=25.0 * n, seconds=seconds, n=n)

    results = [result("base", "base", 1, 0.1, 2.0), result("bon-4", "bon", 4, 0.3, 6.0),
               result("oracle-4", "oracle", 4, 0.5, 6.0), result("pf-4x", "cbs", 4, 0.4, 9.0),
               result("dvts-4x", "cbs", 4, 0.35, 9.5)]
    path = plot_reward_vs_seconds(results, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
