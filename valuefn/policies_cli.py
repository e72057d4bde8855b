"""`iro policies ...`: inspect and change the policy registry (distilled LoRA adapters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Distilled policy adapters in the registry.")

PoliciesDir = typer.Option(None, "--policies-dir", help="Registry folder (env IRO_POLICIES_DIR; default $IRO_HOME/policies).")


def _registry(policies_dir: Optional[Path]):
    from registry.policies import PolicyRegistry, default_policies_dir

    return PolicyRegistry(policies_dir or default_policies_dir())


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command("ls")
def ls(policies_dir: Optional[Path] = PoliciesDir, as_json: bool = typer.Option(False, "--json")):
    """List policies with their versions, CURRENT and method."""
    reg = _registry(policies_dir)
    rows = []
    for n in reg.names():
        current = reg.current(n)
        try:
            method = reg.manifest(n, current).method if current else None
        except Exception as exc:  # a broken manifest is listed, with why
            method = f"unreadable: {exc}"
        rows.append({"name": n, "current": current, "versions": reg.versions(n), "method": method})
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "current", "versions", "method", title=str(reg.root))
    for r in rows:
        table.add_row(r["name"], f"v{r['current']}" if r["current"] else "-", ", ".join(map(str, r["versions"])),
                      str(r["method"]))
    Console().print(table)


@app.command()
def show(name: str, policies_dir: Optional[Path] = PoliciesDir):
    """Print the manifest of NAME or NAME@N."""
    from valuefn.checkpoint import CheckpointError
    from valuefn.registry import RegistryError

    reg = _registry(policies_dir)
    try:
        n, v = reg.resolve(name)
        typer.echo(reg.manifest(n, v).model_dump_json(indent=2))
    except (RegistryError, CheckpointError) as exc:
        _fail(str(exc))


@app.command()
def rollback(name: str, policies_dir: Optional[Path] = PoliciesDir):
    """Point CURRENT at the version before it (a watching server follows)."""
    from valuefn.registry import RegistryError

    try:
        typer.echo(f"{name}: CURRENT -> v{_registry(policies_dir).rollback(name)}")
    except RegistryError as exc:
        _fail(str(exc))
