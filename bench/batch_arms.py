"""Interactive latency during a batch, pooled over repeated `bench.batch_api` runs per arm (the
server's batch settings), because one run's p95 is its fourth-slowest of ~90 requests and moves more
between two runs of the same settings than between settings.

Each run's latencies during the batch are divided by that run's own idle p50 (the VM drifts between
runs by 10-30%), then pooled per arm: p50, p90 and p95 of those ratios, the share of requests over
2x idle, and 95% bootstrap intervals (requests resampled, seeded) for p95 and that share.

    python -m bench.batch_arms RUN_DIR [RUN_DIR ...] --out bench/results/batch-api/gaps/arms.md

Each RUN_DIR holds the result.json of one `python -m bench.batch_api ... --probe-gap-s 2 --out-dir RUN_DIR`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from bench.batch_api import percentile as quantile

SLOW = 2.0
"""A request slower than this many times the run's idle p50 counts as slow."""


def arm_of(result: dict[str, Any]) -> tuple:
    """The server settings a run compared: (resume ramp s, max preemptions, guided fraction)."""
    return (result.get("batch_resume_ramp_s"), result.get("batch_max_preemptions"), result.get("guided_fraction"))


def normalized(result: dict[str, Any]) -> list[float]:
    """The run's interactive latencies during the batch, each over the run's idle p50."""
    idle = result["interactive_idle"]["p50_s"]
    return [x / idle for x in result["interactive_during_batch"]["latencies_s"]]


def bootstrap(xs: list[float], stat, *, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    values = sorted(stat([rng.choice(xs) for _ in xs]) for _ in range(rounds))
    return values[int(0.025 * rounds)], values[int(0.975 * rounds) - 1]


def slow_share(xs: list[float]) -> float:
    return sum(x > SLOW for x in xs) / len(xs)


def pool(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm, in the order arms first appear."""
    arms: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        arms.setdefault(arm_of(result), []).append(result)
    rows = []
    for (ramp, preemptions, guided), runs in arms.items():
        per_run = [normalized(run) for run in runs]
        xs = [x for run in per_run for x in run]
        rows.append({"ramp_s": ramp, "max_preemptions": preemptions, "guided_fraction": guided, "runs": len(runs),
                     "requests": len(xs), "p50": quantile(xs, 0.5), "p90": quantile(xs, 0.9),
                     "p95": quantile(xs, 0.95), "p95_ci": bootstrap(xs, lambda s: quantile(s, 0.95)),
                     "slow_share": slow_share(xs), "slow_share_ci": bootstrap(xs, slow_share),
                     "per_run_p95": [round(quantile(run, 0.95), 2) for run in per_run],
                     "tokens_per_s": [r["batch"]["tokens_per_s"] for r in runs],
                     "preemptions": [r["batch"].get("preemptions") for r in runs]})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| resume ramp s | max preemptions | runs | requests | p50 / p90 / p95 vs idle p50 | p95 95% CI | "
             f"over {SLOW:g}x idle [95% CI] | p95 of each run | batch tok/s of each run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ramp_s']} | {r['max_preemptions']} | {r['runs']} | {r['requests']} | "
                     f"{r['p50']:.2f}x / {r['p90']:.2f}x / {r['p95']:.2f}x | {r['p95_ci'][0]:.2f}-{r['p95_ci'][1]:.2f}x | "
                     f"{r['slow_share']:.1%} [{r['slow_share_ci'][0]:.1%}, {r['slow_share_ci'][1]:.1%}] | "
                     f"{', '.join(f'{p:.2f}x' for p in r['per_run_p95'])} | "
                     f"{', '.join(f'{t:.1f}' for t in r['tokens_per_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench.batch_api --out-dir folders")
    parser.add_argument("--out", type=Path, help="Write the table (markdown) and the rows (.json beside it).")
    args = parser.parse_args(argv)
    rows = pool([json.loads((run / "result.json").read_text()) for run in args.runs])
    text = markdown(rows)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
