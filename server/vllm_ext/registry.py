"""One registry of the patches this package makes to vLLM: each a name, the vLLM objects it needs,
a probe, an apply step and the fallback that serves when it does not take.

vLLM runs general plugins unguarded in every process it starts, so `install_all` never raises:
a probe that fails (`PatchMismatch`) or an apply step that raises leaves vLLM as it was, and the
outcome is recorded in `STATUS` (this process's) with the reason. The worker reports its own
record back to the API process (`server.vllm_ext.worker`), which never re-runs a probe to guess.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("server.vllm_ext")

TESTED_VLLM = "0.32."
"""vLLM release line these patches were written against (the private methods they wrap change
between lines)."""

INSTALLED = "installed"
NOT_HERE = "not a CPU engine"
"""The outcome of a CPU-only patch in a CUDA process: nothing to do, nothing to warn about."""


class PatchMismatch(Exception):
    """What a patch needs is not in the installed vLLM (the message says what)."""


@dataclass(frozen=True)
class Patch:
    """One change to vLLM. `targets()` imports what it changes (an ImportError: not available
    here); `probe(*targets)` raises `PatchMismatch` when they are not what `apply(*targets)` was
    written for; `apply` is idempotent."""

    name: str
    targets: Callable[[], tuple]
    probe: Callable[..., None]
    apply: Callable[..., None]
    fallback: str
    """What serves instead when the patch is not installed (logged with the reason)."""
    platform: Literal["any", "cpu"] = "any"


STATUS: dict[str, str] = {}
"""patch name -> "installed", or why not, for this process."""
_warned: dict[str, str] = {}


def check_vllm_version(version: str) -> None:
    if not version.startswith(TESTED_VLLM):
        raise PatchMismatch(f"vLLM {version} is not the tested {TESTED_VLLM}x line")


def check_method(cls: Any, name: str, params: tuple[str, ...] = ()) -> None:
    """Raise PatchMismatch unless `cls.name` is a function taking (at least) `params`."""
    fn = getattr(cls, name, None)
    label = getattr(cls, "__name__", repr(cls))
    if not callable(fn):
        raise PatchMismatch(f"{label}.{name} is missing")
    try:
        names = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        raise PatchMismatch(f"{label}.{name} has no readable signature") from None
    missing = [p for p in params if p not in names]
    if missing:
        raise PatchMismatch(f"{label}.{name} no longer takes {', '.join(missing)}")


def check_fields(cls: type, fields: tuple[str, ...]) -> None:
    """Raise PatchMismatch unless the NamedTuple / dataclass `cls` has `fields`."""
    have = set(getattr(cls, "_fields", ()) or getattr(cls, "__dataclass_fields__", {}))
    missing = [f for f in fields if f not in have]
    if missing:
        raise PatchMismatch(f"{cls.__name__} has no field {', '.join(missing)}")


def own(cls: type, flag: str) -> bool:
    """Whether `cls` itself (not a base class) carries `flag`: a subclass may need its own patch."""
    return bool(cls.__dict__.get(flag, False))


def install(patch: Patch, *, cpu: bool, version: str) -> bool:
    """Probe, then apply `patch`; record the outcome in STATUS. Never raises."""
    if STATUS.get(patch.name) == INSTALLED:
        return True
    if patch.platform == "cpu" and not cpu:
        STATUS[patch.name] = NOT_HERE
        return False
    try:
        check_vllm_version(version)
        targets = patch.targets()
        patch.probe(*targets)
        patch.apply(*targets)
    except ImportError as exc:
        STATUS[patch.name] = f"not available in this vLLM build: {exc}"
        return False
    except PatchMismatch as exc:
        STATUS[patch.name] = str(exc)
        return False
    except Exception as exc:  # noqa: BLE001 - a plugin that raises kills every vLLM process
        STATUS[patch.name] = f"{type(exc).__name__}: {exc}"
        return False
    STATUS[patch.name] = INSTALLED
    return True


def install_all(patches: list[Patch], *, cpu: bool, version: str) -> dict[str, str]:
    """Install each of `patches`; log one warning naming every one skipped, why, and its fallback."""
    for patch in patches:
        install(patch, cpu=cpu, version=version)
    fallbacks = {p.name: p.fallback for p in patches}
    skipped = {name: why for name, why in STATUS.items() if why not in (INSTALLED, NOT_HERE) and name in fallbacks}
    if skipped and skipped != _warned:
        _warned.clear()
        _warned.update(skipped)
        log.warning("iro engine patches skipped, falling back: %s",
                    "; ".join(f"{name} ({why}): {fallbacks[name]}" for name, why in skipped.items()))
    return dict(STATUS)
