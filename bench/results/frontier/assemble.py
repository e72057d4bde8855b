"""Write the frontier's table and plots from the arms that finished (`iro frontier` writes them only
at the end of a full sweep; this stop's sweep was stopped before PF at 32x, beta 1). Every row
comes from the arm's own answers in the run folder; nothing is sampled again (the Best-of-N
scores are read from its cache). PF at beta 0.1, 16x and 32x (bench/pf_temperature.py), is added
from its folder.

    python bench/results/frontier/assemble.py RUN_DIR PF_TEMPERATURE_DIR OUT_DIR
    python bench/results/frontier/assemble.py RUN_DIR - OUT_DIR json-extract je@1 32   # no PF folder
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.search_settings import SearchOverrides
from trainer.evaluate import BASE, Method, best_of_n, evaluate, write_results
from trainer.frontier import budget_methods
from trainer.rollout import RolloutConfig
from trainer.tasks import load_task


def main(run: Path, pf_dir: Path | None, out: Path, *, task="review-sentiment", value="rs-builtin@1", n_prompts=64,
         server="http://127.0.0.1:8100") -> None:
    spec = load_task(task)
    template = RolloutConfig(server=server, concurrency=32, seed=0, progress=False, max_tokens=spec.max_tokens,
                             temperature=spec.temperature)
    prompts = spec.items("eval", n_prompts)
    budgets = [1, 2, 4, 8, 16, 32]
    done = [m for m in budget_methods(value, budgets, ["cbs", "pf", "dvts"], template.max_tokens)
            if len((run / f"{m.file_stem()}.jsonl").read_text().splitlines()
                   if (run / f"{m.file_stem()}.jsonl").exists() else []) == n_prompts]
    results = evaluate(prompts, [BASE], run, reward=spec.reward, template=template)
    results += best_of_n(prompts, budgets, run, reward=spec.reward, template=template, value=value)
    results += evaluate(prompts, done, run, reward=spec.reward, template=template)
    from dataclasses import replace

    cold = [Method(f"pf-{b}x-beta0.1", f"PF {b}x, beta 0.1", "cbs", value,
                   search=SearchOverrides(mode="pf", budget_tokens=b * template.max_tokens)) for b in (16, 32)]
    if pf_dir is not None:
        results += evaluate(prompts, cold, pf_dir, reward=spec.reward, template=replace(template, beta=0.1))
    meta = {"task": spec.name, "prompts": len(prompts), "value": value, "reward": spec.reward,
            "max_tokens": template.max_tokens, "temperature": template.temperature, "seed": 0,
            "budgets": f"{budgets} x max_tokens (the arms that finished)"}
    title = f"{spec.name}: reward vs compute"
    paths = write_results(results, out, title=title, meta=meta)  # no wall-time plot: a resumed arm's seconds are 0
    print(paths["md"].read_text())


if __name__ == "__main__":
    run_dir, pf, out, *rest = sys.argv[1:]
    options = dict(zip(("task", "value", "n_prompts"), rest))
    if "n_prompts" in options:
        options["n_prompts"] = int(options["n_prompts"])
    main(Path(run_dir), None if pf == "-" else Path(pf), Path(out), **options)
