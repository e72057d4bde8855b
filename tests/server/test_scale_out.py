"""Scale-out without Ray: routing guided requests by value name (the proxy's middleware), the
settings replicas get, the board of what each replica serves, /health degraded, /v1/values'
`replicas` (tests/e2e/test_ray_serve_e2e.py runs the real thing)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from server.scale_out import (MULTIPLEX_HEADER, ReplicaReports, ValueRoutingMiddleware, replica_args, routing_key,
                              secret_env)
from server.settings import ServerSettings
from tests.server.conftest import make_client


@pytest.mark.parametrize("path, body, key", [
    ("/v1/chat/completions", {"model": "base+tldr", "messages": []}, "tldr"),
    ("/v1/chat/completions", {"model": "base+tldr@3", "messages": []}, "tldr"),
    ("/v1/completions", {"model": "base", "prompt": "x", "guidance": {"value": "sent.v2"}}, "sent.v2"),
    ("/v1/chat/completions", {"model": "policy+tldr", "guidance": {"value": "other"}}, "other"),  # guidance wins
    ("/v1/score", {"value": "tldr@2", "prompt": "p", "responses": ["a"]}, "tldr"),
    ("/v1/chat/completions", {"model": "base", "messages": []}, None),  # plain sampling: any replica
    ("/v1/chat/completions", {"model": "base+../etc", "messages": []}, None),  # not a value name
    ("/v1/chat/completions", {"model": "base+" + "x" * 65}, None),
    ("/v1/chat/completions", {"guidance": {"value": 3}}, None),
    ("/v1/models", {"model": "base+tldr"}, None),  # not a routed path
])
def test_routing_key(path, body, key):
    assert routing_key(path, json.dumps(body).encode()) == key


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_routing_key_never_raises(body):
    assert routing_key("/v1/chat/completions", body) is None


def run_middleware(chunks: list[bytes], *, path="/v1/chat/completions", headers=(), max_body=1 << 20):
    """The headers and the body the proxy's inner app sees behind ValueRoutingMiddleware."""
    seen = {}

    async def inner(scope, receive, send):
        seen["headers"] = scope["headers"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen["body"] = body

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(ValueRoutingMiddleware(inner, max_body=max_body)(scope, receive, None))
    return dict(seen["headers"]), seen["body"]


def test_middleware_adds_the_header_and_replays_the_body_unchanged():
    body = json.dumps({"model": "base+tldr", "messages": [{"role": "user", "content": "hi " * 50}]}).encode()
    chunks = [body[:17], body[17:60], body[60:]]
    headers, replayed = run_middleware(chunks, headers=[(b"authorization", b"Bearer k")])
    assert headers[MULTIPLEX_HEADER] == b"tldr" and headers[b"authorization"] == b"Bearer k"
    assert replayed == body


def test_middleware_keeps_a_client_header_and_leaves_big_or_plain_bodies_unrouted():
    body = json.dumps({"model": "base+tldr"}).encode()
    headers, _ = run_middleware([body], headers=[(b"serve-multiplexed-model-id", b"mine")])
    assert MULTIPLEX_HEADER not in headers and headers[b"serve-multiplexed-model-id"] == b"mine"
    big = json.dumps({"model": "base+tldr", "prompt": "x" * 5000}).encode()
    headers, replayed = run_middleware([big[:3000], big[3000:]], max_body=2048)  # read past the limit: replayed whole
    assert MULTIPLEX_HEADER not in headers and replayed == big
    headers, _ = run_middleware([json.dumps({"model": "base"}).encode()])
    assert MULTIPLEX_HEADER not in headers


def test_replica_args_keep_secrets_out_of_ray_and_bind_no_port():
    settings = ServerSettings(api_key="sk-1", admin_key="adm", port=9000, replicas=3, kv_cache_gib=1,
                              values_dir="/srv/values")
    args = replica_args(settings)
    assert args["kv_cache_gib"] == 1 and args["values_dir"] == "/srv/values"
    assert not {"api_key", "admin_key", "port", "replicas"} & set(args)
    assert "sk-1" not in json.dumps(args)
    assert secret_env(settings) == {"IRO_API_KEY": "sk-1", "IRO_ADMIN_KEY": "adm"}
    assert ServerSettings(**args).kv_cache_gib == 1  # a replica rebuilds the same settings


def test_replicas_is_a_validated_setting():
    assert ServerSettings().replicas == 1
    with pytest.raises(ValueError, match="replicas"):
        ServerSettings(replicas=0)


def test_board_forgets_a_replica_that_stopped_reporting():
    board = ReplicaReports(stale=10)
    board.report("b", {"tldr": 1}, None, now=0.0)
    board.report("a", {"tldr": 2}, "cannot read", now=5.0)
    assert [r["replica"] for r in board.snapshot(now=9.0)] == ["a", "b"]
    board.report("b", {"tldr": 2}, None, now=12.0)
    assert [(r["replica"], r["values"]) for r in board.snapshot(now=16.0)] == [("b", {"tldr": 2})]


def test_board_keeps_the_metrics_of_live_replicas_only():
    board = ReplicaReports(stale=10)
    board.report("a", {}, None, b"a-metrics", now=0.0)
    board.report("b", {}, None, b"b-metrics", now=5.0)
    board.report("b", {}, None, now=8.0)  # a report without metrics keeps the last ones
    assert board.metrics_of_replicas(now=9.0) == {"a": b"a-metrics", "b": b"b-metrics"}
    assert board.metrics_of_replicas(now=12.0) == {"b": b"b-metrics"}  # a stopped reporting


def test_metrics_through_the_proxy_are_every_replicas_each_labelled():
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    client = make_client()
    other = Metrics()
    other.rejected.inc(4)
    seen = {}

    async def replica_metrics(own):  # server.ray_serve.IroReplica.replicas_metrics
        seen["own"] = own
        return {"r1": own, "r2": other.render()}

    single = client.get("/metrics").text
    assert 'replica="' not in single  # a single server: its own metrics, unlabelled
    client.app.state.replica_metrics = replica_metrics
    client.get("/v1/models")
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    rejected = {s.labels["replica"]: s.value for s in families["iro_requests_rejected"].samples}
    assert rejected == {"r1": 0.0, "r2": 4.0}
    requests = [s for s in families["iro_requests"].samples if s.labels.get("endpoint") == "/v1/models"]
    assert [s.labels["replica"] for s in requests] == ["r1"]  # this replica's own, fresh
    assert b"iro_requests_total" in seen["own"]


def test_health_is_degraded_while_a_registry_is_unreadable():
    client = make_client()
    client.app.state.values = SimpleNamespace(registry_error="cannot read /srv/private/values: [Errno 2]")
    r = client.get("/health", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["status"] == "degraded"
    assert "value registry" in r.json()["reason"] and "/srv" not in r.text  # /health is open: no paths
    client.app.state.values.registry_error = None
    assert client.get("/health").json() == {"status": "ok"}
    client.app.state.policies = SimpleNamespace(registry=SimpleNamespace(healthy=False))  # an object store down
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "degraded" and "policy registry" in r.json()["reason"]


def test_values_listing_names_what_each_replica_serves():
    from common.admin_protocol import ReplicaServing, ValueList

    client = make_client()
    client.app.state.values = SimpleNamespace(list=lambda: ValueList(data=[]))
    assert client.get("/v1/values").json()["replicas"] is None  # a single server

    async def board():
        return [ReplicaServing(replica="r1", values={"tldr": 2}, reported_at=1.0)]  # server.ray_serve's board

    client.app.state.replica_board = board
    assert client.get("/v1/values").json()["replicas"] == [
        {"replica": "r1", "values": {"tldr": 2}, "registry_error": None, "reported_at": 1.0}]


# ---------------------------------------------------------------------- a lost replica is retryable
def _through_replica_lost(status: int, content_type: bytes, body: bytes) -> tuple[int, dict, bytes]:
    from server.scale_out import ReplicaLostMiddleware

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body[:5], "more_body": True})
        await send({"type": "http.response.body", "body": body[5:], "more_body": False})

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(ReplicaLostMiddleware(inner)({"type": "http", "method": "POST", "path": "/v1/completions"},
                                             None, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_a_replica_that_died_mid_request_answers_a_retryable_503():
    # what Ray Serve's proxy answers by itself when the replica's actor dies: a 500, the exception as text
    status, headers, body = _through_replica_lost(500, b"text/plain; charset=utf-8", b"RayActorError: The actor died")
    assert (status, headers[b"retry-after"]) == (503, b"1")
    assert json.loads(body)["error"]["code"] == "replica_unavailable"
    # a dying replica's own engine_dead means "another replica answers" behind the proxy
    dead = json.dumps({"error": {"message": "engine dead", "type": "service_unavailable", "param": None,
                                 "code": "engine_dead"}}).encode()
    assert json.loads(_through_replica_lost(503, b"application/json", dead)[2])["error"]["code"] == "replica_unavailable"


@pytest.mark.parametrize("ending", ["nothing", "raise"])
def test_a_request_the_proxy_ends_without_a_response_answers_a_retryable_503(ending):
    """Ray Serve 2.60's proxy sends nothing for a request whose replica's actor died (uvicorn then
    answered a bare 500, which no client retries): seen in bench/scale_out.py's replica kill."""
    from server.scale_out import ReplicaLostMiddleware

    async def inner(scope, receive, send):
        if ending == "raise":
            raise RuntimeError("ActorDiedError")

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(ReplicaLostMiddleware(inner)({"type": "http", "method": "POST", "path": "/v1/completions"},
                                             None, send))
    assert (sent[0]["status"], dict(sent[0]["headers"])[b"retry-after"]) == (503, b"1")
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_unavailable"


def test_an_error_after_the_response_started_is_not_hidden():
    from server.scale_out import ReplicaLostMiddleware

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("the stream broke")

    async def send(message):
        pass

    with pytest.raises(RuntimeError, match="the stream broke"):
        asyncio.run(ReplicaLostMiddleware(inner)({"type": "http", "method": "POST", "path": "/v1/completions"},
                                                 None, send))


def test_the_apps_own_errors_pass_through_unchanged():
    app_500 = json.dumps({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}).encode()
    assert _through_replica_lost(500, b"application/json", app_500) == (500, {b"content-type": b"application/json"},
                                                                          app_500)
    busy = json.dumps({"error": {"code": "value_swapping"}}).encode()
    assert _through_replica_lost(503, b"application/json", busy)[::2] == (503, busy)
    assert _through_replica_lost(200, b"application/json", b'{"ok": true}')[::2] == (200, b'{"ok": true}')
