"""`iro`: one command line for the server, the value registry, the trainer, clients and benchmarks.

Each package owns its sub-commands; this module only wires them together (imports are lazy so
`iro --help` stays fast).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

import iro

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
model_app = typer.Typer(no_args_is_help=True, help="The base model.")
app.add_typer(model_app, name="model")


def _version(value: bool):
    if value:
        typer.echo(f"iro-serve {iro.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help="Local HF model folder (default: embedded SmolLM2-135M-Instruct). (env IRO_MODEL)"),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1). (env IRO_HOST)"),
    port: Optional[int] = typer.Option(None, help="Port (default 8000). (env IRO_PORT)"),
    api_key: Optional[str] = typer.Option(None, help="Require this bearer token on /v1. (env IRO_API_KEY)"),
    admin_key: Optional[str] = typer.Option(None, help="Bearer token for value admin routes. (env IRO_ADMIN_KEY)"),
    values_dir: Optional[Path] = typer.Option(None, help="Value registry (default $IRO_HOME/values). (env IRO_VALUES_DIR)"),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default 2048). (env IRO_MAX_MODEL_LEN)"),
    served_model_name: Optional[str] = typer.Option(None, help="Model id in the API. (env IRO_SERVED_MODEL_NAME)"),
    max_n: Optional[int] = typer.Option(None, help="Largest n per request. (env IRO_MAX_N)"),
    max_queue: Optional[int] = typer.Option(None, help="Requests admitted at once before 429. (env IRO_MAX_QUEUE)"),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--compile", help="Skip vLLM graph compilation. (env IRO_ENFORCE_EAGER)"),
):
    """Serve the OpenAI-compatible API (and value-guided decoding) on HOST:PORT."""
    import uvicorn

    from server.app import build_app
    from server.settings import ServerSettings

    given = {k: v for k, v in dict(model=model, host=host, port=port, api_key=api_key, admin_key=admin_key,
                                   values_dir=values_dir, max_model_len=max_model_len, max_n=max_n,
                                   served_model_name=served_model_name, max_queue=max_queue,
                                   enforce_eager=enforce_eager).items() if v is not None}
    settings = ServerSettings(**given)
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=5)


@model_app.command("prepare")
def model_prepare(force: bool = typer.Option(False, help="Convert again even if a verified copy exists.")):
    """Materialise the embedded default model (GGUF -> HF folder, once) and print its path."""
    from common.model_store import prepare_default_model

    typer.echo(prepare_default_model(force=force))


def _add_commands(module: str, attr: str, name: str) -> None:
    """Mount the commands a package owns (`register(app)`, a Typer app, or one function)."""
    import importlib

    sub = getattr(importlib.import_module(module), attr)
    if attr == "register":  # the module adds its own commands
        sub(app)
    elif isinstance(sub, typer.Typer):
        app.add_typer(sub, name=name)
    else:
        app.command(name)(sub)


_add_commands("valuefn.cli", "app", "values")
_add_commands("trainer.cli", "register", "_trainer")  # registers several commands itself
_add_commands("trainer.jobs_cli", "register", "_jobs")  # rollout, eval, loop
_add_commands("clients.cli", "register", "_clients")
_add_commands("bench.cli", "bench", "bench")

if __name__ == "__main__":
    app()
