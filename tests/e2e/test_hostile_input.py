"""Hostile input against the real server (issue 25): each finding of the hostile-client pass as a
regression test. Every refusal is a 4xx in OpenAI's shape naming the field (never a 500, never a
503 that tells the client to retry a request that can never succeed), and the server keeps
serving afterwards.

Bodies are sent as raw bytes: `json.dumps` writes a lone surrogate as the escape `\\ud800` (valid
JSON text, but not valid Unicode once decoded) and keeps `Infinity`, which is what a hostile
client sends.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_guided import iro_values_init, wait_serving
from tests.e2e.test_robustness_basic import assert_error_shape

pytestmark = pytest.mark.e2e

VALUE = "hostile"
LONE = "\ud800"  # a lone UTF-16 surrogate: json.dumps escapes it, the server's JSON decoder restores it


@pytest.fixture(scope="module")
def value(server) -> str:
    version = iro_values_init(server, VALUE)
    wait_serving(server, VALUE, version)
    return VALUE


def post_raw(server, path: str, body: dict, *, admin: bool = False):
    client = server.admin() if admin else server.http()
    with client as http:
        response = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        health = http.get("/health").status_code  # same connection: the refusal did not break it
    assert health == 200
    return response


def chat(server, **extra) -> dict:
    return {"model": server.model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}


def completion(server, **extra) -> dict:
    return {"model": server.model_id, "prompt": "Hi", "max_tokens": 2, **extra}


# ----------------------------------------------------------------------------- lone surrogates
# Before: prompt, chat content and score responses answered 500 "internal error (TypeError)";
# a stop string 503 "engine_error" (retry!); a model id 400 with a Python codec message.
SURROGATES = [
    ("completion prompt", "/v1/completions", lambda s: completion(s, prompt=f"a{LONE}b"), "prompt"),
    ("completion prompt list", "/v1/completions", lambda s: completion(s, prompt=["ok", LONE]), "prompt"),
    ("chat content", "/v1/chat/completions",
     lambda s: chat(s, messages=[{"role": "user", "content": f"hi {LONE}"}]), "messages.0.content"),
    ("chat content part", "/v1/chat/completions",
     lambda s: chat(s, messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]), "messages.0.content"),
    ("stop string", "/v1/completions", lambda s: completion(s, stop=LONE), "stop"),
    ("stop list", "/v1/chat/completions", lambda s: chat(s, stop=["\n", f"x{LONE}"]), "stop.1"),
    ("model id", "/v1/chat/completions", lambda s: chat(s, model=f"{s.model_id}+{LONE}"), "model"),
    ("user", "/v1/completions", lambda s: completion(s, user=LONE), "user"),
    ("guidance value", "/v1/completions", lambda s: completion(s, guidance={"value": LONE}), "guidance.value"),
    ("json schema key", "/v1/completions",
     lambda s: completion(s, response_format={"type": "json_schema", "json_schema": {
         "name": "x", "schema": {"type": "object", "properties": {LONE: {"type": "string"}}}}}),
     "response_format.json_schema.schema"),
    ("score response", "/v1/score", lambda s: {"value": VALUE, "prompt": "Hi", "responses": ["fine", LONE]},
     "responses"),
    ("score prompt", "/v1/score", lambda s: {"value": VALUE, "prompt": LONE, "responses": ["fine"]}, "prompt"),
]


@pytest.mark.parametrize("path,make,param", [c[1:] for c in SURROGATES], ids=[c[0] for c in SURROGATES])
def test_lone_surrogate_is_refused_with_400_naming_the_field(server, value, path, make, param):
    error = assert_error_shape(post_raw(server, path, make(server)), 400, code="invalid_value", param=param)
    assert "surrogate" in error["message"]


# ----------------------------------------------------------------------------- names and versions
def test_value_name_with_a_trailing_newline_is_not_a_valid_name(server, value):
    """Before: `GET /v1/values/hostile%0A` answered 200 (NAME_RE's `$` matches before a final newline)."""
    with server.admin() as admin:
        assert admin.get(f"/v1/values/{VALUE}").status_code == 200
        for method, path in (("GET", f"/v1/values/{VALUE}%0A"), ("POST", f"/v1/values/{VALUE}%0A/load"),
                             ("DELETE", f"/v1/values/{VALUE}%0A")):
            assert_error_shape(admin.request(method, path), 400, code="invalid_name", param="name")
    error = assert_error_shape(post_raw(server, "/v1/completions", completion(server, guidance={"value": f"{VALUE}\n"})),
                               400, param="guidance.value")
    assert "invalid value name" in error["message"]


@pytest.mark.parametrize("spec", [f"{VALUE}@\u00b2", f"{VALUE}@\uff11", f"{VALUE}@1\n", f"{VALUE}@0", f"{VALUE}@"])
def test_version_in_a_spec_must_be_ascii_digits(server, value, spec):
    """Before: `name@²` reached int() and came back as a bare ValueError's text."""
    error = assert_error_shape(post_raw(server, "/v1/completions", completion(server, guidance={"value": spec})),
                               400, param="guidance.value")
    assert "version" in error["message"] or "name" in error["message"]


def test_pinned_version_must_be_listed_and_not_unloaded(server, value):
    """Before: `name@N` loaded any version on disk for any API-key holder, even an unloaded value's."""
    name = "hostile-pin"
    version = iro_values_init(server, name)
    wait_serving(server, name, version)
    body = completion(server, max_tokens=2, temperature=0.7, guidance={"value": f"{name}@{version + 5}"})
    assert_error_shape(post_raw(server, "/v1/completions", body), 404, code="value_not_found", param="guidance.value")
    with server.admin() as admin:
        assert admin.delete(f"/v1/values/{name}").status_code == 200
    try:
        body["guidance"]["value"] = f"{name}@{version}"
        error = assert_error_shape(post_raw(server, "/v1/completions", body), 404, code="value_not_found",
                                   param="guidance.value")
        assert "unloaded" in error["message"]
    finally:
        with server.admin() as admin:
            assert admin.post(f"/v1/values/{name}/load").status_code == 200


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("raw,param", [
    ('"guidance": {"value": "hostile", "beta": Infinity}', "guidance.beta"),
    ('"guidance": {"value": "hostile", "betas": [NaN]}', "guidance.betas.0"),
    ('"temperature": NaN', "temperature"),
    ('"top_p": Infinity', "top_p"),
    ('"logit_bias": {"5": -Infinity}', "logit_bias.5"),
])
def test_non_finite_numbers_are_refused(server, value, raw, param):
    """Before: `beta: Infinity` was accepted, the whole search ran, and only the JSON encoding of the
    answer failed (a 400 carrying a bare ValueError's text)."""
    body = json.dumps(completion(server, max_tokens=2, temperature=0.7))[:-1] + ", " + raw + "}"
    if '"temperature"' in raw:
        body = body.replace('"temperature": 0.7, ', "")
    with server.http() as http:
        response = http.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"})
    error = assert_error_shape(response, 400, code="invalid_value", param=param)
    assert "finite" in error["message"]


# ----------------------------------------------------------------------------- the cost model
def test_every_list_has_a_bound_named_in_the_refusal(server, value):
    """Before: `stop`, `stop_token_ids`, `logit_bias` and completion prompt lists had no size limits."""
    cases = [
        (completion(server, stop=[f"s{i}" for i in range(17)]), "stop", "16"),
        (completion(server, stop_token_ids=list(range(65))), "stop_token_ids", "64"),
        (completion(server, logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "300"),
        (completion(server, prompt=["a"] * 65), "prompt", "64"),
        (completion(server, stop="x" * 257), "stop", "256"),
        ({"value": VALUE, "prompt": "Hi", "responses": ["a"] * 257}, "responses", "256"),
    ]
    for body, param, limit in cases:
        path = "/v1/score" if "responses" in body else "/v1/completions"
        error = assert_error_shape(post_raw(server, path, body), 400, param=param)
        assert limit in error["message"], (param, error)


def test_guided_search_steps_are_bounded(server, value):
    """Before: l=1 with no max_tokens ran a search of up to the whole context, one token per step."""
    body = chat(server, temperature=0.7, guidance={"value": VALUE, "w": 2, "k": 2, "l": 1})
    body.pop("max_tokens")
    error = assert_error_shape(post_raw(server, "/v1/chat/completions", body), 400, code="too_many_steps",
                               param="guidance.l")
    assert "max_tokens" in error["message"]
    ok = post_raw(server, "/v1/chat/completions", dict(body, max_tokens=3))  # a bounded search still runs
    assert ok.status_code == 200, ok.text
    assert ok.json()["guidance"]["chunks"] >= 1


def test_score_tokens_are_bounded(server, value):
    """Before: /v1/score took 256 responses of full context length on one scorer thread."""
    long = "word " * 1500
    body = {"value": VALUE, "prompt": "Hi", "responses": [long] * 16}
    error = assert_error_shape(post_raw(server, "/v1/score", body), 400, code="too_many_tokens", param="responses")
    assert "tokens" in error["message"]
    fine = post_raw(server, "/v1/score", {"value": VALUE, "prompt": "Hi", "responses": ["good", "bad"]})
    assert fine.status_code == 200, fine.text
    assert len(fine.json()["scores"]) == 2


def test_bounds_are_published_in_the_openapi_document(server):
    schemas = server.http().get("/openapi.json").json()["components"]["schemas"]
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[request]["properties"]
        stop_list = next(s for s in props["stop"]["anyOf"] if s.get("type") == "array")
        assert stop_list["maxItems"] == 16 and stop_list["items"]["maxLength"] == 256
        assert next(s for s in props["stop_token_ids"]["anyOf"] if s.get("type") == "array")["maxItems"] == 64
        assert next(s for s in props["logit_bias"]["anyOf"] if s.get("type") == "object")["maxProperties"] == 300
    assert schemas["ScoreRequest"]["properties"]["responses"]["maxItems"] == 256
