"""`iro bench`: run the guided-decoding benchmark and print the table (+ JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def bench(quick: bool = typer.Option(False, help="Fewer sequential/reference prompts (same workload otherwise)."),
          json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results here.")):
    """Measure guided decoding against plain vLLM sampling and the reference HF loop."""
    from bench.guided import print_table, run

    results = run(quick=quick, json_path=json_path)
    print_table(results)
    if json_path is None:
        typer.echo(json.dumps({k: v for k, v in results.items() if k != "targets"}, indent=2))
