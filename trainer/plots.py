"""PNG plots of evaluation results (matplotlib's Agg canvas: no display, no global pyplot state).

    plot_reward_vs_tokens(results, "reward_vs_tokens.png")     # the test-time scaling picture
    plot_iterations(iro_results, baselines, "reward_per_iteration.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.eval_results import MethodResult

BON_COLOR, IRO_COLOR, BASE_COLOR = "#1f77b4", "#d62728", "#7f7f7f"
DISTILLED_STYLES = [("#2ca02c", "D"), ("#9467bd", "P"), ("#ff7f0e", "*")]
"""(colour, marker) of each distilled policy, in order."""


def _figure(width: float = 6.4, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _errors(results: Sequence[MethodResult]) -> list[list[float]]:
    return [[r.mean - r.ci_low for r in results], [r.ci_high - r.mean for r in results]]


def plot_reward_vs_tokens(results: Sequence[MethodResult], path: str | Path, *, title: str = "") -> Path:
    """Mean reward (95% CI bars) against tokens generated per prompt (log scale): base and
    Best-of-N as one curve, IRO iterations as a second one, distilled policies (plain sampling:
    1x tokens) as a marker each."""
    fig, ax = _figure()
    bon = sorted([r for r in results if r.kind in ("base", "bon")], key=lambda r: r.n)
    iro = [r for r in results if r.kind == "cbs"]
    oracle = sorted([r for r in results if r.kind == "oracle"], key=lambda r: r.n)
    if oracle:
        oracle = [r for r in results if r.kind == "base"][:1] + oracle  # both curves start at N = 1
        ax.errorbar([r.tokens_per_prompt for r in oracle], [r.mean for r in oracle], yerr=_errors(oracle),
                    color=BASE_COLOR, marker="^", capsize=3, linestyle=":", label="Best-of-N ranked by the reward")
    if bon:
        ax.errorbar([r.tokens_per_prompt for r in bon], [r.mean for r in bon], yerr=_errors(bon), color=BON_COLOR,
                    marker="o", capsize=3, label="base / Best-of-N")
        for r in bon:
            ax.annotate(f"N={r.n}", (r.tokens_per_prompt, r.mean), textcoords="offset points", xytext=(4, -12),
                        fontsize=8, color=BON_COLOR)
    if iro:
        ax.errorbar([r.tokens_per_prompt for r in iro], [r.mean for r in iro], yerr=_errors(iro), color=IRO_COLOR,
                    marker="s", capsize=3, linestyle="none", label="IRO (CBS)")
        for r in iro:
            ax.annotate(r.label, (r.tokens_per_prompt, r.mean), textcoords="offset points", xytext=(4, 6),
                        fontsize=8, color=IRO_COLOR)
    for r, (color, marker) in zip([r for r in results if r.kind == "distilled"], DISTILLED_STYLES * len(results)):
        ax.errorbar([r.tokens_per_prompt], [r.mean], yerr=_errors([r]), color=color, marker=marker, markersize=8,
                    capsize=3, linestyle="none", label=f"{r.label}, 1x cost")
    if any(r.tokens_per_prompt > 0 for r in results):
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    return _finish(fig, ax, path, "tokens generated per prompt (all candidates)", "mean reward (95% CI)",
                   title or "Reward vs test-time compute", legend_size=8)


def plot_iterations(iro: Sequence[MethodResult], baselines: Sequence[MethodResult], path: str | Path, *,
                    title: str = "") -> Path:
    """Held-out reward of IRO-t per iteration t (95% CI bars), with base and Best-of-N as
    horizontal reference lines (their tokens per prompt in the legend)."""
    fig, ax = _figure()
    xs = list(range(1, len(iro) + 1))
    if iro:
        ax.errorbar(xs, [r.mean for r in iro], yerr=_errors(iro), color=IRO_COLOR, marker="s", capsize=4,
                    label="IRO-t (CBS)")
    lines = sorted([r for r in baselines if r.kind in ("base", "bon")], key=lambda r: r.n)
    cmap = __import__("matplotlib").colormaps["Blues"]
    for i, r in enumerate(lines):
        color = BASE_COLOR if r.kind == "base" else cmap(0.35 + 0.65 * (i / max(1, len(lines) - 1)))
        ax.axhline(r.mean, color=color, linestyle=":" if r.kind == "base" else "--", linewidth=1.2,
                   label=f"{r.label} ({r.tokens_per_prompt:.0f} tok/prompt)")
    ax.set_xticks(xs or [1])
    return _finish(fig, ax, path, "iteration t", "mean held-out reward (95% CI)",
                   title or "IRO iterations vs Best-of-N", legend_size=7)


def _finish(fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str, *, legend_size: int) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=legend_size)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


__all__ = ["plot_iterations", "plot_reward_vs_tokens"]
