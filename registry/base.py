"""One registry interface over two stores: what every kind of entry (values, policies) shares.

A registry is a set of names, each with immutable numbered versions (a folder of files and a
`manifest.json` holding a sha256 per file) and a CURRENT pointer naming the version readers
serve. `BaseRegistry` is the interface callers use (names, versions, current, path, resolve,
manifest, verify, publish, set_current, rollback, remove_old, delete, watch, prune_cache); the
kind (a subclass: `valuefn.registry.Registry`, `registry.policies.PolicyRegistry`) decides what
a manifest holds and which files are allowed; the `Store` decides where versions live:

- `registry.local.LocalStore`: a folder (`root/<name>/v0001/`, `root/<name>/CURRENT`);
- `registry.s3.S3Store`: `s3://bucket/prefix/...`, read through a verified local cache.

Open one with `registry.open_registry(location, Kind)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from registry.errors import CheckpointError, RegistryError
from registry.names import parse_current, parse_spec, validate_name
from registry.open import open_store, same_location
from registry.store import Reconcile, Store

class BaseRegistry:
    """A registry of versioned checkpoints; subclasses are the kinds (they override the hooks).

    `BaseRegistry(folder)` opens a local folder; `open_registry(location, Kind)` opens a folder or
    an `s3://bucket/prefix` (`registry.open`)."""

    kind = "entry"
    """What the entries are, in messages and error params."""

    def __init__(self, root: str | Path | None = None, *, store: Store | None = None, **options: Any):
        if store is None:
            store = open_store(root, **options)
        store.kind = self.kind
        self.store = store

    @property
    def root(self) -> Path:
        """The local folder version folders are read from (the registry, or an object store's cache)."""
        return self.store.root

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def healthy(self) -> bool:
        """False while the store cannot be read (the last error is in `last_error`)."""
        return self.store.healthy

    @property
    def last_error(self) -> str | None:
        return self.store.last_error

    def same_location(self, other: str | Path) -> bool:
        """Whether `other` (what another process, e.g. a server, reports as its registry) is this
        registry: the same folder, or the same bucket and prefix (each process has its own cache)."""
        return same_location(self.location, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    # ------------------------------------------------------------------ hooks (the kind)
    def _read_manifest(self, directory: Path):
        raise NotImplementedError

    def _verify_files(self, directory: Path, manifest) -> None:
        raise NotImplementedError

    def _finalise(self, base: dict, name: str, version: int, files: dict[str, str], previous: int | None,
                  beta: float) -> dict:
        """The manifest of the new version (validated); `previous` is the version it extends."""
        raise NotImplementedError

    def _protected(self, name: str, current: int | None) -> set[int]:
        """Versions `remove_old` must keep besides CURRENT."""
        return set()

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        return self.store.names()

    def versions(self, name: str) -> list[int]:
        return self.store.versions(validate_name(name, self.kind))

    def current(self, name: str) -> int | None:
        """The version CURRENT names (the newest version when there is no CURRENT; None if neither)."""
        text = self.store.read_current(validate_name(name, self.kind))
        if text is None:
            versions = self.versions(name)
            return versions[-1] if versions else None
        return parse_current(text)

    def path(self, name: str, version: int) -> Path:
        """The local folder of `name@version` (for an object store: its verified cached copy,
        downloaded on first use). It does not exist when the version does not."""
        return self.store.version_dir(validate_name(name, self.kind), version)

    def resolve(self, spec: str) -> tuple[str, int]:
        """`name` or `name@N` -> (name, version) that exists."""
        name, version = parse_spec(spec, param=self.kind)
        if version is None:
            version = self.current(name)
            if version is None:
                raise RegistryError(f"{self.kind} {name!r} has no published version", param=self.kind)
        if not self.path(name, version).is_dir():
            raise RegistryError(f"{self.kind} {name}@{version} does not exist", param=self.kind)
        return name, version

    def manifest(self, name: str, version: int):
        return self._read_manifest(self.store.manifest_dir(validate_name(name, self.kind), version))

    def verify(self, name: str, version: int):
        """Read the manifest and check every file's hash (no model is built)."""
        d = self.path(name, version)
        m = self._read_manifest(d)
        if m.name != name or m.version != version:
            raise CheckpointError(f"{d}: manifest says {m.name}@{m.version}", reason="bad_manifest", path=d)
        self._verify_files(d, m)
        return m

    # ------------------------------------------------------------------ writing
    def publish(self, name: str, write: Callable[[Path], dict[str, str]], manifest: BaseModel | dict,
                *, extend_chain: bool = False, beta: float = 1.0, make_current: bool = True) -> int:
        """Publish a new version of `name` and return its number.

        `write(tmpdir)` writes the checkpoint files and returns {file: sha256}. With
        `extend_chain`, the chain is the current version's chain + this version. The files are
        durable before the manifest, the manifest before CURRENT; in an object store a newer
        version a racing publisher made CURRENT meanwhile stays CURRENT."""
        validate_name(name, self.kind)
        base = manifest.model_dump() if isinstance(manifest, BaseModel) else dict(manifest)
        previous: list[int | None] = []

        def finalise(version: int, files: dict[str, str]) -> dict:
            if not previous:  # read once the files are written, as close to the claim as possible
                previous.append(self.current(name) if extend_chain else None)
            return self._finalise(base, name, version, files, previous[0], beta)

        version = self.store.publish(name, write, finalise)
        if make_current and self.store.conditional_writes:
            self.store.write_current(name, version, only_forward=True)
        elif make_current:
            self.set_current(name, version)
        return version

    def set_current(self, name: str, version: int) -> None:
        """Atomically point CURRENT at an existing version (used by publish and rollback)."""
        validate_name(name, self.kind)
        if not self.store.exists(name, version):
            raise RegistryError(f"{self.kind} {name}@{version} does not exist", param="version")
        self.store.write_current(name, version)

    def rollback(self, name: str) -> int:
        """Point CURRENT at the newest version older than the current one; return it."""
        current = self.current(name)
        older = [v for v in self.versions(name) if current is None or v < current]
        if not older:
            raise RegistryError(f"{self.kind} {name!r} has no version before v{current}", param=self.kind)
        self.set_current(name, older[-1])
        return older[-1]

    def remove_old(self, name: str, keep: int = 3) -> list[int]:
        """Delete all but the newest `keep` versions (never CURRENT or what it needs)."""
        current = self.current(name)
        protected = {current} | self._protected(name, current)
        versions = self.versions(name)
        doomed = [v for v in versions[:-keep] if v not in protected] if keep > 0 else []
        for v in doomed:
            self.store.delete_version(name, v)
        return doomed

    def delete(self, name: str, version: int) -> None:
        """Remove one version; refused for CURRENT (roll back first)."""
        if version == self.current(name):
            raise RegistryError(f"{self.kind} {name}@{version} is CURRENT; roll back or publish another first",
                                param="version")
        if not self.store.exists(name, version):
            raise RegistryError(f"{self.kind} {name}@{version} does not exist", param="version")
        self.store.delete_version(name, version)

    # ------------------------------------------------------------------ serving
    async def watch(self, reconcile: Reconcile, stop: asyncio.Event, what: str | None = None) -> None:
        """Call `reconcile()` now and on every change (a folder: watchfiles; an object store:
        CURRENT's ETag polled every `poll_interval` s) until `stop` is set. An unreachable store
        is logged, retried and reported by `healthy`/`last_error`; what is loaded keeps serving."""
        await self.store.watch(reconcile, stop, what or f"{self.kind} registry")

    def prune_cache(self, in_use: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Drop local cached copies of versions not in `in_use` ((name, version) pairs);
        returns what was dropped. A local folder registry has no cache: nothing is dropped."""
        return self.store.prune_cache(set(in_use))


__all__ = ["BaseRegistry", "Reconcile", "Store"]
