"""The machine's dtype (common.dtype): bf16 only where the CPU or GPU computes it natively, overridable."""

from __future__ import annotations

import logging

import pytest

from common import dtype as dtypes
from common.dtype import cpu_dtype, describe_dtype, log_dtype, machine_dtype, parse_cpuinfo, resolve_dtype
from common.engine_args import EngineSettings

FLAGS = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma"
SAPPHIRE = f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: {FLAGS} avx512f avx512_bf16 amx_bf16 amx_tile\n"
COOPER = f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6348H\nflags\t\t: {FLAGS} avx512f avx512_bf16\n"
AMX_ONLY = f"processor\t: 0\nmodel name\t: Some AMX CPU\nflags\t\t: {FLAGS} amx_bf16 amx_tile\n"
AVX2 = (f"processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: {FLAGS}\n\n"
        f"processor\t: 1\nmodel name\t: AMD EPYC 7B12\nflags\t\t: {FLAGS}\n")
AVX512_NO_BF16 = f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: {FLAGS} avx512f avx512bw\n"


@pytest.mark.parametrize("text, expected, named", [
    (SAPPHIRE, "bfloat16", "amx_bf16 and avx512_bf16"),
    (COOPER, "bfloat16", "avx512_bf16"),
    (AMX_ONLY, "bfloat16", "amx_bf16"),
    (AVX2, "float32", "no native bf16"),
    (AVX512_NO_BF16, "float32", "no native bf16"),  # AVX-512 alone emulates bf16 matmuls
    ("", "float32", "unknown CPU"),  # no /proc/cpuinfo: the safe choice
])
def test_cpu_flags_decide_and_the_reason_names_the_cpu(text, expected, named):
    choice = cpu_dtype(text)
    assert choice.dtype == expected
    assert named in choice.reason
    model, _ = parse_cpuinfo(text)
    assert model in choice.reason and str(choice).startswith(f"dtype {expected} (")


def test_first_processor_block_is_read():
    model, flags = parse_cpuinfo(AVX2)
    assert model == "AMD EPYC 7B12" and "avx2" in flags and "avx512_bf16" not in flags


def test_auto_follows_the_machine_and_an_explicit_dtype_wins():
    assert resolve_dtype("auto", cpuinfo=SAPPHIRE) == "bfloat16"
    assert resolve_dtype(None, cpuinfo=AVX2) == "float32"
    assert resolve_dtype("float32", cpuinfo=SAPPHIRE) == "float32"
    assert resolve_dtype("bfloat16", cpuinfo=AVX2) == "bfloat16"
    assert resolve_dtype("float16", cpuinfo=SAPPHIRE) == "float16"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")


@pytest.mark.parametrize("name, capability, expected", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "bfloat16"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bfloat16"),
    ("NVIDIA L4", (8, 9), "bfloat16"),
    ("Tesla T4", (7, 5), "float16"),  # torch.cuda.is_bf16_supported() says True (emulation); vLLM refuses bf16
    ("Tesla V100-SXM2-16GB", (7, 0), "float16"),
])
def test_cuda_gets_bf16_from_compute_capability_8_and_float16_below(monkeypatch, name, capability, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # never consulted
    choice = machine_dtype("cuda", cpuinfo=AVX2)
    assert choice.dtype == expected != "float32"  # a GPU never gets float32 by default
    assert name in choice.reason and f"compute capability {capability[0]}.{capability[1]}" in choice.reason
    assert machine_dtype("cpu", cpuinfo=SAPPHIRE).dtype == "bfloat16"  # CPU work follows the CPU
    monkeypatch.setattr(dtypes, "_this_machine", lambda: dtypes._cuda_dtype())
    dtype, reason = dtypes.dtype_and_reason()  # what `iro doctor` prints
    assert (dtype, reason) == tuple(choice)
    assert dtypes.dtype_and_reason("float32")[1].startswith(f"set explicitly; machine's choice would be {expected}")


def test_the_choice_is_logged_once_per_component_with_its_reason(monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "_this_machine", lambda: cpu_dtype(SAPPHIRE))
    monkeypatch.setattr(dtypes, "_logged", set())
    with caplog.at_level(logging.INFO, logger="common.dtype"):
        assert log_dtype("bench", "auto") == "bfloat16"
        log_dtype("bench", "auto")
        assert log_dtype("trainer", "float32") == "float32"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bench: dtype bfloat16 (Intel(R) Xeon(R) Platinum 8480+ has amx_bf16 and avx512_bf16)",
                     "trainer: dtype float32 (set explicitly; machine's choice would be bfloat16: "
                     "Intel(R) Xeon(R) Platinum 8480+ has amx_bf16 and avx512_bf16)"]
    assert describe_dtype("bfloat16").reason.startswith("set explicitly; machine's choice:")


def test_engine_dtype_defaults_to_auto_and_iro_dtype_overrides(monkeypatch):
    monkeypatch.delenv("IRO_DTYPE", raising=False)
    assert EngineSettings().dtype == "auto"
    monkeypatch.setenv("IRO_DTYPE", "float32")
    assert EngineSettings().dtype == "float32"
