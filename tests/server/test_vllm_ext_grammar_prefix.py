"""The structured-output patch that lets a chunk continue its beam's JSON (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.vllm_ext import grammar_prefix
from server.vllm_ext.grammar_prefix import GRAMMAR_PREFIX_ARG, patch_create_grammar


class Grammar:
    def __init__(self, accepts: bool = True):
        self.accepted: list[int] = []
        self.accepts = accepts

    def accept_tokens(self, request_id, tokens):
        self.accepted += tokens
        return self.accepts


def make_manager(grammar):
    class Manager:
        def _create_grammar(self, request):
            return grammar

    patch_create_grammar(Manager)
    patch_create_grammar(Manager)  # idempotent
    return Manager()


def request(extra_args):
    return SimpleNamespace(request_id="r", prompt_token_ids=[1, 2, 3, 4, 5],
                           sampling_params=SimpleNamespace(extra_args=extra_args))


def test_the_grammar_is_advanced_over_the_beam_tokens_only():
    grammar = Grammar()
    assert make_manager(grammar)._create_grammar(request({GRAMMAR_PREFIX_ARG: 2})) is grammar
    assert grammar.accepted == [4, 5]


@pytest.mark.parametrize("extra", [None, {}, {GRAMMAR_PREFIX_ARG: 0}, {"other": 1}])
def test_requests_without_a_prefix_are_untouched(extra):
    grammar = Grammar()
    make_manager(grammar)._create_grammar(request(extra))
    assert grammar.accepted == []


def test_a_prefix_outside_the_grammar_fails_the_request():
    with pytest.raises(ValueError, match="do not match"):
        make_manager(Grammar(accepts=False))._create_grammar(request({GRAMMAR_PREFIX_ARG: 3}))


def test_a_manager_without_create_grammar_is_not_patched_and_the_record_says_why(monkeypatch):
    from server.vllm_ext import registry

    monkeypatch.setattr(registry, "STATUS", {})

    class Manager:
        pass

    patch = registry.Patch("grammar_prefix", lambda: (Manager,), grammar_prefix.probe, grammar_prefix.apply, "refused")
    assert not registry.install(patch, cpu=True, version="0.32.0")
    assert registry.STATUS["grammar_prefix"] == "Manager._create_grammar is missing"
    assert not grammar_prefix.supported()  # the outcome this process recorded


def test_this_vllm_is_supported():
    pytest.importorskip("vllm")
    assert grammar_prefix.supported()


def test_guided_cbs_with_response_format_is_refused_without_the_patch(monkeypatch):
    import asyncio

    from common.protocol import CompletionRequest
    from server.errors import InvalidRequestError
    from server.guided import GuidedGenerator
    from tests.server.conftest import OneValue
    from tests.server.test_sampling import _ChunkEngine, _Scorer

    monkeypatch.setattr(grammar_prefix, "supported", lambda: False)
    engine = _ChunkEngine()
    guided = GuidedGenerator(engine, _Scorer(), OneValue())
    request = CompletionRequest(model="tiny+v", prompt="hi", max_tokens=4, response_format={"type": "json_object"})
    with pytest.raises(InvalidRequestError) as exc:
        asyncio.run(guided.prepare(request.to_generation(), "v"))
    assert exc.value.param == "response_format"
    bon = CompletionRequest(model="tiny+v", prompt="hi", max_tokens=4, response_format={"type": "json_object"},
                            guidance={"mode": "bon", "k": 2})
    assert asyncio.run(guided.prepare(bon.to_generation(), "v")).params.mode == "bon"  # one request: no prefix
