"""`iro values ...`: inspect and change the value registry."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer

from common.paths import default_values_dir

app = typer.Typer(no_args_is_help=True, help="Value functions in the registry.")

ValuesDir = typer.Option(None, "--values-dir", help="Registry folder (env IRO_VALUES_DIR; default $IRO_HOME/values).")


def _registry(values_dir: Optional[Path]):
    from valuefn.registry import Registry

    return Registry(values_dir or default_values_dir())


@contextlib.contextmanager
def _clear_errors():
    """A registry or checkpoint refusal as one line on stderr and exit status 2, not a traceback."""
    from valuefn.checkpoint import CheckpointError
    from valuefn.registry import RegistryError

    try:
        yield
    except (RegistryError, CheckpointError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("ls")
def ls(values_dir: Optional[Path] = ValuesDir, as_json: bool = typer.Option(False, "--json")):
    """List values with their versions and CURRENT."""
    reg = _registry(values_dir)
    rows = [{"name": n, "current": reg.current(n), "versions": reg.versions(n)} for n in reg.names()]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "current", "versions", title=str(reg.root))
    for r in rows:
        table.add_row(r["name"], f"v{r['current']}" if r["current"] else "-", ", ".join(map(str, r["versions"])))
    Console().print(table)


@app.command()
def show(name: str, values_dir: Optional[Path] = ValuesDir):
    """Print the manifest of NAME or NAME@N."""
    reg = _registry(values_dir)
    with _clear_errors():
        n, v = reg.resolve(name)
        typer.echo(reg.manifest(n, v).model_dump_json(indent=2))


@app.command()
def rollback(name: str, values_dir: Optional[Path] = ValuesDir):
    """Point CURRENT at the version before it (a watching server follows)."""
    with _clear_errors():
        typer.echo(f"{name}: CURRENT -> v{_registry(values_dir).rollback(name)}")


@app.command()
def init(
    name: str,
    values_dir: Optional[Path] = ValuesDir,
    model: Optional[str] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    layers: Optional[int] = typer.Option(None, help="With --lora: backbone decoder layers to keep (0: all; default 4)."),
    seed: int = typer.Option(0),
    pooling: Optional[str] = typer.Option(None, help="With --lora: mean (default): V averages the head over the "
                                                     "response tokens; last: the last token's output."),
    engine_value: bool = typer.Option(True, "--engine-value/--lora", help="--engine-value (default): an engine value, "
                                      "a head on hidden states of the frozen base model that the engine computes while "
                                      "generating. --lora: LoRA on the first --layers layers, run by the server's scorer."),
    value_layers: Optional[str] = typer.Option(None, help='With --engine-value: the residual-stream layers it reads '
                                               '("auto", the default: the layers a server exposes by default; "none": '
                                               'the final hidden state; "8,15").'),
):
    """Publish a new untrained version of NAME (fresh head; v0001, then v0002, ...)."""
    from common.engine_args import resolve_value_layers
    from common.model_store import resolve_model
    from valuefn.loader import init_value
    from valuefn.model import ValueModelConfig, backbone_identity

    given = {"--layers": layers, "--pooling": pooling} if engine_value else {"--value-layers": value_layers}
    for flag, value in given.items():  # an option of the other kind is refused, never ignored
        if value is not None:
            raise typer.BadParameter(f"applies to {'a LoRA value (--lora)' if engine_value else 'an engine value'}, "
                                     f"not {'an engine value' if engine_value else 'a LoRA value'}", param_hint=flag)
    if pooling not in (None, "mean", "last", "mean_before"):
        raise typer.BadParameter(f"expected mean, last or mean_before, got {pooling!r}", param_hint="--pooling")
    path = resolve_model(model)
    if engine_value:
        try:
            value_layers = resolve_value_layers(value_layers or "auto", backbone_identity(path)["total_layers"])
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--value-layers") from None
        config = ValueModelConfig.for_engine_value(value_layers=list(value_layers) or None)
    else:
        config = ValueModelConfig(num_layers=(4 if layers is None else layers) or None, pooling=pooling or "mean")
    with _clear_errors():
        version = init_value(_registry(values_dir), name, path, config, seed=seed)
    typer.echo(f"published {name} v{version}")


@app.command()
def prune(name: str, keep: int = typer.Option(3, min=1), values_dir: Optional[Path] = ValuesDir):
    """Delete old versions of NAME, keeping the newest KEEP (and CURRENT's chain)."""
    with _clear_errors():
        removed = _registry(values_dir).remove_old(name, keep)
    typer.echo(f"removed {', '.join(f'v{v}' for v in removed) or 'nothing'}")
