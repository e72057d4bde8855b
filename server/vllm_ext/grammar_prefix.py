"""Structured outputs that continue a beam: the grammar starts after the beam's tokens.

vLLM applies a request's structured-output grammar (a JSON schema, `json_object`) to the tokens
it *generates*; the prompt is not fed to the grammar. A value-guided search asks for each chunk
as a new request whose prompt ends with the beam's earlier chunks, so with a plain constraint
every chunk would have to be a whole JSON document on its own. This patch lets a request say
"my last N prompt tokens were generated under this grammar already" (`GRAMMAR_PREFIX_ARG` in
`SamplingParams.extra_args`, set by `server.engine.to_sampling_params` from
`EngineRequest.grammar_prefix`): once the grammar is compiled, it is advanced over those N
tokens, so the chunk continues the document where the beam stopped.

It wraps `StructuredOutputManager._create_grammar` (vllm 0.32.x), which runs in the engine-core
process, where vLLM loads its general plugins (`server.vllm_ext`). `supported()` answers whether it took; the API process refuses
a guided request with `response_format` (400) when it did not.
"""

from __future__ import annotations

from server.vllm_ext.registry import INSTALLED, check_method

GRAMMAR_PREFIX_ARG = "iro_grammar_prefix"
"""`SamplingParams.extra_args` key: how many trailing prompt tokens the grammar must accept first."""


def targets() -> tuple:
    from vllm.v1.structured_output import StructuredOutputManager

    return (StructuredOutputManager,)


def probe(cls: type) -> None:
    check_method(cls, "_create_grammar", ("request",))


def supported() -> bool:
    """Whether structured outputs can continue a beam: the patch took in this process (the engine's
    start loads vLLM's plugins here, as in every process vLLM starts, so the engine core's outcome is
    this one's); with no engine started, whether it would take (probed; nothing is patched)."""
    from server.vllm_ext import registry

    status = registry.STATUS.get("grammar_prefix")
    if status is not None:
        return status == INSTALLED
    try:
        import vllm

        registry.check_vllm_version(vllm.__version__)
        probe(*targets())
    except (ImportError, registry.PatchMismatch):
        return False
    return True


def patch_create_grammar(cls) -> None:
    """Advance each new grammar over the request's last `GRAMMAR_PREFIX_ARG` prompt tokens. Idempotent."""
    if getattr(cls, "_iro_grammar_prefix", False):
        return
    original = cls._create_grammar

    def _create_grammar(self, request):
        grammar = original(self, request)
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        n = int(extra.get(GRAMMAR_PREFIX_ARG) or 0)
        if n > 0:
            prefix = list(request.prompt_token_ids[-n:])
            if not grammar.accept_tokens(request.request_id, prefix):
                # Fails this request only (the scheduler reads the error from the future).
                raise ValueError(f"the {n} prefix tokens do not match the request's grammar")
        return grammar

    cls._create_grammar = _create_grammar
    cls._iro_grammar_prefix = True


apply = patch_create_grammar
