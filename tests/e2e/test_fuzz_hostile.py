"""A bounded Hypothesis fuzz of what schemathesis does not generate (tests/reliability/test_fuzz.py
fuzzes the OpenAPI document itself): text with lone UTF-16 surrogates and non-finite numbers, put
into any string or number field of a valid request, and value names with control characters. The
server must answer a 4xx naming a field, never a 5xx, and keep serving.

Runs on the session's server; every request is refused at validation, so the whole module takes
seconds.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st

pytestmark = pytest.mark.e2e

EXAMPLES = 40
SETTINGS = hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))

SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
HOSTILE_TEXT = st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), SURROGATE, st.text(max_size=8))
NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity"])

# (path, a valid body, its string fields, its number fields): each fuzzed request breaks one of them
TARGETS = [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop": ["\n"], "user": "u",
                         "guidance": {"value": "v", "beta": 1.0}},
     ["prompt", "user", "stop.0", "guidance.value"], ["temperature", "top_p", "guidance.beta", "presence_penalty"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi", "name": "n"}], "max_tokens": 1},
     ["messages.0.content", "messages.0.name", "model"], ["temperature", "frequency_penalty", "min_p"]),
    ("/v1/score", {"value": "v", "prompt": "Hi", "responses": ["a", "b"]}, ["value", "prompt", "responses.1"], []),
]


def put(body: dict, dotted: str, value) -> dict:
    """A copy of `body` with `value` at the dotted path (list indices as numbers)."""
    body = json.loads(json.dumps(body))
    *parents, last = dotted.split(".")
    node = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return body


def check(http: httpx.Client, path: str, raw: str) -> dict:
    response = http.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, (raw[:300], response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


@pytest.mark.parametrize("path,body,strings,numbers", TARGETS, ids=[t[0] for t in TARGETS])
def test_hostile_text_and_numbers_are_4xx(server, path, body, strings, numbers):
    body = {"model": server.model_id, **body} if path != "/v1/score" else body
    seen_params: set[str] = set()
    with server.http() as http:
        @SETTINGS
        @hypothesis.given(field=st.sampled_from(strings), text=HOSTILE_TEXT)
        def text_fields(field, text):
            error = check(http, path, json.dumps(put(body, field, text)))
            assert error["param"] is not None and "surrogate" in error["message"], error
            seen_params.add(error["param"])

        text_fields()
        if numbers:
            @SETTINGS
            @hypothesis.given(field=st.sampled_from(numbers), literal=NON_FINITE)
            def number_fields(field, literal):
                raw = json.dumps(put(body, field, 12345.5)).replace("12345.5", literal)
                error = check(http, path, raw)
                assert error["param"] == field and "finite" in error["message"], error

            number_fields()
        assert http.get("/health").status_code == 200
    assert seen_params  # the fuzz reached the fields it meant to break


@SETTINGS
@hypothesis.given(name=st.text(min_size=1, max_size=12),
                  tail=st.sampled_from(["\n", "\r", "\t", " ", "\x00", "%", "\u2028", "\ud800"]))
def test_value_names_with_control_characters_are_400(server, name, tail):
    """Before: `demo%0A` was a valid name (200)."""
    segment = quote(name + tail, safe="", errors="surrogatepass")
    with server.admin() as admin:
        response = admin.get("/v1/values/" + segment)
    expected = 404 if "/" in name else 400  # an encoded slash is decoded before routing: no such route
    assert response.status_code == expected, (name + tail, response.status_code, response.text[:200])
    assert response.json()["error"]["code"] == ("not_found" if expected == 404 else "invalid_name")
