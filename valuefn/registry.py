"""The value registry, shared by the server (reader) and the trainer (writer): a folder or an
object store (`registry.open_registry(location, Registry)`; `s3://bucket/prefix` works too).

    VALUES/<name>/v0001/{manifest.json, adapter.safetensors, head.safetensors}
    VALUES/<name>/CURRENT          # "v0003\\n": the version readers should serve

Publishing, CURRENT, rollback, pruning and the stores are `registry.base.BaseRegistry`'s (temp
dir, fsync, rename in a folder; conditional writes in an object store): a reader never sees half
a checkpoint. This kind adds what is a value's own: the manifest (`valuefn.checkpoint.Manifest`)
with its chain V_1..V_t, safetensors only, and pruning that keeps CURRENT's chain.

    >>> import tempfile; reg = Registry(tempfile.mkdtemp())
    >>> reg.names()
    []
"""

from __future__ import annotations

from pathlib import Path

from common.hashing import sha256_file
from registry.base import BaseRegistry
from registry.errors import RegistryError
from registry.names import CURRENT, parse_spec, validate_name, vdir
from registry.open import open_registry
from valuefn.checkpoint import FORMAT_VERSION, ChainLink, Manifest, read_manifest


class Registry(BaseRegistry):
    """The registry of value functions (with their chains)."""

    kind = "value"

    def _read_manifest(self, directory: Path) -> Manifest:
        return read_manifest(directory)

    def _verify_files(self, directory: Path, manifest: Manifest) -> None:
        from valuefn.checkpoint import verify_files

        verify_files(directory, manifest)

    def _finalise(self, base: dict, name: str, version: int, files: dict[str, str], previous: int | None,
                  beta: float) -> dict:
        chain = [link.model_dump() for link in self.manifest(name, previous).chain] if previous else []
        chain.append(ChainLink(version=version, beta=beta).model_dump())
        final = base | {"format_version": base.get("format_version", FORMAT_VERSION), "name": name,
                        "version": version, "chain": chain, "files": files}
        Manifest.model_validate(final)
        return final

    def _protected(self, name: str, current: int | None) -> set[int]:
        """A value's chain: V_1..V_t all serve with CURRENT."""
        return {link.version for link in self.manifest(name, current).chain} if current else set()


__all__ = ["CURRENT", "Registry", "RegistryError", "open_registry", "parse_spec", "sha256_file", "validate_name",
           "vdir"]
