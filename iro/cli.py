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


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help="Local HF model folder (default: embedded SmolLM2-135M-Instruct). (env IRO_MODEL)"),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1). (env IRO_HOST)"),
    port: Optional[int] = typer.Option(None, help="Port (default 8000). (env IRO_PORT)"),
    api_key: Optional[str] = typer.Option(None, help="Require this bearer token on /v1. (env IRO_API_KEY)"),
    admin_key: Optional[str] = typer.Option(None, help="Bearer token for value admin routes (default: the API key). (env IRO_ADMIN_KEY)"),
    values_dir: Optional[Path] = typer.Option(None, help="Value registry (default $IRO_HOME/values). (env IRO_VALUES_DIR)"),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default 2048). (env IRO_MAX_MODEL_LEN)"),
    served_model_name: Optional[str] = typer.Option(None, help="Model id in the API. (env IRO_SERVED_MODEL_NAME)"),
    max_n: Optional[int] = typer.Option(None, help="Largest n per request (default 16). (env IRO_MAX_N)"),
    max_guided_candidates: Optional[int] = typer.Option(None, help="Cap on w*k of guided requests (default 64). (env IRO_MAX_GUIDED_CANDIDATES)"),
    max_queue: Optional[int] = typer.Option(None, help="Requests admitted at once before 429 (default 256). (env IRO_MAX_QUEUE)"),
    max_body_bytes: Optional[int] = typer.Option(None, help="413 above this request size (default 2000000). (env IRO_MAX_BODY_BYTES)"),
    kv_cache_gib: Optional[int] = typer.Option(None, help="vLLM KV cache in GiB (default 2). (env IRO_KV_CACHE_GIB)"),
    block_size: Optional[int] = typer.Option(None, help="KV block size, a multiple of 16 (default 16). (env IRO_BLOCK_SIZE)"),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="Tokens per engine step (default: vLLM's). (env IRO_MAX_NUM_BATCHED_TOKENS)"),
    dtype: Optional[str] = typer.Option(None, help="Engine and value dtype: auto, bfloat16, float32 or float16 (default auto: bf16 where the CPU has AVX512-BF16/AMX or the GPU has compute capability 8.0+; else float32 on CPU, float16 on GPU). (env IRO_DTYPE)"),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--compile", help="Skip vLLM graph compilation. (env IRO_ENFORCE_EAGER)"),
    engine_threads: Optional[str] = typer.Option(None, help='CPU cores of the engine: "all" or a bind spec like 0-1 (default all). (env IRO_ENGINE_THREADS)'),
    engine_value_layers: Optional[str] = typer.Option(None, help='Residual-stream layers the engine hands to engine values: "auto" (the middle layer), "none" or a list like 8,15 (default auto). (env IRO_ENGINE_VALUE_LAYERS)'),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="The engine's share of each GPU's memory (default 0.85); the rest, less 1 GiB, is the value scorer's, and a value that does not fit is refused. GPU only. (env IRO_GPU_MEMORY_UTILIZATION)"),
    tensor_parallel_size: Optional[int] = typer.Option(None, help="Devices each layer is split across (vLLM tensor parallelism; default 1). (env IRO_TENSOR_PARALLEL_SIZE)"),
    pipeline_parallel_size: Optional[int] = typer.Option(None, help="Pipeline stages (vLLM pipeline parallelism; default 1; on CPU with --compile only). (env IRO_PIPELINE_PARALLEL_SIZE)"),
    data_parallel_size: Optional[int] = typer.Option(None, help="Engine replicas behind this server (vLLM data parallelism; default 1). (env IRO_DATA_PARALLEL_SIZE)"),
    scorer_threads: Optional[int] = typer.Option(None, help="torch threads of the value scorer (default 2). (env IRO_SCORER_THREADS)"),
    watch_values: Optional[bool] = typer.Option(None, "--watch-values/--no-watch-values", help="Follow the registry's CURRENT (default on). (env IRO_WATCH_VALUES)"),
    cors_origins: Optional[str] = typer.Option(None, help="Browser origins allowed (CORS): a JSON or comma-separated list. (env IRO_CORS_ORIGINS)"),
    log_prompts: Optional[bool] = typer.Option(None, "--log-prompts/--no-log-prompts", help="Log prompts and answers (default off). (env IRO_LOG_PROMPTS)"),
    policies_dir: Optional[Path] = typer.Option(None, help="Serve distilled LoRA policies from this registry (enables LoRA in the engine). (env IRO_POLICIES_DIR)"),
    max_lora_rank: Optional[int] = typer.Option(None, help="Largest policy adapter rank (default 16). (env IRO_MAX_LORA_RANK)"),
    max_loras: Optional[int] = typer.Option(None, help="Policy adapters held at once (default 4). (env IRO_MAX_LORAS)"),
    max_stop: Optional[int] = typer.Option(None, help="stop strings per request (default 16). (env IRO_MAX_STOP)"),
    max_stop_token_ids: Optional[int] = typer.Option(None, help="stop_token_ids per request (default 64). (env IRO_MAX_STOP_TOKEN_IDS)"),
    max_logit_bias: Optional[int] = typer.Option(None, help="logit_bias entries per request (default 300). (env IRO_MAX_LOGIT_BIAS)"),
    max_prompts: Optional[int] = typer.Option(None, help="Prompts per completion request (default 64). (env IRO_MAX_PROMPTS)"),
    max_guided_steps: Optional[int] = typer.Option(None, help="Search steps (max_tokens / l) of a guided request (default 512). (env IRO_MAX_GUIDED_STEPS)"),
    max_score_responses: Optional[int] = typer.Option(None, help="Responses per /v1/score request (default 256). (env IRO_MAX_SCORE_RESPONSES)"),
    max_score_tokens: Optional[int] = typer.Option(None, help="Tokens one /v1/score request scores (default 16384). (env IRO_MAX_SCORE_TOKENS)"),
    max_score_queue: Optional[int] = typer.Option(None, help="/v1/score requests at once before 429 (default 8). (env IRO_MAX_SCORE_QUEUE)"),
    limit_concurrency: Optional[int] = typer.Option(None, help="Connections + requests at once before uvicorn answers 503 (default 1024). (env IRO_LIMIT_CONCURRENCY)"),
    timeout_keep_alive: Optional[int] = typer.Option(None, help="Seconds an idle keep-alive connection stays open (default 5). (env IRO_TIMEOUT_KEEP_ALIVE)"),
    body_timeout: Optional[float] = typer.Option(None, help="Seconds to receive a request body before 408 (default 60). (env IRO_BODY_TIMEOUT)"),
    allow_open_admin: Optional[bool] = typer.Option(None, "--allow-open-admin", help="Serve on a non-loopback address with no admin or API key (refused otherwise). (env IRO_ALLOW_OPEN_ADMIN)"),
):
    """Serve the OpenAI-compatible API (and value-guided decoding) on HOST:PORT.

    Every flag is a `ServerSettings` field; a flag given wins over its `IRO_*` variable."""
    import uvicorn

    from server.app import build_app

    settings = serve_settings(**{k: v for k, v in locals().items() if k not in ("uvicorn", "build_app")})
    uvicorn.run(build_app(settings), **settings.uvicorn_options(), log_level="info", timeout_graceful_shutdown=5)


def serve_settings(**flags):
    """The server's settings from `iro serve`'s flags (those given) over the environment."""
    from pydantic import ValidationError

    from server.settings import ServerSettings

    try:
        return ServerSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-")
        raise typer.BadParameter(f"{error['msg']} (got {error.get('input')!r})", param_hint=flag) from None


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
_add_commands("trainer.cli", "register", "_trainer")  # registers several commands itself
_add_commands("trainer.jobs_cli", "register", "_jobs")  # rollout, eval, loop
_add_commands("trainer.distill_cli", "register", "_distill")
_add_commands("trainer.tasks_cli", "app", "tasks")
_add_commands("clients.cli", "register", "_clients")
_add_commands("bench.cli", "bench", "bench")

if __name__ == "__main__":
    app()
