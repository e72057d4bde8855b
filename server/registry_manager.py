"""One manager for a watched registry of versioned checkpoints: values and policies alike.

The server serves one version of each entry of a registry (`valuefn.registry.Registry`: a value
function, or a policy adapter in `registry.policies.PolicyRegistry`). What a kind does differently
is only how a version is loaded: a `Loader` (`server.value_manager.ValueChainLoader` wraps
`valuefn.loader.ValueLoader`; `server.policies.PolicyLoader` builds vLLM's `LoRARequest`). The
rules are the same for both:

- resolve: `load(name)` serves the registry's CURRENT; `load(name, N)` serves version N.
- verify: the loader verifies a version (hashes, base identity, ...) in a worker thread before it
  is swapped in; requests in flight keep the object they started with.
- refuse: a version that fails is recorded with its reason (tagged, without the server's paths)
  and its time, logged and counted; the old version keeps serving; the watcher does not retry it
  (an admin load does).
- pin: an admin load of a version pins it: the watcher keeps it until CURRENT changes on disk (a
  publish or a rollback elsewhere), then follows CURRENT again. A load without a version unpins.
- unload: stops serving an entry until an admin loads it again; the watcher leaves it alone.
- reconcile: on every registry change (`BaseRegistry.watch`), serve each entry's CURRENT unless it was
  refused, unloaded or pinned.
- lock: one asyncio lock per name: loads, rollbacks, unloads and version deletions of one entry
  run one at a time (a slow load of one entry does not hold up another).

DELETE /v1/{values,policies}/{name} means *unload* (stop serving; the files stay), for both kinds.
The admin resource is the entry this server serves, not the registry: the trainer writes the
registry, the server reads it (and may only be allowed to read it, SECURITY.md), and deleting
files would leave the served copy in memory anyway. Removing a version from disk stays possible
where it exists today, through its own explicit route: `DELETE /v1/policies/{name}/versions/{N}`
(`delete_version`; refused for the serving version and CURRENT). Values have no such route: a value
version may be a link of a later version's chain; `iro values prune` removes old ones safely.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Generic, Protocol, TypeVar

from common.admin_protocol import RefusedVersion, RegistryEntryStatus, RegistryList
from registry import BaseRegistry, RegistryError, vdir
from server.errors import ConflictError, IroError, NotFoundError, UnavailableError, without_paths

log = logging.getLogger(__name__)
MAX_REFUSALS = 16
"""Refusals remembered per entry (the newest)."""


class Served(Protocol):
    version: int


S = TypeVar("S", bound=Served)


class Loader(Protocol[S]):
    """Loads and verifies one version of an entry (blocking; run in a worker thread). Raises
    (`CheckpointError` with a `reason` tag, `RegistryError`, `OSError`, anything) to refuse it."""

    def load(self, name: str, version: int) -> S: ...


class RegistryManager(Generic[S]):
    """Serves one version of every entry of a watched registry (see the module docstring)."""

    kind = "entry"
    """What the entries are ("value", "policy"): in messages and error codes (`value_not_found`)."""
    list_type: type[RegistryList] = RegistryList
    """The kind's list schema (`ValueList`, `PolicyList`)."""

    def __init__(self, registry: BaseRegistry, loader: Loader[S], *, base_id: str):
        self.registry = registry
        self.loader = loader
        self.base_id = base_id
        self.served: dict[str, S] = {}
        self.loaded_at: dict[str, float] = {}
        self.refused: dict[str, dict[int, RefusedVersion]] = {}
        self.pinned: dict[str, int | None] = {}  # name -> CURRENT on disk when an admin pinned a version
        self.unloaded: set[str] = set()
        self.registry_error: str | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ hooks for a kind
    def _entry_status(self, served: S | None, **common) -> RegistryEntryStatus:
        """The kind's status model: `common` plus what the kind adds."""
        return RegistryEntryStatus(model=common["name"], **common)

    def _on_swap(self, name: str, served: S) -> None:
        """Called when `served` starts serving (metrics)."""

    def _on_refused(self, name: str, version: int, exc: Exception) -> None:
        """Called after a refusal was recorded (metrics)."""

    def _on_unload(self, name: str) -> None:
        """Called when an admin unloaded `name` (drop caches, metrics)."""

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        return sorted(self.served)

    def has(self, name: str) -> bool:
        return name in self.served

    def status(self, name: str) -> RegistryEntryStatus:
        served = self.served.get(name)
        try:
            on_disk, current = self.registry.versions(name), self.registry.current(name)
        except (RegistryError, OSError):
            on_disk, current = [], None
        return self._entry_status(
            served, name=name, serving_version=served.version if served else None,
            versions_on_disk=on_disk, current_on_disk=current,
            refused=sorted(self.refused.get(name, {}).values(), key=lambda r: r.version),
            loaded_at=self.loaded_at.get(name), pinned=name in self.pinned)

    def list(self) -> RegistryList:
        try:
            names = set(self.registry.names())
        except (OSError, RegistryError) as exc:
            names = set()
            self.registry_error = f"cannot read {self.registry.root}: {exc}"
        names |= set(self.served) | set(self.refused)
        data = [self.status(n) for n in sorted(names)]
        return self.list_type(data=data, registry=self.registry.location, registry_error=self.registry_error)

    # ------------------------------------------------------------------ refusals
    def _refuse(self, name: str, version: int, exc: Exception) -> RefusedVersion:
        """Record (bounded), log and count why `name@version` was refused; the reason clients see
        starts with the refusal's tag and names no server path."""
        full = f"{getattr(exc, 'reason', None) or type(exc).__name__}: {exc}"
        log.error("refused %s %s@%d: %s (still serving %s)", self.kind, name, version, full,
                  f"v{self.served[name].version}" if name in self.served else "nothing")
        folder = self.registry.root / name / vdir(version)  # not `path()`: it refuses folders leading outside
        reason = without_paths(full, **{f"{name}@{version}": folder, "<registry>": self.registry.root})
        refusal = RefusedVersion(version=version, reason=reason, at=time.time())
        refusals = self.refused.setdefault(name, {})
        refusals[version] = refusal
        while len(refusals) > MAX_REFUSALS:  # bounded: keep the newest
            del refusals[min(refusals.values(), key=lambda r: r.at).version]
        self._on_refused(name, version, exc)
        return refusal

    # ------------------------------------------------------------------ loading
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _on_disk(self, name: str, version: int | None) -> int:
        """`version` (default CURRENT) if the registry has it; a 404 naming what is missing otherwise."""
        try:
            _, version = self.registry.resolve(name if version is None else f"{name}@{version}")
        except RegistryError as exc:
            raise NotFoundError(str(exc), param="name" if version is None else "version",
                                code=f"{self.kind}_not_found") from exc
        except OSError as exc:
            raise UnavailableError(f"cannot read the {self.kind} registry ({exc.strerror or type(exc).__name__})",
                                   code="registry_unreadable") from exc
        return version

    async def _build(self, name: str, version: int) -> S:
        """The loader's object for `name@version`; a refusal (recorded) is a 409 with its reason."""
        try:
            return await asyncio.to_thread(self.loader.load, name, version)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the version: recorded, logged, counted
            refusal = self._refuse(name, version, exc)
            raise ConflictError(f"{self.kind} {name}@{version} refused: {refusal.reason}", param="version",
                                code=f"{self.kind}_refused") from exc

    def _swap(self, name: str, served: S) -> None:
        old = self.served.get(name)
        self.served[name] = served  # requests in flight keep the object they started with
        self.loaded_at[name] = time.time()
        self.refused.get(name, {}).pop(served.version, None)
        self.unloaded.discard(name)
        self._on_swap(name, served)
        log.info("serving %s %s v%d%s", self.kind, name, served.version,
                 f", replacing v{old.version}" if old else "")

    async def load(self, name: str, version: int | None = None, *, pin: bool = False,
                   from_watch: bool = False) -> S:
        """Serve `name@version` (default CURRENT); with `pin`, keep it until CURRENT changes on disk,
        without, follow CURRENT. A missing version is a 404, a refused one a 409 with the reason; the
        old version keeps serving either way."""
        async with self._lock(name):
            if from_watch and (name in self.unloaded or name in self.pinned
                               or (name in self.served and self.served[name].version == version)):
                return self.served.get(name)  # an admin call decided otherwise while we waited
            version = self._on_disk(name, version)
            log.info("loading %s %s@%d%s", self.kind, name, version, " (registry change)" if from_watch else "")
            served = await self._build(name, version)
            self._swap(name, served)
            if pin:
                self.pinned[name] = self._current(name)
            else:
                self.pinned.pop(name, None)
            return served

    def _current(self, name: str) -> int | None:
        try:
            return self.registry.current(name)
        except (RegistryError, OSError):
            return None

    async def rollback(self, name: str) -> S:
        """Serve the newest version before CURRENT that loads (refused ones are skipped) and point
        CURRENT at it; the pin is lifted."""
        async with self._lock(name):
            current = self._on_disk(name, None)
            older = [v for v in self.registry.versions(name) if v < current]
            for version in reversed(older):
                if version in self.refused.get(name, {}):
                    continue
                try:
                    served = await self._build(name, version)
                except ConflictError:
                    continue  # refused and recorded: try the one before
                try:
                    await asyncio.to_thread(self.registry.set_current, name, version)
                except RegistryError as exc:
                    raise NotFoundError(str(exc), param="name", code=f"{self.kind}_not_found") from exc
                except OSError as exc:  # the server may have read-only access to the registry (SECURITY.md)
                    raise self._read_only(f"roll {name!r} back", exc) from exc
                self._swap(name, served)
                self.pinned.pop(name, None)
                log.info("rolled %s %s back to v%d", self.kind, name, version)
                return served
            raise ConflictError(f"{self.kind} {name!r} has no good version before v{current}", param="name",
                                code="no_older_version")

    async def unload(self, name: str) -> None:
        """Stop serving `name` until an admin loads it again (its files stay in the registry)."""
        async with self._lock(name):
            if name not in self.served:
                raise NotFoundError(f"{self.kind} {name!r} is not loaded", param="name", code=f"{self.kind}_not_found")
            del self.served[name]
            self.unloaded.add(name)
            self.pinned.pop(name, None)
            self._on_unload(name)
            log.info("unloaded %s %s (an admin call)", self.kind, name)

    async def delete_version(self, name: str, version: int) -> None:
        """Remove one version from the registry (where the registry can: `delete`); never the
        serving version nor CURRENT."""
        async with self._lock(name):
            if name in self.served and self.served[name].version == version:
                raise ConflictError(f"{self.kind} {name}@{version} is being served; roll back first", param="version",
                                    code=f"{self.kind}_in_use")
            self._on_disk(name, version)
            try:
                await asyncio.to_thread(self.registry.delete, name, version)
            except RegistryError as exc:  # CURRENT: roll back or publish another first
                raise ConflictError(str(exc), param="version", code=f"{self.kind}_is_current") from exc
            except OSError as exc:
                raise self._read_only(f"delete {name}@{version}", exc) from exc
            self.refused.get(name, {}).pop(version, None)

    def _read_only(self, action: str, exc: OSError) -> ConflictError:
        return ConflictError(f"cannot {action}: this server cannot write the {self.kind} registry "
                             f"({exc.strerror or type(exc).__name__}); do it where the registry is written",
                             param="name", code="registry_read_only")

    # ------------------------------------------------------------------ watching
    async def reconcile(self) -> None:
        """Serve each entry's CURRENT unless it was refused, unloaded or pinned by an admin."""
        try:
            if not self.registry.root.is_dir():  # deleted, renamed away or replaced by a file
                raise FileNotFoundError(f"{self.registry.root} is not a folder")
            names = self.registry.names()
            if self.registry_error is not None:
                log.info("the %s registry %s is readable again", self.kind, self.registry.root)
            self.registry_error = None
        except (OSError, RegistryError) as exc:
            if self.registry_error is None:
                log.error("cannot read the %s registry (still serving what is loaded): %s", self.kind, exc)
            self.registry_error = f"cannot read {self.registry.root}: {exc}"
            return
        for name in names:
            if name in self.unloaded:
                continue
            current = self._current(name)
            if current is None:
                continue
            if name in self.pinned:
                if self.pinned[name] == current:
                    continue
                log.info("%s %s: CURRENT is now v%d; the admin pin is lifted", self.kind, name, current)
                self.pinned.pop(name)
            served = self.served.get(name)
            if (served is not None and served.version == current) or current in self.refused.get(name, {}):
                continue
            try:
                await self.load(name, current, from_watch=True)
            except ConflictError:
                pass  # refused: listed in the status, logged and counted by _refuse
            except IroError as exc:  # the registry moved meanwhile; its next change retries
                log.debug("reconcile %s %s: %s", self.kind, name, exc)
        self.prune_cache()

    def in_use(self) -> set[tuple[str, int]]:
        """(name, version) of every version a served entry reads (a value chain: all its versions)."""
        return {(name, v) for name, served in self.served.items()
                for v in (getattr(served, "versions", None) or [served.version])}

    def prune_cache(self) -> list[tuple[str, int]]:
        """Drop the local copies of versions nothing serves (an object store's cache; a folder registry
        has none). Versions read in the last few minutes stay, for requests still running on them."""
        try:
            return self.registry.prune_cache(self.in_use())
        except OSError as exc:  # a cache that cannot be cleaned costs disk, never a request
            log.warning("cannot prune the %s registry's cache: %s", self.kind, exc)
            return []

    async def watch(self) -> None:
        """Reconcile now and on every registry change until `stop()` (`BaseRegistry.watch`: watchfiles
        on a folder, CURRENT polled in an object store), surviving a registry that is missing or
        unreachable for a while."""
        await self.registry.watch(self.reconcile, self._stop, f"{self.kind} registry")

    def stop(self) -> None:
        self._stop.set()


__all__ = ["Loader", "MAX_REFUSALS", "RegistryManager"]
