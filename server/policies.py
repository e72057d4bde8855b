"""Serving distilled policy adapters (the policy registry) through vLLM's own LoRA support.

Only active when the server is started with a policy registry (`iro serve --policies-dir DIR`):
the engine is then built with LoRA enabled (which, on CPU, also turns graph compilation off), so
plain serving without one keeps its compiled speed.

- A policy NAME is a model id of its own in /v1/models (root/parent = the base model), and
  `NAME+VALUE` runs guided decoding over the adapted policy.
- Each served version is one `LoRARequest` with its own `lora_int_id`: a new version gets a new id,
  so requests that started on the old adapter finish on it while new ones get the new one.
- A version is verified before it serves (sha256 of every file, safetensors readable and finite,
  LoRA rank, base model identity); a refused version is recorded with its reason and the
  previous one keeps serving.
- The request's adapter is resolved with its model id (`resolve`) and travels in its
  `Generation.adapter` to every engine request (plain sampling and each search chunk).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ConflictError, NotFoundError, UnavailableError, without_paths
from valuefn.checkpoint import CheckpointError
from registry.policies import PolicyRegistry, check_adapter, check_base
from valuefn.registry import RegistryError, vdir

log = logging.getLogger(__name__)
MAX_REFUSALS = 16
"""Refusals remembered per policy (the newest)."""


@dataclass
class ServedPolicy:
    name: str
    version: int
    path: Path
    lora: Any
    """Its `LoRARequest`."""
    method: str
    metrics: dict = field(default_factory=dict)


class PolicyManager:
    """Loads, verifies and swaps policy adapters; the watcher follows each policy's CURRENT."""

    def __init__(self, registry: PolicyRegistry, *, identity: dict, base_id: str, max_lora_rank: int):
        self.registry = registry
        self.identity = identity
        self.base_id = base_id
        self.max_lora_rank = max_lora_rank
        self.served: dict[str, ServedPolicy] = {}
        self.refused: dict[str, dict[int, str]] = {}
        self.pinned: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ requests
    def names(self) -> list[str]:
        return sorted(self.served)

    def resolve(self, model: str, values=None) -> ServedPolicy | None:
        """The served policy `model` names when it is `POLICY` or `POLICY+VALUE` (with VALUE served
        by `values`); None otherwise. Its `lora` is the adapter the request samples with."""
        name, sep, value = model.partition("+")
        served = self.served.get(name)
        if served is None or (sep and not (value and values is not None and values.has(value.split("@")[0]))):
            return None
        return served

    # ------------------------------------------------------------------ loading
    def _verify(self, name: str, version: int) -> ServedPolicy:
        directory = self.registry.path(name, version)
        manifest = self.registry.verify(name, version)
        check_base(manifest, self.identity, directory)
        if manifest.lora_rank > self.max_lora_rank:
            raise CheckpointError(f"policy {name}@{version} has LoRA rank {manifest.lora_rank}; this server takes "
                                  f"<= {self.max_lora_rank} (IRO_MAX_LORA_RANK)", reason="rank_too_large", path=directory)
        check_adapter(directory, manifest)
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(lora_name=f"{name}@{version}", lora_int_id=next(self._ids), lora_path=str(directory),
                           base_model_name=self.base_id)
        return ServedPolicy(name, version, directory, lora, manifest.method, manifest.metrics)

    def _refuse(self, name: str, version: int, exc: Exception) -> str:
        """Remember why `name@version` was refused (bounded); return the reason without server paths."""
        folder = self.registry.root / name / vdir(version)  # not `path()`: it refuses folders leading outside
        reason = without_paths(str(exc), **{f"{name}@{version}": folder, "<registry>": self.registry.root})
        refusals = self.refused.setdefault(name, {})
        refusals.pop(version, None)
        refusals[version] = reason
        while len(refusals) > MAX_REFUSALS:  # dicts keep insertion order: drop the oldest
            del refusals[next(iter(refusals))]
        return reason

    def _exists(self, name: str, version: int | None) -> int:
        """`version` (default CURRENT) if it is on disk; 404 naming it otherwise."""
        try:
            if version is None:
                version = self.registry.current(name)
                if version is None:
                    raise NotFoundError(f"policy {name!r} has no published version", param="name",
                                        code="policy_not_found")
            if not self.registry.path(name, version).is_dir():
                raise NotFoundError(f"policy {name}@{version} does not exist", param="version",
                                    code="policy_not_found")
        except RegistryError as exc:
            raise NotFoundError(str(exc), param="name", code="policy_not_found") from exc
        except OSError as exc:
            raise UnavailableError(f"cannot read the policy registry ({exc.strerror or type(exc).__name__})",
                                   code="registry_unreadable") from exc
        return version

    async def load(self, name: str, version: int | None = None, *, pin: bool = False) -> ServedPolicy:
        """Verify `name@version` (default CURRENT) and serve it. A missing version is a 404, a refused
        one a 409 with the reason (never the server's paths); the old version keeps serving."""
        version = self._exists(name, version)
        try:
            policy = await asyncio.to_thread(self._verify, name, version)
        except (CheckpointError, RegistryError, OSError) as exc:
            reason = self._refuse(name, version, exc)
            log.error("refused policy %s@%d (still serving %s): %s", name, version,
                      f"v{self.served[name].version}" if name in self.served else "nothing", exc)
            code = f"policy_refused:{getattr(exc, 'reason', 'unreadable')}"
            raise ConflictError(f"refused: {reason}", param="version", code=code) from exc
        self.served[name] = policy  # in-flight requests keep the LoRARequest they started with
        self.refused.get(name, {}).pop(version, None)
        if pin:
            self.pinned[name] = version
        log.info("serving policy %s@%d (%s) from %s", name, version, policy.method, policy.path)
        return policy

    async def rollback(self, name: str) -> ServedPolicy:
        """Serve the newest version before CURRENT that verifies (refused ones are skipped) and
        point CURRENT at it."""
        current = self._exists(name, None)
        older = [v for v in self.registry.versions(name) if v < current]
        for version in reversed(older):
            if version in self.refused.get(name, {}):
                continue
            try:
                policy = await asyncio.to_thread(self._verify, name, version)
            except (CheckpointError, RegistryError, OSError) as exc:
                self._refuse(name, version, exc)
                continue
            try:
                await asyncio.to_thread(self.registry.set_current, name, version)
            except OSError as exc:  # the server may have read-only access to the registry
                raise _read_only(f"roll {name!r} back", exc) from exc
            self.served[name] = policy
            self.pinned.pop(name, None)
            log.info("rolled policy %s back to v%d", name, version)
            return policy
        raise ConflictError(f"policy {name!r} has no good version before v{current}", param="name",
                            code="no_older_version")

    def delete(self, name: str, version: int) -> None:
        """Delete a version from the registry (never the one being served, nor CURRENT)."""
        if name in self.served and self.served[name].version == version:
            raise ConflictError(f"policy {name}@{version} is being served; roll back first", param="version",
                                code="policy_in_use")
        self._exists(name, version)
        try:
            self.registry.delete(name, version)
        except RegistryError as exc:  # CURRENT: roll back or publish another first
            raise ConflictError(str(exc), param="version", code="policy_is_current") from exc
        except OSError as exc:
            raise _read_only(f"delete {name}@{version}", exc) from exc
        self.refused.get(name, {}).pop(version, None)

    def status(self, name: str) -> dict:
        served = self.served.get(name)
        try:
            versions, current = self.registry.versions(name), self.registry.current(name)
        except RegistryError:
            versions, current = [], None
        return {"name": name, "model": name, "root": self.base_id, "served_version": served.version if served else None,
                "current": current, "versions": versions, "pinned": self.pinned.get(name),
                "method": served.method if served else None,
                "refused": [{"version": v, "reason": r} for v, r in sorted(self.refused.get(name, {}).items())]}

    def list(self) -> list[dict]:
        try:
            names = set(self.registry.names())
        except (OSError, RegistryError):
            names = set()
        return [self.status(n) for n in sorted(names | set(self.served))]

    # ------------------------------------------------------------------ watching
    async def reconcile(self) -> None:
        """Serve each policy's CURRENT unless it was refused or an admin pinned another version."""
        try:
            names = self.registry.names() if self.registry.root.is_dir() else []
        except (OSError, RegistryError) as exc:
            log.error("cannot read the policy registry (still serving what is loaded): %s", exc)
            return
        for name in names:
            try:
                current = self.registry.current(name)
            except (OSError, RegistryError):
                continue
            if current is None or current in self.refused.get(name, {}):
                continue
            if name in self.pinned:
                if self.pinned[name] == current:
                    continue
                self.pinned.pop(name)
            served = self.served.get(name)
            if served is not None and served.version == current:
                continue
            try:
                await self.load(name, current)
            except Exception as exc:  # recorded and logged by load
                log.debug("reconcile %s: %s", name, exc)

    async def watch(self) -> None:
        """Reconcile on every registry change, like the value registry's watcher."""
        from server.value_manager import watch_registry

        await watch_registry(self.registry.root, self.reconcile, self._stop, "policy registry")

    def stop(self) -> None:
        self._stop.set()


def _read_only(action: str, exc: OSError) -> ConflictError:
    return ConflictError(f"cannot {action}: this server cannot write the policy registry "
                         f"({exc.strerror or type(exc).__name__}); do it where the registry is written",
                         param="name", code="registry_read_only")


async def start_policies(app, settings, engine, model_path) -> PolicyManager | None:
    """The policy manager and its watcher when a policy registry is configured (None otherwise)."""
    if settings.policies_dir is None:
        return None
    from valuefn.model import backbone_identity

    manager = PolicyManager(PolicyRegistry(settings.policies_dir), identity=backbone_identity(model_path),
                            base_id=engine.model_id, max_lora_rank=settings.max_lora_rank)
    await manager.reconcile()
    task = asyncio.create_task(manager.watch())

    async def close():
        manager.stop()
        task.cancel()

    app.state.closers.append(close)
    return manager


__all__ = ["PolicyManager", "ServedPolicy", "start_policies"]
