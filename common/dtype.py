"""The dtype this machine computes fastest at full quality: bfloat16 where the hardware has it, else float32.

On a CPU, bf16 matmuls are native only with AVX512-BF16 or AMX (`/proc/cpuinfo` flags `avx512_bf16`,
`amx_bf16`); elsewhere (AVX2-only, most AVX-512 parts without BF16) torch emulates them through
float32 conversions and runs slower than float32 itself. On CUDA, bf16 where the device supports it.
Every component (engine, value scorer, trainer, bench) resolves its `"auto"` dtype here, so one
machine makes one choice, and logs it with the reason.

    >>> machine_dtype(cpuinfo="model name : Some CPU\\nflags : fpu sse avx2\\n", cuda=False).dtype
    'float32'
    >>> resolve_dtype("bfloat16")  # an explicit choice wins
    'bfloat16'
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""`/proc/cpuinfo` flags of native bf16 compute (either suffices)."""


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    """"bfloat16" or "float32"."""
    reason: str
    """Why, naming the device (CPU model and flags, or the CUDA device)."""

    def __str__(self) -> str:
        return f"dtype {self.dtype} ({self.reason})"


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(CPU model name, flags) of the first processor in `/proc/cpuinfo` text.

    >>> parse_cpuinfo("model name\\t: Intel Xeon\\nflags\\t\\t: avx2 amx_bf16\\n")
    ('Intel Xeon', {'amx_bf16', 'avx2'})
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
    """This machine's dtype: on CUDA bf16 where the device supports it, on CPU bf16 only with
    AVX512-BF16 or AMX, float32 otherwise. `device` ("cpu", "cuda", None: CUDA if present) is where
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


def _cuda_dtype() -> DtypeChoice:
    import torch

    name = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported():
        return DtypeChoice("bfloat16", f"CUDA {name} supports bf16")
    return DtypeChoice("float32", f"CUDA {name} has no bf16")


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to go by, so the safe choice
        return ""


def resolve_dtype(requested: str | None = "auto", device: str | None = None, **machine) -> str:
    """`requested` ("bfloat16" or "float32"), or this machine's choice for "auto"/None (for work
    on `device`, see `machine_dtype`)."""
    if requested in (None, "auto"):
        return machine_dtype(device, **machine).dtype
    if requested not in DTYPES and requested != "float16":
        raise ValueError(f"unknown dtype {requested!r}: expected auto, {' or '.join(DTYPES)}")
    return requested


def describe_dtype(requested: str | None = "auto", device: str | None = None) -> DtypeChoice:
    """The dtype `requested` resolves to, with why (for the one log line at start)."""
    choice = machine_dtype(device)
    if requested in (None, "auto"):
        return choice
    note = "machine's choice" if requested == choice.dtype else f"machine's choice would be {choice.dtype}"
    return DtypeChoice(requested, f"set explicitly; {note}: {choice.reason}")


_logged: set[tuple[str, str]] = set()


def log_dtype(component: str, requested: str | None = "auto", device: str | None = None) -> str:
    """Resolve `requested` and log the choice once per component, e.g.
    "serve: dtype bfloat16 (Intel Xeon ... has amx_bf16)". Returns the resolved dtype."""
    choice = describe_dtype(requested, device)
    if (component, choice.dtype) not in _logged:
        _logged.add((component, choice.dtype))
        log.info("%s: %s", component, choice)
    return choice.dtype
