"""The loop's report: `report.md` from plain data about a run (`ReportData`: per-iteration rows,
baselines with the distilled policies, a verdict in plain language). It knows nothing of the loop
object; `IroLoop.report` gathers the data from the run's state.

    path.write_text(render_report(ReportData(...)))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.search_settings import SearchSettings
from trainer.eval_results import MethodResult, markdown_table
from trainer.evaluate import search_text
from trainer.loop_config import LoopConfig


@dataclass(frozen=True)
class IterationRow:
    """One IRO iteration as the report shows it."""

    t: int
    value: str
    """`name@version` of V_t (`name@None` when not published yet)."""
    chain: list[int]
    result: MethodResult | None
    """IRO-t on the held-out prompts (None: not evaluated yet)."""
    rollout_reward: float | None
    heldout_mse: float | None
    spearman: float | None
    seconds: dict[str, float | None]
    """Wall time of each stage: rollout, reward, train, serve, eval (None: not finished)."""


@dataclass(frozen=True)
class ReportData:
    """Everything `report.md` says about a run, as plain data."""

    config: LoopConfig
    value_name: str
    task: str
    task_source: str
    reward: str
    server: str
    registry: str
    run_id: str
    max_tokens: int
    temperature: float
    eval_search: SearchSettings
    """IRO-t's search at evaluation (the task's, with the loop's options over it)."""
    final_value: str
    """`name@version` of the final chain (Best-of-N ranks by it)."""
    total_seconds: float
    rows: list[IterationRow]
    iro: list[MethodResult]
    baselines: list[MethodResult]
    n_train_prompts: int
    """Training prompts the task has for the run (at most the config's `n_train_prompts`)."""
    n_eval_prompts: int
    """Held-out prompts the evaluations ran on."""
    iterations: range
    """The run's own iterations (N+1..N+T when it continues a chain of N)."""
    continued_from: str | None = None
    """`name@version` of the served chain the run continues (`iro loop --continue`), else None."""
    distilled: list[MethodResult] = field(default_factory=list)
    distill_seconds: dict[str, float | None] = field(default_factory=dict)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def verdict(iro: list[MethodResult], baselines: list[MethodResult]) -> list[str]:
    """Plain-language comparisons: final IRO vs the largest Best-of-N, and iteration-over-iteration."""
    lines = []
    ranked = [r for r in baselines if r.kind in ("base", "bon")]
    if iro and ranked:
        last, best = iro[-1], max(ranked, key=lambda r: r.n)
        beats = last.mean > best.mean
        clear = last.ci_low > best.ci_high
        lines.append(f"- {last.label} vs {best.label}: {last.mean:+.3f} vs {best.mean:+.3f} "
                     f"({'higher' if beats else 'not higher'}; {'CIs do not overlap' if clear else 'CIs overlap'}) "
                     f"with {last.tokens_per_prompt:.0f} vs {best.tokens_per_prompt:.0f} tokens per prompt.")
    oracle = [r for r in baselines if r.kind == "oracle"]
    if iro and oracle:  # the paper's Best-of-N: ranked by the reward itself, which IRO never sees at test time
        last, top = iro[-1], max(oracle, key=lambda r: r.n)
        lines.append(f"- {last.label} vs {top.label}: {last.mean:+.3f} vs {top.mean:+.3f} "
                     f"({'higher' if last.mean > top.mean else 'not higher'}; "
                     f"{'CIs do not overlap' if last.ci_low > top.ci_high or top.ci_low > last.ci_high else 'CIs overlap'})"
                     f" with {last.tokens_per_prompt:.0f} vs {top.tokens_per_prompt:.0f} tokens per prompt.")
    for prev, cur in zip(iro, iro[1:]):
        lines.append(f"- {cur.label} vs {prev.label}: {cur.mean - prev.mean:+.3f} "
                     f"({'at least as good' if cur.mean >= prev.mean else 'worse'}).")
    return lines


def closing_note(iro: list[MethodResult], baselines: list[MethodResult], seconds: float) -> list[str]:
    """One line with the figures that matter: held-out reward of base, the largest Best-of-N (ranked
    by the value and by the reward) and every IRO-t, and the loop's wall time."""
    def find(kind: str) -> MethodResult | None:
        return max((r for r in baselines if r.kind == kind), key=lambda r: r.n, default=None)

    parts = [f"base {r.mean:+.3f}" for r in baselines if r.kind == "base"]
    parts += [f"{r.label} {r.mean:+.3f}" for r in (find("bon"), find("oracle")) if r is not None]
    parts += [f"{r.label} {r.mean:+.3f}" for r in baselines if r.kind == "distilled"]
    parts += [f"{r.label} {r.mean:+.3f}" for r in iro]
    return [f"- held-out reward: {', '.join(parts)}; wall time {seconds / 60:.1f} min."] if parts else []


def distill_data(config: LoopConfig, last: int) -> str:
    """What the distilled policies learned from, as the report says it.

    >>> distill_data(LoopConfig(distill_from={"mode": "pf", "k": 16}), 3)
    "the final policy's own rollouts of the training prompts (PF k=16 l=8 over V_1..V_3)"
    >>> distill_data(LoopConfig(), 3), distill_data(LoopConfig(distill_from="base"), 3)
    ("iteration 3's rollouts", "the base model's samples of the training prompts")
    """
    if config.distill_from == "last":
        return f"iteration {last}'s rollouts"
    if config.distill_from == "base":
        return "the base model's samples of the training prompts"
    return (f"the final policy's own rollouts of the training prompts ({search_text(config.distill_from)} over "
            f"V_1..V_{last})")


def distill_verdict(iro: list[MethodResult], baselines: list[MethodResult], distilled: list[MethodResult],
                    seconds: dict[str, float] | None = None) -> list[str]:
    """Per distilled policy: the fraction of the final IRO's gain over base it recovers at 1x cost,
    its distinct-2 against base's, its KL to base and the distillation's wall time.

    >>> r = lambda label, kind, mean, d2: MethodResult(label, label, kind, "", None, [], 4, mean, mean, mean, 0.0,
    ...                                                d2, 40, 10.0, 1.0)
    >>> distill_verdict([r("IRO-3", "cbs", 0.6, 0.5)], [r("base (N=1)", "base", 0.2, 0.5)],
    ...                 [r("distilled (APA)", "distilled", 0.5, 0.45)], {"distilled (APA)": 90})[0].split("; ")[:2]
    ["- distilled (APA): +0.500 at 10 tokens/prompt recovers 75% of IRO-3's gain over base (+0.600 at 10 tokens/prompt)", 'distinct-2 0.450 (-10% vs base 0.500)']
    """
    base = next((r for r in baselines if r.kind == "base"), None)
    if base is None or not distilled:
        return []
    last = iro[-1] if iro else None
    lines = []
    for d in distilled:
        gain = last.mean - base.mean if last is not None else 0.0
        if last is not None and gain > 0:
            recovered = f"recovers {(d.mean - base.mean) / gain:.0%} of {last.label}'s gain over base " \
                        f"({last.mean:+.3f} at {last.tokens_per_prompt:.0f} tokens/prompt)"
        else:
            recovered = f"vs base {base.mean:+.3f} ({last.label if last else 'IRO'} did not gain over base)"
        d2 = (d.distinct2 / base.distinct2 - 1) if base.distinct2 else float("nan")
        kl = "-" if d.kl_to_base is None else f"{d.kl_to_base:.4f}"
        wall = (seconds or {}).get(d.label)
        lines.append(f"- {d.label}: {d.mean:+.3f} at {d.tokens_per_prompt:.0f} tokens/prompt {recovered}; "
                     f"distinct-2 {d.distinct2:.3f} ({d2:+.0%} vs base {base.distinct2:.3f}); KL to base {kl}"
                     + (f"; distillation {wall:.0f} s." if wall is not None else "."))
    return lines


def render_report(data: ReportData) -> str:
    """`report.md` of a run."""
    d, c = data, data.config
    rows = ["| t | value (chain) | held-out reward [95% CI] | distinct-2 | tokens/prompt | train-rollout reward | "
            "value held-out MSE / Spearman | rollout s | reward s | train s | publish→serve s | eval s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in d.rows:
        result = row.result
        cells = [str(row.t), f"{row.value} ({','.join(map(str, row.chain))})", result.ci_text() if result else "-",
                 _fmt(result and result.distinct2, ".3f"), _fmt(result and result.tokens_per_prompt, ".0f"),
                 _fmt(row.rollout_reward, "+.3f"), f"{_fmt(row.heldout_mse, '.4f')} / {_fmt(row.spearman, '.3f')}"]
        cells += [_seconds(row.seconds.get(s)) for s in ("rollout", "reward", "train", "serve", "eval")]
        rows.append("| " + " | ".join(cells) + " |")
    distilled = list(d.distilled)
    n = d.iterations.start - 1
    continued = ([f"- continues the served chain {d.continued_from}: V_1..V_{n} are that chain's; IRO-{n}, evaluated "
                  f"here on this run's held-out prompts, is the 'before'; this run trains "
                  f"{', '.join(f'V_{t}' for t in d.iterations)}"] if d.continued_from else [])
    lines = [
        f"# IRO loop: value `{d.value_name}` on task `{d.task}` ({d.task_source})", "",
        f"- server: {d.server}; registry: {d.registry}; run: {d.run_id}", *continued,
        f"- {c.iterations} iteration{'s' if c.iterations != 1 else ''}; {d.n_train_prompts} training prompts x {c.samples_per_prompt} samples per "
        f"iteration (guided rollouts: {search_text(c.rollout_search, mode=True)}); {d.n_eval_prompts} "
        f"held-out prompts; max_tokens {d.max_tokens}, temperature {d.temperature}; value training preset "
        f"`{c.train_preset}` {c.train or ''}",
        f"- reward: `{d.reward}`; IRO-t = {search_text(d.eval_search, mode=True)} over V_1..V_t; Best-of-N ranked by "
        f"{d.final_value}; tokens = completion tokens generated per prompt, every candidate included",
        f"- wall time of all stages: {d.total_seconds:.0f} s",
        *([f"- distilled: LoRA policies trained by `iro distill` ({', '.join(c.distill)}, preset "
           f"`{c.distill_preset}` {c.distill_options or ''}) on {distill_data(c, d.iterations[-1])}, sampled plainly "
           "(N=1) through their model names; KL to base = KL(policy || base) per response token on the "
           "distillation's held-out rollouts"] if distilled else []), "",
        "## Held-out reward per iteration", "", *rows, "",
        f"## Baselines (held-out prompts, value {d.final_value})", "", markdown_table(d.baselines + distilled + d.iro),
        "",
        "## Verdict", "", *closing_note(d.iro, d.baselines + distilled, d.total_seconds), *verdict(d.iro, d.baselines),
        *distill_verdict(d.iro, d.baselines, distilled, d.distill_seconds), "",
        "![reward vs tokens](reward_vs_tokens.png)", "", "![reward per iteration](reward_per_iteration.png)", "",
    ]
    return "\n".join(lines)


__all__ = ["IterationRow", "ReportData", "closing_note", "distill_verdict", "render_report", "verdict"]
