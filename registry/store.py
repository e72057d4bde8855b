"""The `Store` interface: where a registry's versions live (a folder, an object store). The registry
(`registry.base.BaseRegistry`) holds one; `registry.open.open_store` picks it from a location."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

Reconcile = Callable[[], Awaitable[None]]


class Store(ABC):
    """Where versions live. Every method takes validated names; `root` is a local folder whose
    `<name>/vNNNN/` sub-folders hold versions ready to read (the registry itself, or a cache)."""

    root: Path
    kind: str = "entry"
    """What the entries are (set by the registry), in messages."""
    location: str
    """The registry as a user names it (a folder or an `s3://` URL), for messages."""
    last_error: str | None = None
    """Why the store could not be read at the last try (None when it could)."""
    conditional_writes: bool = False
    """Whether CURRENT is written with a compare-and-swap (then a publish never moves CURRENT back
    past a version a racing publisher made CURRENT meanwhile)."""

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    @abstractmethod
    def names(self) -> list[str]:
        """Names with at least one version."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """Published versions of `name`, ascending."""

    @abstractmethod
    def read_current(self, name: str) -> str | None:
        """CURRENT's text, None when there is none."""

    @abstractmethod
    def exists(self, name: str, version: int) -> bool:
        """Whether `name@version` is published (its files and manifest complete)."""

    @abstractmethod
    def version_dir(self, name: str, version: int) -> Path:
        """The local folder holding `name@version` (it may not exist when the version does not)."""

    def manifest_dir(self, name: str, version: int) -> Path:
        """A local folder holding at least `name@version`'s manifest.json."""
        return self.version_dir(name, version)

    @abstractmethod
    def publish(self, name: str, write: Callable[[Path], dict[str, str]],
                finalise: Callable[[int, dict[str, str]], dict]) -> int:
        """Write a new version: `write(tmpdir)` -> {file: sha256}, `finalise(version, files)` -> the
        manifest; claim the next free number (a racing publisher gets another) and return it."""

    @abstractmethod
    def write_current(self, name: str, version: int, *, only_forward: bool = False) -> bool:
        """Point CURRENT at `version`; with `only_forward`, leave a newer CURRENT alone (a racing
        publisher's). Returns whether CURRENT now names `version`."""

    @abstractmethod
    def delete_version(self, name: str, version: int) -> None:
        """Remove a version (its number is not handed out again where the store can promise it)."""

    def prune_cache(self, keep: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Drop cached copies of versions not in `keep`; a store without a cache has none."""
        return []

    @abstractmethod
    async def watch(self, reconcile: Reconcile, stop: asyncio.Event, what: str) -> None:
        """Call `reconcile()` now and whenever the store changes until `stop` is set."""


__all__ = ["Reconcile", "Store"]
