"""What a registry refuses, and why.

    RegistryError          a bad name or version, or an operation the registry cannot do
    └── RegistryUnavailable   the store cannot be reached (network, 5xx, denied): retry later;
                              also a ConnectionError, so `except OSError` treats it as I/O
    CheckpointError        a version that must not be used (hash mismatch, missing file, bad
                           manifest, ...); `reason` is a short machine-readable tag
"""

from __future__ import annotations

from pathlib import Path


class RegistryError(Exception):
    """Bad name/version or a registry operation that cannot be done."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class RegistryUnavailable(RegistryError, ConnectionError):
    """The store (an object store's endpoint) cannot be reached or refused the request; what is
    already loaded or cached keeps serving, and the next call or poll tries again."""


class CheckpointError(Exception):
    """A checkpoint that must not be used; `reason` is a short machine-readable tag."""

    def __init__(self, message: str, *, reason: str, path: Path | None = None):
        super().__init__(message)
        self.reason = reason
        self.path = path


__all__ = ["CheckpointError", "RegistryError", "RegistryUnavailable"]
