"""`build_app(settings)`: the FastAPI application, its lifespan (engine, values, scorer) and
error handling. No module-level app, engine or settings."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.protocol import HealthStatus, VersionInfo
from common.version import __version__
from server.errors import IroError, QuotaExceededError, error_body, error_responses, validation_error_info
from server.metrics import Metrics, MetricsMiddleware, merge_replicas
from server.settings import ServerSettings

log = logging.getLogger(__name__)
EXIT_ENGINE_DEAD = 3
"""Exit status of a server whose engine died or failed to start."""


class BodyLimitMiddleware:
    """413 for request bodies over `limit` bytes (declared or streamed); 408 (and the connection
    closed) for a body not fully received `timeout` seconds after its request's headers: uvicorn
    bounds idle keep-alive connections but not a stalled upload."""

    def __init__(self, app, limit: int, timeout: float = 60.0, uploads: dict[str, int] | None = None):
        self.app, self.limit, self.timeout = app, limit, timeout
        self.uploads = uploads or {}  # path -> its own limit (file uploads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.uploads.get(scope.get("path", ""), self.limit)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(send, limit)
        seen = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited_receive():
            nonlocal seen, complete
            if complete:  # the body is in; later receives wait for a disconnect, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise _SlowBody(self.timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > limit:
                    raise _TooLarge(limit)
            else:
                complete = True
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send, limit)

    async def _reject(self, send, limit: int):
        body = JSONResponse(error_body(413, f"request body larger than {limit} bytes"), status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


class _TooLarge(StarletteHTTPException):
    # An HTTPException, so that FastAPI's body parsing re-raises it instead of answering 400.
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class _SlowBody(StarletteHTTPException):
    def __init__(self, timeout: float):
        super().__init__(408, f"request body not received within {timeout:g} seconds", headers={"Connection": "close"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(IroError)
    async def iro_error(_: Request, exc: IroError):
        headers = {"Retry-After": "1"} if exc.status_code in (429, 503) else None
        if isinstance(exc, QuotaExceededError):
            headers = {"x-should-retry": "false"}
        return JSONResponse(exc.to_response().model_dump(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"We could not parse the JSON body of your request: {first.get('msg')}",
                                           code="invalid_json"), status_code=400)
        info = validation_error_info(errors or [first])
        return JSONResponse(error_body(400, info["message"], param=info["param"], code=info["code"]), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout"}.get(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # e.g. `Allow` on a 405

    # A handler for `Exception` runs in Starlette's ServerErrorMiddleware, which re-raises after
    # responding, so uvicorn drops the keep-alive connection; specific types are handled cleanly.
    # A bare ValueError is not a refusal (ours are `IroError`s, vLLM's `VLLMClientError`s become
    # them in server.engine): it is a bug, answered 500 without its text and logged.
    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError):
        log.error("unexpected %s", type(exc).__name__, exc_info=exc)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__})", type="server_error"),
                            status_code=500)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        name = type(exc).__name__
        if name in ("EngineDeadError", "EngineGenerateError"):
            return JSONResponse(error_body(503, "the inference engine failed", type="service_unavailable",
                                           code="engine_dead"), status_code=503)
        log.exception("unexpected error")
        return JSONResponse(error_body(500, f"internal error ({name})", type="server_error"), status_code=500)


def install_openapi(app: FastAPI) -> None:
    """The OpenAPI document without FastAPI's 422 entries (validation errors answer 400 with an
    ErrorResponse), and with the stream chunk schemas that the routes' event streams refer to."""
    from pydantic.json_schema import models_json_schema

    from common.protocol import ChatCompletionStreamResponse, CompletionStreamResponse

    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default()
            _, chunks = models_json_schema([(m, "serialization") for m in (ChatCompletionStreamResponse,
                                                                           CompletionStreamResponse)],
                                           ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in chunks.get("$defs", {}).items():
                components.setdefault(name, definition)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
        return app.openapi_schema

    app.openapi = openapi


async def _start_values(app: FastAPI, settings: ServerSettings, engine, model_path):
    """The value registry's manager and the scorer; every value loaded; closers registered."""
    from server.value_manager import ValueManager
    from valuefn.loader import BackbonePool, ValueLoader
    from valuefn.registry import Registry, open_registry
    from valuefn.scorer import Scorer

    registry = open_registry(settings.resolved_values_dir(), Registry, create=True,  # a folder or s3://bucket/prefix
                             poll_interval=settings.registry_poll_s)
    value_dtype = settings.dtype if settings.dtype != "float16" else "auto"  # values: bfloat16 or float32
    from server.engine import engine_value_probe

    # the engine's (machine's) dtype; engine values the engine computes are checked there and hold no backbone here
    pool = BackbonePool(model_path, value_cache_gib=settings.value_cache_gib,
                        gpu_memory_utilization=settings.gpu_memory_utilization)  # the values' memory plan
    loader = ValueLoader(registry, pool, dtype=value_dtype,
                         engine_probe=engine_value_probe(engine, asyncio.get_running_loop()))
    manager = ValueManager(registry, loader, base_id=engine.model_id,
                           metrics=app.state.metrics)
    scorer = Scorer(threads=settings.scorer_threads, metrics=app.state.metrics)
    await manager.reconcile()
    app.state.values = manager
    app.state.scorer = scorer
    watcher = asyncio.create_task(manager.watch()) if settings.watch_values else None

    async def close():
        if watcher is not None:
            manager.stop()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        scorer.close()

    app.state.closers.append(close)
    return manager, scorer


async def _start_engine(app: FastAPI, settings: ServerSettings) -> None:
    """Start-up wiring (run by the lifespan): engine, values, scorer, and the serving objects."""
    from common.dtype import log_dtype
    from common.model_store import resolve_model
    from server.engine import VllmEngine
    from server.guided import GuidedGenerator
    from server.openai.serving import Limits, OpenAIServing
    from server.openai.serving_score import ScoreServing

    log_dtype("serve", settings.dtype)  # e.g. "dtype bfloat16 (Intel Xeon ... has amx_bf16)"
    model_path = await asyncio.to_thread(resolve_model, settings.model)
    model_id = settings.served_model_name or model_path.name
    engine = await asyncio.to_thread(
        VllmEngine.start, str(model_path), model_id, **settings.engine_options(), lora=settings.lora_options())
    app.state.engine = engine
    await engine.read_worker_report()  # what the workers compute: engine values or the scorer
    app.state.model_path = model_path
    values, scorer = await _start_values(app, settings, engine, model_path)
    guided = GuidedGenerator(engine, scorer, values, max_candidates=settings.max_guided_candidates,
                             max_steps=settings.max_guided_steps, metrics=app.state.metrics,
                             effort_budgets=settings.reasoning_effort_budgets,
                             pf_temperature=settings.pf_temperature)
    tokenizer_limiter = anyio.CapacityLimiter(1)  # one tokenizer thread, shared (as vLLM's executor)
    app.state.score_serving = ScoreServing(engine, scorer, values, max_responses=settings.max_score_responses,
                                           max_tokens=settings.max_score_tokens, max_queue=settings.max_score_queue,
                                           tokenizer_limiter=tokenizer_limiter)
    serving = OpenAIServing(engine, max_n=settings.max_n, max_queue=settings.max_queue, metrics=app.state.metrics,
                            guided=guided, values=values, log_prompts=settings.log_prompts,
                            limits=Limits.from_settings(settings), tokenizer_limiter=tokenizer_limiter)
    from server.policies import start_policies

    app.state.policies = serving.policies = await start_policies(app, settings, engine, model_path)
    serving.stored, serving.store_everything = getattr(app.state, "stored", None), settings.store_everything
    serving.store_error = getattr(app.state, "store_error", None)
    app.state.serving = serving  # last: /health says ready once the registry's policies are served too
    gc.collect()  # then freeze: what start-up built (torch, the tokenizer, values) is never scanned again,
    gc.freeze()  # as vLLM's engine core does
    log.info("engine ready: %s", model_id)


async def _watch_engine(app: FastAPI) -> None:
    """Exit non-zero when the engine dies instead of answering 503 forever."""
    while True:
        await asyncio.sleep(0.5)
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            app.state.metrics.engine_in_flight.set(engine.in_flight())
            if engine.errored:
                log.error("the vLLM engine died; shutting the server down")
                app.state.engine_dead = True
                app.state.exit_code = EXIT_ENGINE_DEAD
                await asyncio.sleep(1.0)  # let in-flight requests get their 503
                os.kill(os.getpid(), signal.SIGTERM)
                return


def build_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    if settings.admin_open_to_network():  # only with --allow-open-admin (ServerSettings refuses it otherwise)
        log.warning("!!! the admin routes (/v1/values, /v1/policies: load, unload, roll back, delete) need NO key "
                    "and %s is not a loopback address: anyone who reaches this port controls them "
                    "(--allow-open-admin). Set IRO_ADMIN_KEY to close them. !!!", settings.host)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from server.store.startup import start_store

        await start_store(app, settings)  # files, batches (and their runner), stored completions
        app.state.starting = asyncio.create_task(_start_engine(app, settings))
        watcher = asyncio.create_task(_watch_engine(app))

        def started(task: asyncio.Task):
            if not task.cancelled() and task.exception() is not None:
                log.error("engine failed to start: %r", task.exception())
                app.state.start_error = repr(task.exception())
                app.state.exit_code = EXIT_ENGINE_DEAD
                os.kill(os.getpid(), signal.SIGTERM)

        app.state.starting.add_done_callback(started)
        try:
            yield
        finally:
            watcher.cancel()
            if not app.state.starting.done():  # stopped mid-start: cancelling would orphan the engine process
                log.info("waiting for the engine to finish starting, to shut it down")
                await asyncio.wait({app.state.starting}, timeout=300)
            app.state.starting.cancel()
            for closer in getattr(app.state, "closers", []):
                await closer()
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                engine.shutdown()
            if app.state.exit_code:  # uvicorn would exit 0 (or by SIGTERM): tell supervisors it failed
                logging.shutdown()
                os._exit(app.state.exit_code)

    app = FastAPI(title="iro-serve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for a frozen model aligned at test time by value functions.")
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.serving = None
    app.state.engine = None
    app.state.values = None
    app.state.policies = None
    app.state.score_serving = None
    app.state.closers = []
    app.state.exit_code = 0
    install_error_handlers(app)

    from server.openai.router import router as openai_router

    app.include_router(openai_router)
    from server.admin.router import router as admin_router

    app.include_router(admin_router)
    from server.admin.policies_router import router as policies_router

    app.include_router(policies_router)
    from server.admin.engine_router import router as engine_router

    app.include_router(engine_router)
    from server.batches.router import router as batches_router
    from server.stored.router import router as stored_router

    app.include_router(batches_router)
    app.include_router(stored_router)

    @app.get("/health", response_model=HealthStatus, response_model_exclude_none=True, responses=error_responses(503))
    async def health():
        engine = app.state.engine
        if getattr(app.state, "engine_dead", False) or (engine is not None and engine.errored):
            return JSONResponse(error_body(503, "engine dead", type="service_unavailable", code="engine_dead"), 503)
        if app.state.serving is None:
            return JSONResponse(error_body(503, "engine starting", type="service_unavailable", code="engine_starting"), 503)
        unreadable = [f"the {kind} registry cannot be read (serving what is loaded)"  # no paths: /health is open
                      for kind, m in (("value", app.state.values), ("policy", app.state.policies))
                      if getattr(m, "registry_error", None)
                      or not getattr(getattr(m, "registry", None), "healthy", True)]  # e.g. its object store is down
        if getattr(app.state, "store_error", None):  # the routes that need it answer 503 with the reason
            unreadable.append("the database cannot be opened (files, batches and stored completions are unavailable)")
        return HealthStatus(status="degraded", reason="; ".join(unreadable)) if unreadable else HealthStatus()

    @app.get("/version", response_model=VersionInfo)
    async def version():
        import vllm

        return {"version": __version__, "vllm": getattr(vllm, "__version__", None),
                "model": app.state.engine.model_id if app.state.engine else None}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        body = app.state.metrics.render()
        replicas = getattr(app.state, "replica_metrics", None)  # on Ray Serve: every replica's (server.ray_serve)
        if replicas is not None:
            body = merge_replicas(await replicas(body))
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    install_openapi(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, timeout=settings.body_timeout,
                       uploads={"/v1/files": settings.max_file_bytes + 65536})  # + multipart framing
    return app
