"""Particle filtering's resampling temperature, measured: PF at one token budget with
`guidance.beta` (softmax(V / beta) over the particles) at several temperatures, on the same
held-out prompts, sampling settings and seed as `iro frontier`, so its rows sit beside the
frontier's CBS/PF/DVTS arms of that budget.

    iro serve --values-dir VALUES &
    python -m bench.pf_temperature --task review-sentiment --value rs@1 --budget 16 --betas 1,0.25,0.1,0.05 \
        --n-prompts 64 --out runs/pf-temperature

beta 1 is what a request gets when it sets none (a value's registry beta); the frontier's PF arms ran
with it. Writes eval.json, eval.md and a reward-vs-tokens plot into --out (resumable per arm).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="review-sentiment")
    parser.add_argument("--value", required=True, help='"name" (the version served now) or "name@N".')
    parser.add_argument("--server", default=None)
    parser.add_argument("--budget", type=int, default=16, help="Token budget as a multiple of max_tokens.")
    parser.add_argument("--betas", default="1,0.25,0.1,0.05")
    parser.add_argument("--modes", default="pf", help="Modes to run at each beta (cbs/dvts rank by the chain "
                                                       "score, which one beta scales without reordering).")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from common.search_settings import SearchOverrides
    from trainer.evaluate import Method, evaluate, resolve_value, write_results
    from trainer.rollout import RolloutConfig
    from trainer.rollout_config import server_url
    from trainer.tasks import load_task

    spec = load_task(args.task)
    url, key = server_url(args.server), os.environ.get("IRO_API_KEY")
    value = resolve_value(url, key, args.value)
    template = RolloutConfig(server=url, api_key=key, concurrency=args.concurrency, seed=args.seed,
                             max_tokens=spec.max_tokens, temperature=spec.temperature)
    prompts = spec.items("eval", args.n_prompts)
    budget = args.budget * template.max_tokens
    results = []
    for beta in (float(b) for b in args.betas.split(",")):
        for mode in args.modes.split(","):
            method = Method(f"{mode}-{args.budget}x-beta{beta:g}", f"{mode.upper()} {args.budget}x, beta {beta:g}",
                            "cbs", value, search=SearchOverrides(mode=mode, budget_tokens=budget))
            results += evaluate(prompts, [method], args.out, reward=spec.reward, template=replace(template, beta=beta))
    meta = {"task": spec.name, "prompts": len(prompts), "value": value, "reward": spec.reward,
            "max_tokens": template.max_tokens, "temperature": template.temperature, "seed": args.seed,
            "budget": f"{args.budget} x max_tokens = {budget} tokens", "betas": args.betas,
            "command": "python -m bench.pf_temperature " + " ".join(argv if argv is not None else sys.argv[1:])}
    paths = write_results(results, args.out, title=f"{spec.name}: PF's resampling temperature", meta=meta)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
