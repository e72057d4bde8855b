"""`iro bench`: run the guided-decoding benchmark and print the table (+ JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def bench(quick: bool = typer.Option(False, help="Fewer sequential/reference prompts and 3 rounds of the "
                                                "plain/guided comparison, not 5 (same workload otherwise)."),
          json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
          dtype: str = typer.Option("auto", help="auto | bfloat16 | float32 (engine, values and reference loop; "
                                                 "auto: bf16 where the CPU has AVX512-BF16 or AMX or the GPU supports "
                                                 "it, float32 elsewhere, e.g. AVX2 only)"),
          scorer: bool = typer.Option(False, "--scorer", help="Only the value scorer (no vLLM, no model files): "
                                      "key/value reuse vs recomputation on random-weight values of real shapes."),
          device: Optional[str] = typer.Option(None, help="With --scorer: cpu | cuda (default: cuda if present)"),
          adapter: bool = typer.Option(False, "--adapter", help="Only the cost of serving a LoRA policy: plain n=16 "
                                       "through a policy vs the base model on a server with --policies-dir, and base "
                                       "tok/s with and without a policy registry (two server starts)."),
          cost: bool = typer.Option(False, "--cost", help="Only the per-token cost of each search mode: plain n=16, "
                                    "CBS, PF and DVTS (engine value, 16 samples per step), wall time and CPU "
                                    "core-seconds over the server's processes, and the ratios to CBS."),
          rounds: Optional[int] = typer.Option(None, min=1, help="Rounds of the plain/guided comparison (default 5, "
                                               "3 with --quick; 3 with --cost)."),
          prompts: Optional[int] = typer.Option(None, min=1, max=16, help="With --cost: the first N of the 16 "
                                                "prompts per round (default 16).")):
    """Measure guided decoding against plain vLLM sampling and the reference HF loop (or, with
    --scorer, the value scorer alone, on CPU or CUDA; with --adapter, the cost of serving a LoRA policy;
    with --cost, the CPU and wall cost per generated token of CBS, PF and DVTS)."""
    if dtype not in ("auto", "bfloat16", "float32"):
        raise typer.BadParameter(f"expected auto, bfloat16 or float32, got {dtype!r}", param_hint="--dtype")
    if scorer:
        from bench import scorer as scorer_bench

        args = ["--dtype", dtype] + (["--device", device] if device else []) + (["--json", str(json_path)] if json_path else [])
        args += ["--repeats", "1"] if quick else []
        scorer_bench.main(args)
        return
    if adapter:
        from bench import adapter as adapter_bench

        results = adapter_bench.run(json_path=json_path, dtype=dtype, repeats=1 if quick else 3)
        adapter_bench.print_table(results)
        if json_path is None:
            typer.echo(json.dumps(results, indent=2))
        return
    if device is not None:
        raise typer.BadParameter("--device applies to --scorer only (the engine runs where vLLM runs)", param_hint="--device")
    if prompts is not None and not cost:
        raise typer.BadParameter("--prompts applies to --cost only", param_hint="--prompts")
    if cost:
        from bench.guided import print_cost_table, run_cost

        results = run_cost(rounds=rounds or 3, prompts=prompts or 16, json_path=json_path, dtype=dtype)
        print_cost_table(results)
        if json_path is None:
            typer.echo(json.dumps(results, indent=2))
        return
    from bench.guided import print_table, run

    results = run(quick=quick, json_path=json_path, dtype=dtype, rounds=rounds)
    print_table(results)
    if json_path is None:
        typer.echo(json.dumps({k: v for k, v in results.items() if k != "targets"}, indent=2))
