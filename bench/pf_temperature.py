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

    from trainer.evaluate import evaluate, write_results
    from trainer.frontier import beta_methods, setup

    up = setup(args.task, args.value, server=args.server, n_prompts=args.n_prompts, concurrency=args.concurrency,
               seed=args.seed)
    spec, template = up.spec, up.template
    results = []
    for beta in (float(b) for b in args.betas.split(",")):
        methods = beta_methods(up.value, [args.budget], args.modes.split(","), template.max_tokens, beta)
        results += evaluate(up.prompts, methods, args.out, reward=spec.reward, template=replace(template, beta=beta))
    meta = up.meta(budget=f"{args.budget} x max_tokens = {args.budget * template.max_tokens} tokens",
                   betas=args.betas,
                   command="python -m bench.pf_temperature " + " ".join(argv if argv is not None else sys.argv[1:]))
    paths = write_results(results, args.out, title=f"{spec.name}: PF's resampling temperature", meta=meta)
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
