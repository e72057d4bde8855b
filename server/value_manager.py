"""Loaded value functions of a running server and their hot-swap.

`ValueManager` is the value registry's `server.registry_manager.RegistryManager` (resolve, verify,
refuse, pin, unload, reconcile, a lock per name: the same rules as the policy registry's). Its
loader, `ValueChainLoader`, builds a version's whole chain V_1..V_t with `valuefn.loader.ValueLoader`
(hashes, backbone match, one test forward) in a worker thread; only then is it swapped in.
Searches hold the `ValueChain` they started with, so requests in flight finish on it; its weights
are freed when the last of them ends. What is only a value's: requests may ask for an older
version (`name@N`, `chain_for`), kept in a small cache; metrics per value.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from common.admin_protocol import ValueList, ValueStatus
from server.errors import GuidanceError, NotFoundError, UnavailableError, without_paths
from server.registry_manager import RegistryManager
from valuefn.checkpoint import CheckpointError
from valuefn.loader import ValueLoader
from valuefn.registry import Registry, RegistryError, parse_spec
from valuefn.scorer import ValueChain

log = logging.getLogger(__name__)
MAX_PINNED_CHAINS = 4
"""Chains of versions requests pinned (`name@N`) kept loaded besides the serving ones."""


class ValueChainLoader:
    """The value registry's loader: a version's verified chain, through `ValueLoader`."""

    def __init__(self, loader: ValueLoader):
        self.loader = loader

    def load(self, name: str, version: int) -> ValueChain:
        return self.loader.load_chain(name, version)


class ValueManager(RegistryManager[ValueChain]):
    """Serves every value of the registry; `chain_for` answers what a request asks for."""

    kind = "value"
    list_type = ValueList

    def __init__(self, registry: Registry, loader: ValueLoader, *, base_id: str, metrics=None):
        super().__init__(registry, ValueChainLoader(loader), base_id=base_id)
        self.metrics = metrics
        self._extra: OrderedDict[tuple[str, int], ValueChain] = OrderedDict()  # name@N chains asked for
        self._pin_lock = asyncio.Lock()

    @property
    def chains(self) -> dict[str, ValueChain]:
        """Each value's serving chain (`served`, in a value's words)."""
        return self.served

    # ------------------------------------------------------------------ the kind's hooks
    def _entry_status(self, chain: ValueChain | None, **common) -> ValueStatus:
        return ValueStatus(model=f"{self.base_id}+{common['name']}", chain=chain.versions if chain else [],
                           betas=chain.betas if chain else [], defaults=chain.defaults.model_dump() if chain else {},
                           **common)

    def _on_swap(self, name: str, chain: ValueChain) -> None:
        if self.metrics:
            self.metrics.value_version.labels(name).set(chain.version)

    def _on_refused(self, name: str, version: int, exc: Exception) -> None:
        if self.metrics:
            self.metrics.value_refused.labels(name).inc()
            if getattr(exc, "reason", None) == "out_of_memory":  # valuefn.loader: "needs X GiB, budget Y GiB"
                self.metrics.value_refused_memory.labels(name).inc()

    def _on_unload(self, name: str) -> None:
        for key in [k for k in self._extra if k[0] == name]:  # and every version requests pinned
            del self._extra[key]
        if self.metrics:
            self.metrics.value_version.remove(name)

    # ------------------------------------------------------------------ requests
    async def chain_for(self, spec: str, *, param: str = "guidance.value") -> ValueChain:
        """The chain a request asks for: `name` (serving chain) or `name@N` (that version's chain).

        A pinned version must be loadable: listed on disk, not refused, and its value not unloaded
        by an admin. It is loaded once (under a lock, whoever asks at the same time) and kept in a
        small cache of recently asked-for chains."""
        try:
            name, version = parse_spec(spec)
        except RegistryError as exc:
            raise GuidanceError(str(exc), param=param) from exc
        chain = self.served.get(name)
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
                chain = await asyncio.to_thread(self.loader.load, name, version)
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


__all__ = ["MAX_PINNED_CHAINS", "ValueChainLoader", "ValueManager"]
