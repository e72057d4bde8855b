"""Replicas of the server on Ray Serve: N copies of `build_app(settings)`, each with its own vLLM
engine, behind Ray Serve's HTTP proxy on one port (docs/scale-out.md).

    iro serve --replicas 2                       # a local Ray on this machine, then Ray Serve
    serve run deploy/ray/serve-config.yaml       # the same application from the shipped config
                                                 # (KubeRay's RayService deploys that config)

- `IroReplica` is the FastAPI app itself (`@serve.ingress`, built on the replica by
  `build_app`), so API, auth, metrics and errors are those of a single server. Its ASGI lifespan
  returns only once the engine runs and every value's CURRENT is loaded and verified, so Ray Serve
  sends it no traffic before (a restarted replica too); `check_health` fails once its engine died.
- Guided requests carry their value name as Ray Serve's multiplexed model id: the proxy routes them
  to a replica that already holds that value (`server.scale_out` sets the header from the body
  inside the proxy; a client may send `serve_multiplexed_model_id` itself), and the replica
  registers the value with `@serve.multiplexed`, so a value's caches stay warm where it is served.
- `ReplicaBoard` (one small replica, no CPU) collects what each replica serves and its metrics (a
  report every second): `GET /v1/values` through the proxy lists the versions under `replicas`,
  and `GET /metrics` answers every replica's metrics, each sample labelled `replica`, so one scrape
  of the one endpoint sees them all (not whichever replica the proxy picked).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from contextlib import asynccontextmanager

from ray import serve
from ray.serve.handle import DeploymentHandle

from server.scale_out import ReplicaReports, replica_args, secret_env
from server.settings import ServerSettings

log = logging.getLogger(__name__)
APP_NAME = "iro"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "server.scale_out:proxy_middlewares"
REPORT_INTERVAL = 1.0
"""Seconds between two reports of a replica to the board."""
MAX_VALUES_PER_REPLICA = 64
"""Value names a replica registers for routing (Ray Serve's LRU; every value stays loaded)."""


def replica_options(settings: ServerSettings) -> dict:
    """Ray Serve options of the replica deployment: the count and each replica's resources (a GPU
    per engine rank where there are GPUs; one logical CPU otherwise)."""
    import torch

    ranks = settings.tensor_parallel_size * settings.pipeline_parallel_size * settings.data_parallel_size
    resources = {"num_cpus": 1}
    if torch.cuda.is_available():
        resources["num_gpus"] = ranks
    return {"num_replicas": settings.replicas, "ray_actor_options": resources,
            "max_ongoing_requests": settings.replica_max_ongoing_requests}


@asynccontextmanager
async def _lifespan_ready_first(app, inner):
    """The app's own lifespan, returning only once the engine started and values are loaded: Ray
    Serve routes to a replica once its ASGI lifespan started, so a (re)started replica takes no
    request before it serves each value's current version."""
    async with inner(app) as state:
        await asyncio.shield(app.state.starting)  # raises if the engine failed: the replica is retried
        yield state


class _HoldValue:
    """ASGI middleware in the replica: registers the request's multiplexed model id (a value
    name) with Ray Serve, which then routes that value's requests here first."""

    def __init__(self, app, hold):
        self.app, self.hold = app, hold

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            value = serve.get_multiplexed_model_id()
            if value:
                await self.hold(value)
        await self.app(scope, receive, send)


@serve.deployment(name="ReplicaBoard", num_replicas=1, ray_actor_options={"num_cpus": 0})
class ReplicaBoard:
    """What each replica serves, as it last reported it (for `GET /v1/values`)."""

    def __init__(self):
        self.reports = ReplicaReports()

    def report(self, replica: str, values: dict[str, int], registry_error: str | None,
               metrics: bytes | None = None) -> None:
        self.reports.report(replica, values, registry_error, metrics)

    def snapshot(self) -> list[dict]:
        return self.reports.snapshot()

    def metrics(self) -> dict[str, bytes]:
        return self.reports.metrics_of_replicas()


@serve.deployment(name="IroReplica", health_check_period_s=5,
                  graceful_shutdown_timeout_s=30)
@serve.ingress()
class IroReplica:
    """One `iro serve` app with its own engine (the FastAPI app is built on the replica)."""

    async def __init__(self, settings: dict, board: DeploymentHandle | None = None):
        if not logging.getLogger().handlers:  # our INFO lines (engine ready, swaps) in the replica's log
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.settings = ServerSettings(**settings)
        self.board = board
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self._spread_cores(ctx)
        self._reporter: asyncio.Task | None = None

    def _spread_cores(self, ctx) -> None:
        """On CPU, replicas on one node get disjoint cores instead of all binding every core."""
        import torch

        from common.engine_args import _cpu_cores, split_cores

        if torch.cuda.is_available() or self.settings.engine_threads != "all" or ctx.world_size < 2:
            return
        cores = _cpu_cores()
        groups = split_cores(cores, min(ctx.world_size, len(cores))).split("|")
        self.settings = self.settings.model_copy(update={"engine_threads": groups[ctx.rank.local_rank % len(groups)]})
        log.info("replica %s (rank %d): engine cores %s", self.replica_id, ctx.rank.local_rank,
                 self.settings.engine_threads)

    def __serve_build_asgi_app__(self):
        from server.app import build_app

        app = build_app(self.settings)
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a):
            async with _lifespan_ready_first(a, inner) as state:
                if self.board is not None:
                    self._reporter = asyncio.create_task(self._report_loop(a))
                yield state
            if self._reporter is not None:
                self._reporter.cancel()

        app.router.lifespan_context = lifespan
        app.state.replica_board = self.replicas_serving if self.board is not None else None
        app.state.replica_metrics = self.replicas_metrics if self.board is not None else None
        app.add_middleware(_HoldValue, hold=self.hold_value)
        self._app = app
        return app

    @serve.multiplexed(max_num_models_per_replica=MAX_VALUES_PER_REPLICA)
    async def hold_value(self, value: str) -> str:
        # Every value is loaded on every replica (ValueManager); what Ray Serve tracks here is where
        # a value's requests went, so its caches (engine prefix cache, scorer) stay warm there.
        return value

    async def _report_loop(self, app) -> None:
        while True:
            manager = app.state.values
            try:
                served = getattr(manager, "served", None) or {}  # name -> what serves it (a chain)
                values = {name: entry.version for name, entry in served.items()}
                await self.board.report.remote(self.replica_id, values, getattr(manager, "registry_error", None),
                                               app.state.metrics.render())
            except Exception as exc:  # noqa: BLE001 - the board is informational; never stop serving for it
                log.warning("replica %s: cannot report to the board: %r", self.replica_id, exc)
            await asyncio.sleep(REPORT_INTERVAL)

    async def replicas_serving(self) -> list:
        """What every live replica serves (the board's view, at most REPORT_INTERVAL old)."""
        from common.admin_protocol import ReplicaServing

        return [ReplicaServing.model_validate(r) for r in await self.board.snapshot.remote()]

    async def replicas_metrics(self, own: bytes) -> dict[str, bytes]:
        """Every live replica's metrics exposition (the others' at most REPORT_INTERVAL old), this
        replica's as `own` (fresh)."""
        texts = await self.board.metrics.remote()
        return {**texts, self.replica_id: own}

    def check_health(self) -> None:
        """Ray Serve's health check: fails once the engine died (Ray Serve then replaces the replica)."""
        app = getattr(self, "_app", None)
        engine = getattr(app.state, "engine", None) if app is not None else None
        if app is not None and (getattr(app.state, "engine_dead", False) or (engine is not None and engine.errored)):
            raise RuntimeError("the vLLM engine of this replica died")


def build(args: dict | None = None):
    """Ray Serve's application builder (`import_path: server.ray_serve:build` with `args:` in the
    shipped config): settings from `args` over the replicas' `IRO_*` environment."""
    from pydantic import ValidationError

    args = dict(args or {})
    try:
        settings = ServerSettings(**args)
    except ValidationError as exc:
        raise ValueError(f"bad iro settings in the Ray Serve config's args: {exc}") from None
    options = replica_options(settings)
    if "replicas" not in args:  # the config's num_replicas (or autoscaling) decides
        options.pop("num_replicas")
    if "replica_max_ongoing_requests" not in args:  # likewise its max_ongoing_requests
        options.pop("max_ongoing_requests")
    board = ReplicaBoard.bind()
    return IroReplica.options(**options).bind(replica_args(settings), board)


def run(settings: ServerSettings) -> None:
    """`iro serve --replicas N`: a local Ray (no dashboard, nothing reached over the network), Ray
    Serve's proxy on settings.host:port, N replicas; blocks until Ctrl-C or SIGTERM, then stops
    Ray and everything it started."""
    import ray

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # Ray's processes inherit it (the proxy)
    os.environ.update(secret_env(settings))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ray.init(num_cpus=max(settings.replicas, os.cpu_count() or 1), include_dashboard=False,
             configure_logging=False, log_to_driver=True)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        board = ReplicaBoard.bind()
        app = IroReplica.options(**replica_options(settings)).bind(replica_args(settings), board)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        log.info("%d replicas ready on http://%s:%d", settings.replicas, settings.host, settings.port)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        log.info("stopping the replicas")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)
