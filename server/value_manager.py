"""Loaded value functions of a running server and their hot-swap.

The manager loads every value in the registry at start, then reconciles with the disk whenever
watchfiles reports a change (and on admin calls): a new CURRENT is loaded in a worker thread,
verified (hashes, backbone match, one test forward) and only then swapped in. Searches hold the
`ValueChain` they started with, so requests in flight finish on it; its weights are freed when
the last of them ends. A version that fails verification is refused, remembered with its
reason, and the old chain keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from common.admin_protocol import RefusedVersion, ValueList, ValueStatus
from server.errors import ConflictError, GuidanceError, NotFoundError, UnavailableError, without_paths
from valuefn.checkpoint import CheckpointError
from valuefn.loader import ValueLoader
from valuefn.registry import Registry, RegistryError, parse_spec, vdir
from valuefn.scorer import ValueChain

log = logging.getLogger(__name__)
MAX_PINNED_CHAINS = 4
"""Chains of versions requests pinned (`name@N`) kept loaded besides the serving ones."""
MAX_REFUSALS = 16
"""Refusals remembered per value (the newest)."""


class ValueManager:
    def __init__(self, registry: Registry, loader: ValueLoader, *, base_id: str, metrics=None):
        self.registry = registry
        self.loader = loader
        self.base_id = base_id
        self.metrics = metrics
        self.chains: dict[str, ValueChain] = {}
        self.loaded_at: dict[str, float] = {}
        self.refused: dict[str, dict[int, RefusedVersion]] = {}
        self.pinned: dict[str, int | None] = {}  # name -> CURRENT on disk when an admin pinned a version
        self.unloaded: set[str] = set()
        self.registry_error: str | None = None
        self._extra: OrderedDict[tuple[str, int], ValueChain] = OrderedDict()  # name@N chains asked for
        self._lock = asyncio.Lock()
        self._pin_lock = asyncio.Lock()
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        return sorted(self.chains)

    def has(self, name: str) -> bool:
        return name in self.chains

    async def chain_for(self, spec: str, *, param: str = "guidance.value") -> ValueChain:
        """The chain a request asks for: `name` (serving chain) or `name@N` (that version's chain).

        A pinned version must be loadable: listed on disk, not refused, and its value not unloaded
        by an admin. It is loaded once (under a lock, whoever asks at the same time) and kept in a
        small cache of recently asked-for chains."""
        try:
            name, version = parse_spec(spec)
        except RegistryError as exc:
            raise GuidanceError(str(exc), param=param) from exc
        chain = self.chains.get(name)
        if version is None or (chain is not None and chain.version == version):
            if chain is None:
                raise NotFoundError(self._missing_message(name), param=param, code="value_not_found")
            return chain
        if name in self.unloaded:
            raise NotFoundError(f"value {name!r} was unloaded by an admin; no version of it serves",
                                param=param, code="value_not_found")
        if (name, version) in self._extra:
            self._extra.move_to_end((name, version))
            return self._extra[(name, version)]
        self._check_pinnable(name, version, param)
        async with self._pin_lock:
            if (name, version) in self._extra:  # loaded by a request that held the lock before us
                return self._extra[(name, version)]
            self._check_pinnable(name, version, param)
            try:
                listed = await asyncio.to_thread(self.registry.versions, name)
                if version not in listed:
                    raise RegistryError(f"value {name}@{version} does not exist", param=param)
                chain = await asyncio.to_thread(self.loader.load_chain, name, version)
            except RegistryError as exc:
                raise NotFoundError(str(exc), param=param, code="value_not_found") from exc
            except OSError as exc:
                raise UnavailableError(f"cannot read value {name}@{version}: {exc.strerror or type(exc).__name__}",
                                       param=param, code="registry_unreadable") from exc
            except CheckpointError as exc:
                self._refuse(name, version, exc)
                reason = without_paths(str(exc), **{f"{name}@{version}": exc.path, "<registry>": self.registry.root})
                raise GuidanceError(f"value {name}@{version} cannot be used: {reason}", param=param,
                                    code="value_refused") from exc
            if name in self.unloaded:  # an admin unloaded it while it loaded
                raise NotFoundError(f"value {name!r} was unloaded by an admin", param=param, code="value_not_found")
            self._extra[(name, version)] = chain
            while len(self._extra) > MAX_PINNED_CHAINS:
                self._extra.popitem(last=False)
        return chain

    def _check_pinnable(self, name: str, version: int, param: str) -> None:
        if name in self.refused and version in self.refused[name]:
            raise GuidanceError(f"value {name}@{version} was refused: {self.refused[name][version].reason}",
                                param=param, code="value_refused")

    def _missing_message(self, name: str) -> str:
        refusals = self.refused.get(name)
        if refusals:
            last = max(refusals.values(), key=lambda r: r.at)
            return f"value {name!r} is not loaded: v{last.version} was refused ({last.reason})"
        return f"value {name!r} is not loaded (see GET /v1/values)"

    def status(self, name: str) -> ValueStatus:
        chain = self.chains.get(name)
        try:
            on_disk, current = self.registry.versions(name), self.registry.current(name)
        except (RegistryError, OSError):
            on_disk, current = [], None
        return ValueStatus(
            name=name, model=f"{self.base_id}+{name}", serving_version=chain.version if chain else None,
            chain=chain.versions if chain else [], betas=chain.betas if chain else [],
            defaults=chain.defaults.model_dump() if chain else {}, versions_on_disk=on_disk, current_on_disk=current,
            refused=sorted(self.refused.get(name, {}).values(), key=lambda r: r.version),
            loaded_at=self.loaded_at.get(name), pinned=name in self.pinned)

    def list(self) -> ValueList:
        try:
            names = set(self.registry.names())
        except (OSError, RegistryError) as exc:
            names = set()
            self.registry_error = f"cannot read {self.registry.root}: {exc}"
        names |= set(self.chains) | set(self.refused)
        return ValueList(data=[self.status(n) for n in sorted(names)], registry_error=self.registry_error)

    # ------------------------------------------------------------------ changes
    def _refuse(self, name: str, version: int, exc: Exception) -> None:
        full = f"{getattr(exc, 'reason', type(exc).__name__)}: {exc}"
        log.error("refused value %s@%d: %s (still serving %s)", name, version, full,
                  f"v{self.chains[name].version}" if name in self.chains else "nothing")
        folder = self.registry.root / name / vdir(version)  # not `path()`: it refuses folders leading outside
        reason = without_paths(full, **{f"{name}@{version}": folder, "<registry>": self.registry.root})  # for clients
        refusals = self.refused.setdefault(name, {})
        refusals[version] = RefusedVersion(version=version, reason=reason, at=time.time())
        while len(refusals) > MAX_REFUSALS:  # bounded: keep the newest
            del refusals[min(refusals.values(), key=lambda r: r.at).version]
        if self.metrics:
            self.metrics.value_refused.labels(name).inc()
            if getattr(exc, "reason", None) == "out_of_memory":  # valuefn.loader: "needs X GiB, budget Y GiB"
                self.metrics.value_refused_memory.labels(name).inc()

    async def load(self, name: str, version: int | None = None, *, pin: bool = False,
                   from_watch: bool = False) -> ValueStatus:
        """Load `name@version` (default CURRENT) and serve it. Raises on refusal; the old chain stays."""
        async with self._lock:
            if from_watch and (name in self.unloaded or name in self.pinned
                               or (name in self.chains and self.chains[name].version == version)):
                return self.status(name)  # an admin call decided otherwise while we waited
            try:
                if version is None:
                    _, version = self.registry.resolve(name)
                elif not self.registry.path(name, version).is_dir():
                    raise RegistryError(f"value {name}@{version} does not exist", param="version")
            except RegistryError as exc:
                raise NotFoundError(str(exc), param=exc.param or "name", code="value_not_found") from exc
            except OSError as exc:
                raise UnavailableError(f"cannot read the registry: {exc}", code="registry_unreadable") from exc
            log.info("loading value %s@%d%s", name, version, " (registry change)" if from_watch else "")
            try:
                chain = await asyncio.to_thread(self.loader.load_chain, name, version)
            except (CheckpointError, RegistryError, OSError) as exc:
                self._refuse(name, version, exc)
                reason = without_paths(str(exc), **{f"{name}@{version}": getattr(exc, "path", None),
                                                     "<registry>": self.registry.root})
                raise GuidanceError(f"value {name}@{version} refused: {reason}", param="version",
                                    code="value_refused") from exc
            self._swap(name, chain)
            self.refused.get(name, {}).pop(version, None)
            self.unloaded.discard(name)
            if pin:
                self.pinned[name] = self.registry.current(name)
            else:
                self.pinned.pop(name, None)
            return self.status(name)

    def _swap(self, name: str, chain: ValueChain) -> None:
        old = self.chains.get(name)
        self.chains[name] = chain
        self.loaded_at[name] = time.time()
        if self.metrics:
            self.metrics.value_version.labels(name).set(chain.version)
        log.info("serving value %s v%d (chain %s)%s", name, chain.version, chain.versions,
                 f", replacing v{old.version}" if old else "")

    async def rollback(self, name: str) -> ValueStatus:
        try:
            version = await asyncio.to_thread(self.registry.rollback, name)
        except RegistryError as exc:
            raise NotFoundError(str(exc), param="name", code="value_not_found") from exc
        except OSError as exc:  # the server may have read-only access to the registry (SECURITY.md)
            raise ConflictError(f"cannot roll {name!r} back: this server cannot write the value registry "
                                f"({exc.strerror or type(exc).__name__}); roll back where the registry is written",
                                param="name", code="registry_read_only") from exc
        return await self.load(name, version)

    def unload(self, name: str) -> None:
        if name not in self.chains:
            raise NotFoundError(f"value {name!r} is not loaded", param="name", code="value_not_found")
        del self.chains[name]
        self.unloaded.add(name)
        for key in [k for k in self._extra if k[0] == name]:  # and every version requests pinned
            del self._extra[key]
        self.pinned.pop(name, None)
        if self.metrics:
            self.metrics.value_version.remove(name)

    async def reconcile(self) -> None:
        """Serve each value's CURRENT unless it was refused, unloaded or pinned by an admin."""
        try:
            if not self.registry.root.is_dir():  # deleted, renamed away or replaced by a file
                raise FileNotFoundError(f"{self.registry.root} is not a folder")
            names = self.registry.names()
            if self.registry_error is not None:
                log.info("the value registry %s is readable again", self.registry.root)
            self.registry_error = None
        except (OSError, RegistryError) as exc:
            if self.registry_error is None:
                log.error("cannot read the value registry (still serving what is loaded): %s", exc)
            self.registry_error = f"cannot read {self.registry.root}: {exc}"
            return
        for name in names:
            if name in self.unloaded:
                continue
            try:
                current = self.registry.current(name)
            except (RegistryError, OSError):
                continue
            if current is None:
                continue
            if name in self.pinned:
                if self.pinned[name] == current:
                    continue
                self.pinned.pop(name)
            chain = self.chains.get(name)
            if (chain is not None and chain.version == current) or current in self.refused.get(name, {}):
                continue
            try:
                await self.load(name, current, from_watch=True)
            except GuidanceError:
                pass  # refused: listed in /v1/values, logged and counted by _refuse
            except (NotFoundError, UnavailableError) as exc:  # the registry moved meanwhile; its next change retries
                log.debug("reconcile %s: %s", name, exc)
            except Exception as exc:  # noqa: BLE001 - any other failure is a refusal too, never only a DEBUG line
                self._refuse(name, current, exc)

    async def watch(self) -> None:
        """Reconcile on every registry change (watchfiles), surviving a missing registry folder."""
        await watch_registry(self.registry.root, self.reconcile, self._stop, "value registry")

    def stop(self) -> None:
        self._stop.set()


async def watch_registry(root, reconcile, stop: asyncio.Event, what: str) -> None:
    """Call `reconcile()` now and on every change under `root` (watchfiles) until `stop` is set;
    a registry folder that is missing or vanishes is waited for, not an error. Shared by the value
    and the policy registries."""
    from watchfiles import awatch

    while not stop.is_set():
        await reconcile()
        if not root.is_dir():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            continue
        try:
            async for _ in awatch(root, stop_event=stop, debounce=50, step=20, recursive=True,
                                  rust_timeout=1000, yield_on_timeout=True):
                await reconcile()
                if not root.is_dir():
                    break
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            log.warning("%s watch interrupted (%s); retrying", what, exc)
