"""Names and versions in a registry: validated before anything touches a folder or a key."""

from __future__ import annotations

import re

from registry.errors import RegistryError

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: `$` would also match before a final newline
VERSION_RE = re.compile(r"\Av([0-9]{4,9})\Z")
SPEC_VERSION_RE = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses
CURRENT = "CURRENT"
"""The pointer file/object beside the version folders: `v0003\\n`, the version readers serve."""


def validate_name(name: str, param: str = "value") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise RegistryError(f"invalid {param} name {name!r} (letters, digits, '.', '_', '-'; at most 64)", param=param)
    return name


def parse_spec(spec: str, param: str = "value") -> tuple[str, int | None]:
    """`"name"` -> (name, None); `"name@3"` -> (name, 3)."""
    name, sep, version = spec.partition("@")
    validate_name(name, param)
    if not sep:
        return name, None
    if not SPEC_VERSION_RE.fullmatch(version) or int(version) < 1:
        raise RegistryError(f"invalid version in {spec!r} (expected name@N with N >= 1)", param=param)
    return name, int(version)


def vdir(version: int) -> str:
    return f"v{version:04d}"


def parse_current(text: str) -> int | None:
    """The version a CURRENT pointer names (`v0003` or `3`), None when it names none."""
    text = text.strip()
    m = VERSION_RE.fullmatch(text) or re.fullmatch(r"([0-9]{1,9})", text)
    return int(m.group(1)) if m else None


__all__ = ["CURRENT", "NAME_RE", "VERSION_RE", "parse_current", "parse_spec", "validate_name", "vdir"]
