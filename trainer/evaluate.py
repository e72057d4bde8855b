"""Evaluation: base sampling vs Best-of-N vs IRO (chunk-level beam search over the value chain).

Each method answers the same held-out prompts once; answers are labelled by the task's reward.
Reported per method: mean reward with a 95% bootstrap confidence interval, distinct-2 over all
answers (a collapse check), and tokens generated per prompt (the server's `usage`, which counts
every candidate a search sampled: the cost axis of the paper's test-time scaling picture).

    base      plain sampling from the frozen model (N = 1, no value)
    bon-N     N samples from the base model, the one the value chain scores highest (`best_of_n`: one set
              of max(N) samples per prompt shared by every N, scored through POST /v1/score)
    oracle-N  N samples from the base model, the one the reward scores highest (an upper bound for bon-N;
              the paper's Best-of-N ranks with its reward model)
    iro       chunk-level beam search guided by the value chain (guidance mode cbs, w/k/l: a SearchSettings)
    distilled plain sampling (N = 1) from a distilled policy adapter, requested by its model name

    methods = standard_methods("review@3", bon=[1, 2, 4, 8, 16])
    results = evaluate(load_task("review-sentiment").items("eval", 32), methods, "eval/", reward="sentiment",
                       template=RolloutConfig(server="http://127.0.0.1:8000", max_tokens=48))
    write_markdown(results, "eval/eval.md")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from common.search_settings import SearchOverrides, SearchSettings
from trainer.eval_results import MethodResult, markdown_table
from trainer.rollout import PromptItem, RolloutConfig, RolloutError, read_records, run_rollout, write_atomic

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- metrics
def mean_ci(values: Sequence[float], confidence: float = 0.95, n_boot: int = 2000,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap confidence interval (seeded, so a
    report is reproducible). A single value has a zero-width interval.

    >>> mean_ci([1.0, 1.0, 1.0])
    (1.0, 1.0, 1.0)
    >>> m, lo, hi = mean_ci([0.0, 1.0] * 50); round(m, 2), lo < m < hi
    (0.5, True)
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return mean, float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


_WORD = re.compile(r"\w+|[^\w\s]")


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over every text (lower-cased words and punctuation);
    near 0 means the answers collapsed onto the same phrases.

    >>> distinct_n(["a b c", "a b d"])
    0.75
    >>> distinct_n(["same same", "same same"])
    0.5
    """
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = _WORD.findall(text.lower())
        grams += [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One way to answer a prompt."""

    name: str
    """File-safe id, e.g. `base`, `bon-4`, `iro-2`."""
    label: str
    """Human name, e.g. `Best-of-4`, `IRO-2`."""
    kind: Literal["base", "bon", "cbs", "oracle", "distilled"]
    value: str | None = None
    """Value chain for bon/cbs (`name@N` pins a version)."""
    n: int = 1
    """Samples per prompt that a bon answer chooses from (1 for base)."""
    search: SearchSettings | SearchOverrides | None = None
    """The search of an IRO (`cbs`) method: complete settings pin every field, overrides only theirs
    (the value's defaults for the rest); None: cbs with the value's defaults."""
    model: str | None = None
    """Model id to request (a distilled policy's name); None: the server's base model."""

    def rollout_config(self, template: RolloutConfig) -> RolloutConfig:
        if self.kind in ("base", "distilled"):
            guided = dict(value=None, search=None)
        elif self.kind == "bon":
            guided = dict(value=self.value, search=SearchOverrides(mode="bon", k=self.n))
        else:
            guided = dict(value=self.value, search=self.search or SearchOverrides(mode="cbs"))
        model = {"model": self.model} if self.model is not None else {}
        return dataclasses.replace(template, samples_per_prompt=1, record_usage=True, **guided, **model)

    def file_stem(self) -> str:
        """`name`, plus the value spec when there is one (`bon-4__review-v3`)."""
        if self.value is None:
            return self.name
        return f"{self.name}__{self.value.replace('@', '-v')}"

    def settings(self) -> str:
        if self.kind == "cbs":
            return search_text(self.search) if self.search is not None else "the value's defaults"
        if self.kind == "oracle":
            return f"N={self.n}, ranked by the reward"
        if self.kind == "distilled":
            return f"N=1, model {self.model}"
        return f"N={self.n}"


def search_text(search: SearchSettings | SearchOverrides, *, mode: bool = False) -> str:
    """A search as reports write it: w, k and l, other fields where they differ from their defaults
    (fields overrides leave unset are not written), the mode first when `mode` is true or it is not cbs.

    >>> search_text(SearchSettings(w=2)), search_text(SearchSettings(), mode=True), search_text(SearchOverrides(k=3))
    ('w=2 k=4 l=8', 'CBS w=4 k=4 l=8', 'k=3')
    """
    fields = search.for_request() if isinstance(search, SearchSettings) else search.model_dump(exclude_none=True)
    defaults = SearchSettings().model_dump()
    kind = fields.pop("mode", "cbs")
    text = " ".join(f"{k}={v}" for k, v in fields.items() if k in ("w", "k", "l") or v != defaults.get(k))
    return f"{kind.upper()} {text}" if mode or kind != "cbs" else text


BASE = Method("base", "base (N=1)", "base")
"""Plain sampling from the frozen model."""


def standard_methods(value: str | None, *, bon: Sequence[int] = (1, 2, 4, 8, 16), cbs: SearchSettings = SearchSettings(),
                     iro_label: str = "IRO", iro_name: str = "iro", include_iro: bool = True) -> list[Method]:
    """base (N=1), Best-of-N for every N > 1 in `bon`, and IRO (CBS), the last two only with a value.

    >>> [m.name for m in standard_methods("v", bon=[1, 4])]
    ['base', 'bon-4', 'iro']
    >>> [m.name for m in standard_methods(None)]
    ['base']
    """
    methods = [BASE]
    if value is None:
        return methods
    for n in sorted(set(bon)):
        if n < 1:
            raise ValueError(f"Best-of-N needs N >= 1, got {n}")
        if n > 1:
            methods.append(Method(f"bon-{n}", f"Best-of-{n}", "bon", value, n=n))
    if include_iro:
        methods.append(Method(iro_name, iro_label, "cbs", value, search=cbs))
    return methods


def summarize(method: Method, records: Sequence[dict], rewards: Sequence[float], seconds: float) -> MethodResult:
    """A `MethodResult` from labelled evaluation records (with `usage`)."""
    mean, lo, hi = mean_ci(rewards)
    tokens = sum(int((r.get("usage") or {}).get("completion_tokens") or len(r["response_token_ids"])) for r in records)
    versions = sorted({v for r in records for v in r["policy"]["versions"]})
    return MethodResult(
        name=method.name, label=method.label, kind=method.kind, settings=method.settings(), value=method.value,
        versions=versions, prompts=len(records), mean=mean, ci_low=lo, ci_high=hi,
        std=float(np.std(rewards)) if rewards else float("nan"), distinct2=distinct_n(r["response"] for r in records),
        tokens=tokens, tokens_per_prompt=tokens / len(records) if records else 0.0, seconds=seconds, n=method.n)


def evaluate_method(method: Method, prompts: list[PromptItem], out_dir: str | Path, *, reward: str,
                    template: RolloutConfig) -> MethodResult:
    """Answer `prompts` with `method` (resumable: `out_dir/<name>.jsonl`), label, summarise."""
    from trainer.rewards import label_records, parse_reward

    config = method.rollout_config(template)
    path = Path(out_dir) / f"{method.file_stem()}.jsonl"
    stats = run_rollout(prompts, path, config)
    if not stats.complete:
        raise RolloutError(f"{method.label}: {stats.failed} of {stats.total} requests failed "
                           f"(first: {stats.errors[0] if stats.errors else '?'}); re-run to resume")
    wanted = {p.id for p in prompts}
    records = [r for r in read_records(path) if r["prompt_id"] in wanted]
    labelled = label_records(records, parse_reward(reward))
    rewards = [r["reward"] for r in labelled]
    result = summarize(method, labelled, rewards, stats.seconds)
    log.info("%s: reward %s, distinct-2 %.3f, %.0f tokens/prompt", method.label, result.ci_text(), result.distinct2,
             result.tokens_per_prompt)
    return result


def best_of_n(prompts: list[PromptItem], ns: Sequence[int], out_dir: str | Path, *, reward: str,
              template: RolloutConfig, value: str | None = None, oracle: bool = True) -> list[MethodResult]:
    """Best-of-N from one set of max(N) base samples per prompt, for every N > 1 in `ns`: the best
    of the first N by the value chain `value` (through `POST /v1/score`; the same choice as the
    server's guidance mode `bon`) and, with `oracle`, by the reward itself (the paper's baseline,
    which ranks with its reward model: the upper bound for what a value can pick out of N).
    Tokens count the N samples. Sharing the samples makes every N and both rankings comparable
    and costs one generation pass instead of one per N.

    Samples live in `out_dir/oracle.jsonl` (resumable); value scores in `out_dir/bon-scores__<value>.json`.
    """
    from trainer.rewards import label_records, parse_reward

    n_max = max(ns)
    config = dataclasses.replace(template, samples_per_prompt=n_max, record_usage=True, value=None, search=None)
    path = Path(out_dir) / "oracle.jsonl"
    stats = run_rollout(prompts, path, config)
    if not stats.complete:
        raise RolloutError(f"Best-of-N samples: {stats.failed} of {stats.total} requests failed; re-run to resume")
    wanted = {p.id for p in prompts}
    records = label_records([r for r in read_records(path) if r["prompt_id"] in wanted and r["sample"] < n_max],
                            parse_reward(reward))
    by_prompt: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["sample"]):
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    # (kind, label suffix, value, its chain versions, score per record id)
    rankings: list[tuple[str, str, str | None, list[int], dict[str, float]]] = []
    if value is not None:
        scores, versions = value_scores(by_prompt, value, Path(out_dir) / f"bon-scores__{value.replace('@', '-v')}.json",
                                        template)
        rankings.append(("bon", "", value, versions, scores))
    if oracle:
        rankings.append(("oracle", " (reward)", None, [], {r["id"]: r["reward"] for r in records}))
    results = []
    for kind, suffix, ranked_by, versions, score in rankings:
        for n in sorted(set(ns) - {1}):  # N = 1 is the base method itself (same seeds, same samples)
            picked = [max(rs[:n], key=lambda r: score[r["id"]]) for rs in by_prompt.values()]
            tokens = sum(int(r["usage"]["completion_tokens"]) for rs in by_prompt.values() for r in rs[:n])
            method = Method(f"{kind}-{n}", f"Best-of-{n}{suffix}", kind, ranked_by, n=n)
            result = summarize(method, picked, [r["reward"] for r in picked], stats.seconds * n / n_max)
            result.tokens, result.tokens_per_prompt, result.versions = tokens, tokens / len(picked), versions
            results.append(result)
    return results


def value_scores(by_prompt: dict[str, list[dict]], value: str, path: Path,
                 template: RolloutConfig) -> tuple[dict[str, float], list[int]]:
    """Chain scores of every sample (record id -> score; each prompt's samples scored as one set, as
    the server's `bon` mode does) and the chain's versions, through `POST /v1/score`. Cached in
    `path` (written atomically), so a resumed evaluation scores only what is missing."""
    from clients import IroClient

    saved = json.loads(path.read_text()) if path.exists() else {}
    scores: dict[str, float] = saved.get("scores", {})
    versions: list[int] = saved.get("versions", [])
    todo = [rs for rs in by_prompt.values() if any(r["id"] not in scores for r in rs)]
    if not todo:
        return scores, versions
    with IroClient(template.server, api_key=template.api_key) as client:
        for rs in todo:
            scorable = [r for r in rs if r["response"]]
            scores.update({r["id"]: float("-inf") for r in rs})  # an empty answer never wins
            if scorable:
                where = {"messages": rs[0]["messages"]} if rs[0].get("messages") else {"prompt": rs[0]["prompt"]}
                got = client.score(value, [r["response"] for r in scorable], **where)
                scores.update({r["id"]: s for r, s in zip(scorable, got.scores)})
                versions = got.versions
    write_atomic(path, json.dumps({"value": value, "versions": versions, "scores": scores}))
    return scores, versions


def oracle_best_of_n(prompts: list[PromptItem], ns: Sequence[int], out_dir: str | Path, *, reward: str,
                     template: RolloutConfig) -> list[MethodResult]:
    """Best-of-N ranked by the reward itself (see `best_of_n`)."""
    return best_of_n(prompts, ns, out_dir, reward=reward, template=template)


def evaluate(prompts: list[PromptItem], methods: Sequence[Method], out_dir: str | Path, *, reward: str,
             template: RolloutConfig) -> list[MethodResult]:
    """Every method on the same prompts; rollouts land in `out_dir`, one JSONL file per method."""
    return [evaluate_method(m, prompts, out_dir, reward=reward, template=template) for m in methods]


# --------------------------------------------------------------------------- reports
def write_results(results: Sequence[MethodResult], out_dir: str | Path, *, title: str = "Evaluation",
                  meta: dict | None = None) -> dict[str, Path]:
    """`eval.json`, `eval.md` and `reward_vs_tokens.png` in `out_dir`; returns their paths."""
    from trainer.plots import plot_reward_vs_tokens

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "md": out / "eval.md", "png": out / "reward_vs_tokens.png"}
    paths["json"].write_text(json.dumps({"meta": meta or {}, "results": [r.to_dict() for r in results]}, indent=2))
    header = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in (meta or {}).items()] + [""]
    paths["md"].write_text("\n".join(header + [markdown_table(results), "", f"![reward vs tokens]({paths['png'].name})",
                                               ""]))
    plot_reward_vs_tokens(results, paths["png"], title=title)
    return paths


__all__ = ["BASE", "Method", "MethodResult", "best_of_n", "distinct_n", "evaluate", "evaluate_method", "markdown_table",
           "mean_ci", "oracle_best_of_n", "search_text", "standard_methods", "summarize", "value_scores",
           "write_results"]


def resolve_value(server: str, api_key: str | None, spec: str) -> str:
    """`name` -> `name@N` with N the version the server serves now (asked through /v1/score),
    so an evaluation keeps using one version; `name@N` is returned as is."""
    import httpx

    if "@" in spec:
        return spec
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(f"{server.rstrip('/')}/v1/score", headers=headers, timeout=120,
                   json={"value": spec, "prompt": "Hello", "responses": ["Hi"]})
    if r.status_code != 200:
        raise ValueError(f"value {spec!r}: the server answered {r.status_code}: {r.text[:300]}")
    return f"{spec}@{r.json()['versions'][-1]}"
