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
from dataclasses import replace
from pathlib import Path

from trainer.evaluate import BASE, best_of_n, evaluate, write_results
from trainer.frontier import beta_methods, budget_methods, setup


def main(run: Path, pf_dir: Path | None, out: Path, *, task="review-sentiment", value="rs-builtin@1", n_prompts=64,
         server="http://127.0.0.1:8100") -> None:
    up = setup(task, value, server=server, n_prompts=n_prompts, concurrency=32, progress=False)
    spec, template, prompts = up.spec, up.template, up.prompts
    budgets = [1, 2, 4, 8, 16, 32]
    done = [m for m in budget_methods(value, budgets, ["cbs", "pf", "dvts"], template.max_tokens)
            if len((run / f"{m.file_stem()}.jsonl").read_text().splitlines()
                   if (run / f"{m.file_stem()}.jsonl").exists() else []) == n_prompts]
    results = evaluate(prompts, [BASE], run, reward=spec.reward, template=template)
    results += best_of_n(prompts, budgets, run, reward=spec.reward, template=template, value=value)
    results += evaluate(prompts, done, run, reward=spec.reward, template=template)
    if pf_dir is not None:
        results += evaluate(prompts, beta_methods(value, [16, 32], ["pf"], template.max_tokens, 0.1), pf_dir,
                            reward=spec.reward, template=replace(template, beta=0.1))
    meta = up.meta(budgets=f"{budgets} x max_tokens (the arms that finished)")
    title = f"{spec.name}: reward vs compute"
    paths = write_results(results, out, title=title, meta=meta)  # no wall-time plot: a resumed arm's seconds are 0
    print(paths["md"].read_text())


if __name__ == "__main__":
    run_dir, pf, out, *rest = sys.argv[1:]
    options = dict(zip(("task", "value", "n_prompts"), rest))
    if "n_prompts" in options:
        options["n_prompts"] = int(options["n_prompts"])
    main(Path(run_dir), None if pf == "-" else Path(pf), Path(out), **options)
