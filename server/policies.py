"""Serving distilled policy adapters (the policy registry) through vLLM's own LoRA support.

Only active when the server is started with a policy registry (`iro serve --policies-dir DIR`):
the engine is then built with LoRA enabled (which, on CPU, also turns graph compilation off), so
plain serving without one keeps its compiled speed.

- A policy NAME is a model id of its own in /v1/models (root/parent = the base model), and
  `NAME+VALUE` runs guided decoding over the adapted policy.
- Each served version is one `LoRARequest` with its own `lora_int_id`: a new version gets a new id,
  so requests that started on the old adapter finish on it while new ones get the new one.
- `PolicyManager` is the policy registry's `server.registry_manager.RegistryManager` (resolve,
  verify, refuse, pin, unload, reconcile, a lock per name: the same rules as values). Its loader,
  `PolicyLoader`, verifies a version (sha256 of every file, safetensors readable and finite, LoRA
  rank, base model identity) and builds its `LoRARequest`; a refused version is recorded with its
  reason and the previous one keeps serving.
- The request's adapter is resolved with its model id (`resolve`) and travels in its
  `Generation.adapter` to every engine request (plain sampling and each search chunk).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.admin_protocol import PolicyList, PolicyStatus
from server.registry_manager import RegistryManager
from registry.errors import CheckpointError
from registry.policies import PolicyRegistry, check_adapter, check_base

log = logging.getLogger(__name__)


@dataclass
class ServedPolicy:
    name: str
    version: int
    path: Path
    lora: Any
    """Its `LoRARequest`."""
    method: str
    metrics: dict = field(default_factory=dict)


def _vllm_lora_request(**kwargs):
    from vllm.lora.request import LoRARequest

    return LoRARequest(**kwargs)


class PolicyLoader:
    """The policy registry's loader: a verified version and the `LoRARequest` vLLM serves it with.

    Each load gets a new `lora_int_id`, so requests that started on an older adapter finish on it
    while new ones get the new one. `lora_request` builds the request (vLLM's `LoRARequest`; tests
    pass a stand-in)."""

    def __init__(self, registry: PolicyRegistry, *, identity: dict, base_id: str, max_lora_rank: int,
                 lora_request: Callable[..., Any] = _vllm_lora_request):
        self.registry = registry
        self.identity = identity
        self.base_id = base_id
        self.max_lora_rank = max_lora_rank
        self.lora_request = lora_request
        self._ids = itertools.count(1)

    def load(self, name: str, version: int) -> ServedPolicy:
        directory = self.registry.path(name, version)
        manifest = self.registry.verify(name, version)
        check_base(manifest, self.identity, directory)
        if manifest.lora_rank > self.max_lora_rank:
            raise CheckpointError(f"policy {name}@{version} has LoRA rank {manifest.lora_rank}; this server takes "
                                  f"<= {self.max_lora_rank} (IRO_MAX_LORA_RANK)", reason="rank_too_large", path=directory)
        check_adapter(directory, manifest)
        lora = self.lora_request(lora_name=f"{name}@{version}", lora_int_id=next(self._ids),
                                 lora_path=str(directory), base_model_name=self.base_id)
        return ServedPolicy(name, version, directory, lora, manifest.method, manifest.metrics)


class PolicyManager(RegistryManager[ServedPolicy]):
    """Serves every policy of the registry; the watcher follows each policy's CURRENT."""

    kind = "policy"
    list_type = PolicyList

    def __init__(self, registry: PolicyRegistry, *, identity: dict, base_id: str, max_lora_rank: int,
                 lora_request: Callable[..., Any] = _vllm_lora_request):
        super().__init__(registry, PolicyLoader(registry, identity=identity, base_id=base_id,
                                                max_lora_rank=max_lora_rank, lora_request=lora_request),
                         base_id=base_id)

    def _entry_status(self, served: ServedPolicy | None, **common) -> PolicyStatus:
        return PolicyStatus(model=common["name"], root=self.base_id, method=served.method if served else None,
                            served_version=common["serving_version"], **common)

    def resolve(self, model: str, values=None) -> ServedPolicy | None:
        """The served policy `model` names when it is `POLICY` or `POLICY+VALUE` (with VALUE served
        by `values`); None otherwise. Its `lora` is the adapter the request samples with."""
        name, sep, value = model.partition("+")
        served = self.served.get(name)
        if served is None or (sep and not (value and values is not None and values.has(value.split("@")[0]))):
            return None
        return served


async def start_policies(app, settings, engine, model_path) -> PolicyManager | None:
    """The policy manager and its watcher when a policy registry is configured (None otherwise)."""
    if settings.policies_dir is None:
        return None
    from valuefn.model import backbone_identity

    manager = PolicyManager(PolicyRegistry(settings.policies_dir, poll_interval=settings.registry_poll_s), identity=backbone_identity(model_path),
                            base_id=engine.model_id, max_lora_rank=settings.max_lora_rank)
    await manager.reconcile()
    task = asyncio.create_task(manager.watch())

    async def close():
        manager.stop()
        task.cancel()

    app.state.closers.append(close)
    return manager


__all__ = ["PolicyLoader", "PolicyManager", "ServedPolicy", "start_policies"]
