"""The dtype this machine computes fastest at full quality: bfloat16 where the hardware has it natively;
else float32 on a CPU and float16 on a GPU.

On a CPU, bf16 matmuls are native only with AVX512-BF16 or AMX (`/proc/cpuinfo` flags `avx512_bf16`,
`amx_bf16`); elsewhere (AVX2-only, most AVX-512 parts without BF16) torch emulates them through
float32 conversions and runs slower than float32 itself. On CUDA, bf16 only from compute capability
8.0 (Ampere: A100, A10, L4, H100, ...); `torch.cuda.is_bf16_supported()` also counts emulation, so a
T4 or V100 (7.x) would get bf16, which vLLM refuses to run: those get float16, their native half
type. A GPU never gets float32 by default (half the speed, twice the memory).
Every component (engine, value scorer, trainer, bench) resolves its `"auto"` dtype here, so one
machine makes one choice, and logs it with the reason (`dtype_and_reason` for a report).

    >>> machine_dtype(cpuinfo="model name : Some CPU\\nflags : fpu sse avx2\\n", cuda=False).dtype
    'float32'
    >>> cuda_dtype("Tesla T4", (7, 5))
    DtypeChoice(dtype='float16', reason='CUDA Tesla T4 (compute capability 7.5) has no native bf16 (needs 8.0+)')
    >>> resolve_dtype("bfloat16")  # an explicit choice wins
    'bfloat16'
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32", "float16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""`/proc/cpuinfo` flags of native bf16 compute (either suffices)."""


CUDA_BF16_CAPABILITY = (8, 0)
"""The first CUDA compute capability with native bf16 (Ampere)."""


class DtypeChoice(NamedTuple):
    """A dtype and why; unpacks as `dtype, reason = ...` (what `iro doctor` prints)."""

    dtype: str
    """"bfloat16", "float16" or "float32"."""
    reason: str
    """Why, naming the device (CPU model and flags, or the CUDA device and its compute capability)."""

    def __str__(self) -> str:
        return f"dtype {self.dtype} ({self.reason})"


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(CPU model name, flags) of the first processor in `/proc/cpuinfo` text.

    >>> model, flags = parse_cpuinfo("model name\\t: Intel Xeon\\nflags\\t\\t: avx2 amx_bf16\\n")
    >>> model, sorted(flags)
    ('Intel Xeon', ['amx_bf16', 'avx2'])
    """
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_dtype(cpuinfo: str) -> DtypeChoice:
    """The CPU's choice from its `/proc/cpuinfo` text."""
    model, flags = parse_cpuinfo(cpuinfo)
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    if native:
        return DtypeChoice("bfloat16", f"{model} has {' and '.join(native)}")
    return DtypeChoice("float32", f"{model} has no native bf16 ({' or '.join(CPU_BF16_FLAGS)})")


def machine_dtype(device: str | None = None, *, cpuinfo: str | None = None, cuda: bool | None = None) -> DtypeChoice:
    """This machine's dtype: on CUDA bf16 from compute capability 8.0 and float16 below it, on CPU
    bf16 only with AVX512-BF16 or AMX and float32 otherwise. `device` ("cpu", "cuda", None: CUDA if present) is where
    the work runs; `cpuinfo` and `cuda` stand in for the machine (tests)."""
    if device is not None and cuda is None:
        cuda = str(device).startswith("cuda")
    if cpuinfo is None and cuda is None:
        return _this_machine()
    if cuda:
        return _cuda_dtype()
    return cpu_dtype(cpuinfo if cpuinfo is not None else _read_cpuinfo())


@functools.cache
def _this_machine() -> DtypeChoice:
    import torch

    return _cuda_dtype() if torch.cuda.is_available() else cpu_dtype(_read_cpuinfo())


def cuda_dtype(name: str, capability: tuple[int, int]) -> DtypeChoice:
    """A CUDA device's choice from its name and compute capability: bf16 from 8.0, else float16.

    >>> cuda_dtype("NVIDIA H100", (9, 0)).dtype, cuda_dtype("Tesla V100", (7, 0)).dtype
    ('bfloat16', 'float16')
    """
    where = f"CUDA {name} (compute capability {capability[0]}.{capability[1]})"
    if tuple(capability) >= CUDA_BF16_CAPABILITY:
        return DtypeChoice("bfloat16", f"{where} computes bf16 natively")
    return DtypeChoice("float16", f"{where} has no native bf16 (needs {CUDA_BF16_CAPABILITY[0]}.{CUDA_BF16_CAPABILITY[1]}+)")


def _cuda_dtype() -> DtypeChoice:
    import torch

    return cuda_dtype(torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability()))


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to go by, so the safe choice
        return ""


def resolve_dtype(requested: str | None = "auto", device: str | None = None, **machine) -> str:
    """`requested` ("bfloat16", "float32" or "float16"), or this machine's choice for "auto"/None
    (for work on `device`, see `machine_dtype`)."""
    if requested in (None, "auto"):
        return machine_dtype(device, **machine).dtype
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}: expected auto, {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    return requested


def describe_dtype(requested: str | None = "auto", device: str | None = None) -> DtypeChoice:
    """The dtype `requested` resolves to, with why (for the one log line at start)."""
    if requested not in (None, "auto"):
        resolve_dtype(requested)  # an unknown name fails here, as it would anywhere else
    choice = machine_dtype(device)
    if requested in (None, "auto"):
        return choice
    note = "machine's choice" if requested == choice.dtype else f"machine's choice would be {choice.dtype}"
    return DtypeChoice(requested, f"set explicitly; {note}: {choice.reason}")


def dtype_and_reason(requested: str | None = "auto", device: str | None = None) -> tuple[str, str]:
    """(dtype, reason) of `requested` on this machine, for a report such as `iro doctor`:
    ("bfloat16", "CUDA NVIDIA H100 ... (compute capability 9.0) computes bf16 natively")."""
    choice = describe_dtype(requested, device)
    return choice.dtype, choice.reason


_logged: set[tuple[str, str]] = set()


def log_dtype(component: str, requested: str | None = "auto", device: str | None = None) -> str:
    """Resolve `requested` and log the choice once per component, e.g.
    "serve: dtype bfloat16 (Intel Xeon ... has amx_bf16)". Returns the resolved dtype."""
    choice = describe_dtype(requested, device)
    if (component, choice.dtype) not in _logged:
        _logged.add((component, choice.dtype))
        log.info("%s: %s", component, choice)
    return choice.dtype
