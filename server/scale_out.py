"""The Ray-free parts of scale-out (`server.ray_serve` holds the Ray Serve deployments): routing by
value name, the settings a replica is built from, and the board of what each replica serves.

Route guided requests by value name: the key Ray Serve's model multiplexing routes on.

Ray Serve's HTTP proxy sends a request to a replica that already holds its multiplexed model id,
which it reads from the `serve_multiplexed_model_id` header only (it never parses bodies). Our
clients name the value in the body (`guidance.value`, `model: "<base>+<value>"`, /v1/score's
`value`), so `ValueRoutingMiddleware` runs inside the proxy (Ray Serve's proxy callback,
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=server.scale_out:proxy_middlewares`), reads the JSON
body of the routed POSTs (bounded), and adds the header when the client did not set it. The body
is replayed unchanged to the replica, which validates it as a single server would.

    >>> routing_key("/v1/chat/completions", b'{"model": "base+tldr@3", "messages": []}')
    'tldr'
    >>> routing_key("/v1/chat/completions", b'{"model": "base", "guidance": {"value": "tldr"}}')
    'tldr'
    >>> routing_key("/v1/models", b"") is None
    True
"""

from __future__ import annotations

import json
import logging
import re
import time

from pydantic import SecretStr

log = logging.getLogger(__name__)

MULTIPLEX_HEADER = b"serve_multiplexed_model_id"
"""The header Ray Serve's proxy routes on (it also accepts hyphens in place of underscores)."""
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/score")
"""POST routes whose body names a value."""
MAX_ROUTED_BODY = 4 * 1024 * 1024
"""Bytes of a body the proxy reads to find the value; a larger body goes unrouted (any replica),
where the replica's own limit (`max_body_bytes`) refuses it as a single server would."""


_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # valuefn.registry.NAME_RE (not imported: the proxy stays light)


def routing_key(path: str, body: bytes) -> str | None:
    """The value name a request body asks for (without a pinned `@N`), or None: the request is
    not guided, not JSON, or not one of the routed paths. Never raises: the replica validates."""
    if not path.endswith(ROUTED_PATHS):
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    value = None
    guidance = data.get("guidance")
    if isinstance(guidance, dict) and isinstance(guidance.get("value"), str):
        value = guidance["value"]
    elif path.endswith("/v1/score") and isinstance(data.get("value"), str):
        value = data["value"]
    elif isinstance(data.get("model"), str) and "+" in data["model"]:
        value = data["model"].partition("+")[2]  # `<base>+<value>` or `<policy>+<value>`
    value = (value or "").split("@")[0]
    return value if _NAME.fullmatch(value) else None  # a bad name goes anywhere: the replica refuses it


def _has_header(scope) -> bool:
    return any(k.lower().replace(b"-", b"_") == MULTIPLEX_HEADER for k, _ in scope.get("headers") or [])


class ValueRoutingMiddleware:
    """ASGI middleware (in Ray Serve's proxy): adds `serve_multiplexed_model_id: <value>` to a
    guided request that lacks it, from its JSON body, and replays the body untouched."""

    def __init__(self, app, max_body: int = MAX_ROUTED_BODY):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith(ROUTED_PATHS)
                or _has_header(scope)):
            return await self.app(scope, receive, send)
        buffered, size, complete = [], 0, False
        while not complete and size <= self.max_body:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: replayed, the replica sees it
            size += len(message.get("body", b""))
            complete = not message.get("more_body", False)
        if complete:
            key = routing_key(scope["path"], b"".join(m.get("body", b"") for m in buffered))
            if key is not None:
                scope = dict(scope, headers=[*scope.get("headers", []), (MULTIPLEX_HEADER, key.encode())])
        pending = iter(buffered)

        async def replay():
            message = next(pending, None)
            return message if message is not None else await receive()

        await self.app(scope, replay, send)


REPLICA_LOST = {"error": {"message": "the replica serving this request stopped (it is being replaced); retry: "
                                    "another replica answers", "type": "service_unavailable", "param": None,
                          "code": "replica_unavailable"}}


class ReplicaLostMiddleware:
    """ASGI middleware (in Ray Serve's proxy): a request whose replica died answers 503
    `replica_unavailable` with `Retry-After: 1` in the OpenAI error shape, which clients retry (the
    openai SDK and ours), instead of what the proxy says by itself (a 500 with the Ray exception as
    plain text) or what the dying replica says (`engine_dead`, which a single server means as "do not
    retry: this server is going away"; behind the proxy another replica answers).

    Only a non-JSON 500 (the proxy's own) and a 503 `engine_dead` are rewritten; a JSON 500 is the
    app's and passes through. A request the proxy ends with no response at all (what Ray Serve 2.60
    does when the replica's actor dies: uvicorn then answers a bare 500) or with an exception gets
    the same 503. Streams whose headers were sent cannot be rewritten and are not."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None
        started = False
        body: list[bytes] = []

        async def watch(message):
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in (500, 503):
                    held = message  # decide once the body is known
                    return
            if held is None:
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await _send_final(send, held, b"".join(body))

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:
                raise
            log.warning("the proxy failed a request before its replica answered; answering a retryable 503",
                        exc_info=True)
        if not started:
            await _send_final(send, {"type": "http.response.start", "status": 500, "headers": []}, b"")


def _replica_lost(status: int, headers, body: bytes) -> bool:
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if status == 500:
        return b"json" not in content_type
    try:
        return json.loads(body).get("error", {}).get("code") == "engine_dead"
    except (ValueError, AttributeError):
        return False


async def _send_final(send, start: dict, body: bytes) -> None:
    if _replica_lost(start["status"], start.get("headers") or [], body):
        body = json.dumps(REPLICA_LOST).encode()
        start = {"type": "http.response.start", "status": 503,
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"retry-after", b"1")]}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`): the
    middlewares that route guided requests by value name and make a lost replica retryable."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware), Middleware(ValueRoutingMiddleware)]


# ---------------------------------------------------------------------- replica settings
SECRETS = ("api_key", "admin_key", "api_keys")
NOT_FOR_REPLICAS = {"replicas", "port"}  # the proxy listens; a replica binds no port


def replica_args(settings) -> dict:
    """The settings a replica is built from, as plain JSON values: those set (flags, environment)
    except secrets, which travel as `IRO_*` environment variables, never in Ray's stored config."""
    return settings.model_dump(mode="json", exclude_unset=True, exclude=set(SECRETS) | NOT_FOR_REPLICAS)


def secret_env(settings) -> dict[str, str]:
    """`IRO_API_KEY` / `IRO_ADMIN_KEY` / `IRO_API_KEYS` (JSON; those set) for the replicas' environment."""
    env = {f"IRO_{name.upper()}": value.get_secret_value() for name in SECRETS
           if isinstance(value := getattr(settings, name), SecretStr)}
    if settings.api_keys:
        env["IRO_API_KEYS"] = json.dumps({name: key.get_secret_value() for name, key in settings.api_keys.items()})
    return env


# ---------------------------------------------------------------------- what each replica serves
REPORT_STALE = 10.0
"""A replica whose last report is older than this is left out (dead, or restarting)."""


class ReplicaReports:
    """What each replica serves, as it last reported it (the state of `server.ray_serve.ReplicaBoard`).

    >>> board = ReplicaReports(); board.report("r1", {"tldr": 2}, None, now=100.0)
    >>> [r["values"] for r in board.snapshot(now=105.0)], board.snapshot(now=111.0)
    ([{'tldr': 2}], [])
    """

    def __init__(self, stale: float = REPORT_STALE):
        self.stale = stale
        self.reports: dict[str, dict] = {}
        self.metrics: dict[str, bytes] = {}

    def report(self, replica: str, values: dict[str, int], registry_error: str | None, metrics: bytes | None = None,
               *, now: float | None = None) -> None:
        """`metrics`: the replica's `/metrics` exposition (`server.metrics.Metrics.render`)."""
        self.reports[replica] = {"replica": replica, "values": dict(values), "registry_error": registry_error,
                                 "reported_at": time.time() if now is None else now}
        if metrics is not None:
            self.metrics[replica] = metrics

    def snapshot(self, *, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        for replica in [r for r, rep in self.reports.items() if now - rep["reported_at"] > self.stale]:
            del self.reports[replica]
            self.metrics.pop(replica, None)
        return sorted(self.reports.values(), key=lambda r: r["replica"])

    def metrics_of_replicas(self, *, now: float | None = None) -> dict[str, bytes]:
        """The last exposition of every live replica (a replica that stopped reporting drops out)."""
        live = {r["replica"] for r in self.snapshot(now=now)}
        return {replica: text for replica, text in self.metrics.items() if replica in live}
