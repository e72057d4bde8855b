"""The reward-vs-compute frontier: every way of spending test-time compute on the same held-out
prompts, at token budgets from 1x to 32x what one plain answer may cost (max_tokens).

    base        plain sampling (1x)
    bon-N       Best-of-N ranked by the value (N = the budget multiple; one shared set of samples)
    oracle-N    Best-of-N ranked by the reward itself (the headroom a value could reach)
    <mode>-Bx   a guided search (cbs, pf, dvts) with `guidance.budget_tokens = B x max_tokens` and
                nothing else set: the server plans its widths from the budget (server.guided.plan_widths)

Reported per arm: mean reward with a 95% bootstrap CI, distinct-2, tokens and wall seconds per
prompt; `eval.json`, `eval.md`, `reward_vs_tokens.png` (trainer.evaluate.write_results) and
`reward_vs_seconds.png` in the output folder. Against a running server:

    iro frontier --task review-sentiment --value review --out runs/frontier --budgets 1,4,16

"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from common.search_settings import SEARCH_MODES, SearchOverrides
from trainer.eval_results import MethodResult
from trainer.evaluate import BASE, Method, best_of_n, evaluate, resolve_value, write_results

SWEEP_MODES = tuple(m for m in SEARCH_MODES if m != "bon")
"""The chunked searches (Best-of-N is its own arm family)."""
MODE_STYLES = {"cbs": ("#d62728", "s"), "pf": ("#2ca02c", "D"), "dvts": ("#9467bd", "P")}


@dataclasses.dataclass(frozen=True)
class BudgetMethod(Method):
    """A guided search given only its mode and a token budget."""

    def settings(self) -> str:
        return f"{self.search.mode}, budget {self.search.budget_tokens} tokens ({self.n}x), widths planned"


def budget_methods(value: str, budgets: Sequence[int], modes: Sequence[str], max_tokens: int) -> list[Method]:
    """One arm per (mode, budget multiple > 1).

    >>> [m.name for m in budget_methods("v", [1, 4], ["cbs", "pf"], 32)]
    ['cbs-4x', 'pf-4x']
    >>> budget_methods("v", [4], ["pf"], 32)[0].search.given()
    {'mode': 'pf', 'budget_tokens': 128}
    """
    return [BudgetMethod(f"{mode}-{b}x", f"{mode.upper()} {b}x", "cbs", value, n=b,
                         search=SearchOverrides(mode=mode, budget_tokens=b * max_tokens))
            for b in sorted(set(budgets)) if b > 1 for mode in modes]


def beta_methods(value: str, budgets: Sequence[int], modes: Sequence[str], max_tokens: int,
                 beta: float) -> list[Method]:
    """`budget_methods` sent with `guidance.beta` = `beta` (pf: its resampling temperature), named apart.

    >>> [m.name for m in beta_methods("v", [16], ["pf"], 32, 0.1)]
    ['pf-16x-beta0.1']
    """
    return [dataclasses.replace(m, name=f"{m.name}-beta{beta:g}", label=f"{m.label}, beta {beta:g}")
            for m in budget_methods(value, budgets, modes, max_tokens)]


@dataclasses.dataclass(frozen=True)
class SweepSetup:
    """What every arm of a sweep shares: the task, the pinned value, the request template, the prompts."""

    spec: Any
    value: str
    template: Any
    prompts: list

    def meta(self, **extra: Any) -> dict[str, Any]:
        """The report's header fields (`write_results(meta=...)`), `extra` after them."""
        t = self.template
        return {"task": self.spec.name, "prompts": len(self.prompts), "value": self.value, "reward": self.spec.reward,
                "max_tokens": t.max_tokens, "temperature": t.temperature, "seed": t.seed, **extra}


def setup(task: str, value: str, *, server: Optional[str] = None, api_key: Optional[str] = None,
          n_prompts: int = 16, concurrency: int = 8, seed: int = 0, max_tokens: Optional[int] = None,
          progress: bool = True) -> SweepSetup:
    """Load `task`, pin `value` to the version served now (`name` -> `name@N`) and build the template
    every arm samples with (the task's temperature and max_tokens unless given)."""
    import os

    from trainer.rollout import RolloutConfig
    from trainer.rollout_config import server_url
    from trainer.tasks import load_task

    spec = load_task(task)  # a TaskError is a ValueError: `iro frontier` reports it with exit code 2
    url, key = server_url(server), api_key or os.environ.get("IRO_API_KEY")
    template = RolloutConfig(server=url, api_key=key, concurrency=concurrency, seed=seed, progress=progress,
                             max_tokens=max_tokens or spec.max_tokens, temperature=spec.temperature)
    return SweepSetup(spec, resolve_value(url, key, value), template, spec.items("eval", n_prompts))


def sweep(prompts, out: str | Path, *, value: str, reward: str, template, budgets: Sequence[int] = (1, 2, 4, 8, 16, 32),
          modes: Sequence[str] = SWEEP_MODES, oracle: bool = True) -> list[MethodResult]:
    """Every arm on `prompts` (resumable: each arm's answers land in `out`); base first."""
    results = evaluate(prompts, [BASE], out, reward=reward, template=template)
    if max(budgets) > 1:
        results += best_of_n(prompts, budgets, out, reward=reward, template=template, value=value, oracle=oracle)
    results += evaluate(prompts, budget_methods(value, budgets, modes, template.max_tokens), out, reward=reward,
                        template=template)
    return results


def plot_reward_vs_seconds(results: Sequence[MethodResult], path: str | Path, *, title: str = "") -> Path:
    """Mean reward (95% CI) against wall seconds per prompt, one curve per arm family."""
    from trainer.plots import BASE_COLOR, BON_COLOR, _errors, _figure

    fig, ax = _figure()
    families = {"Best-of-N (value)": [r for r in results if r.kind in ("base", "bon")],
                "Best-of-N (reward)": [r for r in results if r.kind == "oracle"]}
    for mode in SWEEP_MODES:
        families[mode.upper()] = [r for r in results if r.name.startswith(f"{mode}-")]
    styles = {"Best-of-N (value)": (BON_COLOR, "o"), "Best-of-N (reward)": (BASE_COLOR, "^")} | {
        m.upper(): s for m, s in MODE_STYLES.items()}
    for label, rs in families.items():
        rs = sorted(rs, key=lambda r: r.n)
        if rs:
            color, marker = styles[label]
            ax.errorbar([r.seconds / max(1, r.prompts) for r in rs], [r.mean for r in rs], yerr=_errors(rs),
                        color=color, marker=marker, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds per prompt (log)")
    ax.set_ylabel("mean reward (95% CI)")
    ax.set_title(title or "reward vs wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def run(*, task: str, out: Path, value: str, server: Optional[str] = None, api_key: Optional[str] = None,
        n_prompts: int = 16, budgets: Sequence[int] = (1, 2, 4, 8, 16, 32), modes: Sequence[str] = SWEEP_MODES,
        max_tokens: Optional[int] = None, concurrency: int = 8, seed: int = 0, oracle: bool = True,
        progress: bool = True) -> dict[str, Path]:
    """Sweep base, Best-of-N (value and reward) and the search `modes` over `budgets` (multiples of
    max_tokens) on `task`'s first `n_prompts` held-out prompts against the server at `server`;
    write the report into `out` and return its paths (`iro frontier` parses the options)."""
    up = setup(task, value, server=server, api_key=api_key, n_prompts=n_prompts, concurrency=concurrency, seed=seed,
               max_tokens=max_tokens, progress=progress)
    spec, template = up.spec, up.template
    multiples = sorted(set(budgets))
    results = sweep(up.prompts, out, value=up.value, reward=spec.reward, template=template, budgets=multiples,
                    modes=modes, oracle=oracle)
    meta = up.meta(budgets=f"{multiples} x max_tokens")
    title = f"{spec.name}: reward vs compute"
    paths = write_results(results, out, title=title, meta=meta)
    paths["png_seconds"] = plot_reward_vs_seconds(results, Path(out) / "reward_vs_seconds.png", title=title)
    with paths["md"].open("a") as f:
        f.write(f"![reward vs wall time]({paths['png_seconds'].name})\n")
    return paths
