"""`iro`: one command line for the server, the value registry, the trainer, clients and benchmarks.

Each package owns its sub-commands; this module only wires them together (imports are lazy so
`iro --help` stays fast).
"""

from __future__ import annotations

import logging
import sys
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
    root = logging.getLogger()
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is logged (not the one at start-up), so a
    command run in-process (tests, notebooks) never writes to a stream that was since closed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _serve(settings) -> None:
    import uvicorn

    from server.app import build_app

    if settings.replicas > 1:  # Ray Serve: its proxy on host:port, one engine per replica (docs/scale-out.md)
        return _serve_replicas(settings)
    uvicorn.run(build_app(settings), **settings.uvicorn_options(), log_level="info", timeout_graceful_shutdown=5)


def _serve_replicas(settings) -> None:
    """`iro serve --replicas N`: N replicas on a local Ray Serve (server.ray_serve)."""
    from server.ray_serve import run

    run(settings)


def _serve_command():
    from iro.settings_flags import settings_command
    from server.settings import ServerSettings

    return settings_command(ServerSettings, _serve, doc="""Serve the OpenAI-compatible API (and value-guided decoding) on HOST:PORT.

    Every flag is a `ServerSettings` field; a flag given wins over its `IRO_*` variable.""")


app.command("serve")(_serve_command())


@model_app.command("prepare")
def model_prepare(force: bool = typer.Option(False, help="Convert again even if a verified copy exists.")):
    """Materialise the embedded default model (GGUF -> HF folder, once) and print its path."""
    from common.model_store import prepare_default_model

    typer.echo(prepare_default_model(force=force))


@model_app.command("tiny")
def model_tiny(family: str = typer.Argument(..., help="llama, qwen2, qwen3, mistral, gemma2, gemma3, phi3, "
                                                      "qwen3-moe or mixtral."),
               target: Path = typer.Argument(..., help="Folder to write (replaced)."),
               seed: int = typer.Option(0)):
    """Write a tiny random-weight model of FAMILY (the embedded model's tokenizer) for `iro serve --model`."""
    from common.tiny_models import build_tiny_model

    try:
        typer.echo(build_tiny_model(family, target, seed=seed, force=True))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="FAMILY") from None


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
           engine: bool = typer.Option(False, "--engine", help="Start the engine (the embedded model, eager) and "
                                       "report what its workers installed, instead of this process's probe."),
           smoke: bool = typer.Option(False, "--smoke", help="Run the GPU check: the engine as V2, V1 eager and "
                                      "V1 compiled; engine-vs-HF values, a guided request and a hot swap each; "
                                      "prints a table (bench/gpu_smoke.py; on CPU only the V1 rows run)."),
           url: Optional[str] = typer.Option(None, help="Read a running server's report instead (GET /v1/engine; "
                                             "the admin key from IRO_ADMIN_KEY).")):
    """What this machine will run: platform, dtype and why, versions, vLLM's model runner, each engine
    patch, where each value kind is computed, memory budgets (the server logs the same block at start)."""
    import json

    from server.doctor import collect, format_text

    if smoke:
        from bench.gpu_smoke import main as smoke_main

        raise typer.Exit(smoke_main(as_json=as_json))
    if url:
        import os

        import httpx

        key = os.environ.get("IRO_ADMIN_KEY")
        r = httpx.get(url.rstrip("/") + "/v1/engine", headers={"Authorization": f"Bearer {key}"} if key else {},
                      timeout=30)
        if r.status_code != 200:
            raise typer.BadParameter(f"{r.status_code}: {r.text[:300]}", param_hint="--url")
        data = r.json()
    else:
        data = collect(worker_report=_engine_report() if engine else None)
    typer.echo(json.dumps(data, indent=2) if as_json else format_text(data))


def _engine_report() -> dict:
    import asyncio

    from common.model_store import prepare_default_model
    from server.engine import VllmEngine

    async def run():
        llm = VllmEngine.start(str(prepare_default_model()), "doctor", max_model_len=512, enforce_eager=True)
        try:
            return await llm.read_worker_report()
        finally:
            llm.shutdown()

    report = asyncio.run(run())
    import gc

    gc.collect()  # the engine's destructor runs now, not at interpreter exit (where it fails noisily)
    return report


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
_add_commands("valuefn.policies_cli", "app", "policies")
_add_commands("trainer.value_cli", "register", "_values_training")  # reward, train, publish
_add_commands("trainer.jobs_cli", "register", "_jobs")  # rollout, eval, loop
_add_commands("trainer.distill_cli", "register", "_distill")
_add_commands("trainer.tasks_cli", "app", "tasks")
_add_commands("trainer.data_cli", "app", "data")
_add_commands("clients.cli", "register", "_clients")
_add_commands("bench.cli", "bench", "bench")

if __name__ == "__main__":
    app()
