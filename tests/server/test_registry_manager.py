"""The watched-registry managers (values and policies) without an engine: a real registry in
`tmp_path`, tiny adapter files, fakes only for what needs vLLM or a backbone.

Pin, unpin, unload, refuse and reconcile behave the same for both kinds."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from server.errors import ConflictError, NotFoundError
from server.policies import PolicyManager
from server.value_manager import ValueManager
from registry.errors import CheckpointError
from common.hashing import sha256_file
from registry.policies import ADAPTER_CONFIG, ADAPTER_WEIGHTS, POLICY_FORMAT_VERSION, PolicyRegistry
from valuefn.registry import Registry

IDENTITY = {"name": "tiny", "config_sha256": "c" * 64, "tokenizer_sha256": "t" * 64}
RANK = 2


def publish_policy(registry: PolicyRegistry, name: str, *, corrupt: bool = False) -> int:
    """A new version of a rank-2 LoRA adapter (two small tensors; no model built)."""

    def write(d):
        save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(RANK, 8),
                   "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, RANK)},
                  str(d / ADAPTER_WEIGHTS))
        (d / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": RANK, "target_modules": ["q_proj"]}))
        files = {f: sha256_file(d / f) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
        return {k: ("0" * 64 if corrupt and k == ADAPTER_WEIGHTS else v) for k, v in files.items()}

    manifest = {"format_version": POLICY_FORMAT_VERSION, "name": name, "version": 1, "base": IDENTITY,
                "method": "apa", "lora_rank": RANK}
    return registry.publish_adapter(name, write, manifest)


def fake_lora_request(**kwargs):
    """Stands in for vLLM's `LoRARequest` (the only part of a policy load that needs vLLM)."""
    return SimpleNamespace(**kwargs)


def policy_manager(registry: PolicyRegistry, **kwargs) -> PolicyManager:
    return PolicyManager(registry, identity=IDENTITY, base_id="tiny", max_lora_rank=8, lora_request=fake_lora_request,
                         **kwargs)


async def test_a_pinned_policy_version_survives_the_watchers_reconcile_and_load_without_version_unpins(tmp_path):
    """Issue 26's bug: `load {"version": 1}` answered 200, then the watcher served CURRENT (v2)
    again within a second; `load {}` did not unpin."""
    registry = PolicyRegistry(tmp_path)
    publish_policy(registry, "pin")
    publish_policy(registry, "pin")
    manager = policy_manager(registry)
    await manager.reconcile()
    assert manager.served["pin"].version == 2

    await manager.load("pin", 1, pin=True)
    await manager.reconcile()  # what the watcher does on every registry change
    assert manager.served["pin"].version == 1
    status = manager.status("pin")
    assert status.serving_version == 1 and status.pinned

    await manager.load("pin")  # load {}: follow CURRENT again
    assert manager.served["pin"].version == 2 and not manager.status("pin").pinned
    publish_policy(registry, "pin")  # and the watcher follows a new CURRENT
    await manager.reconcile()
    assert manager.served["pin"].version == 3


# ----------------------------------------------------------------------------- both kinds, one set of rules
class FakeChainLoader:
    """Stands in for `valuefn.loader.ValueLoader`: a chain per load; versions in `bad` are refused;
    a name in `gates` loads once its event is set."""

    def __init__(self):
        self.bad: set[int] = set()
        self.gates: dict[str, threading.Event] = {}
        self.started = threading.Event()

    def load_chain(self, name: str, version: int):
        self.started.set()
        if name in self.gates:
            assert self.gates[name].wait(30)
        if version in self.bad:
            raise CheckpointError(f"v{version:04d}/head.safetensors does not match its sha256", reason="hash_mismatch")
        return SimpleNamespace(version=version, versions=[version], betas=[1.0],
                               defaults=SimpleNamespace(model_dump=lambda: {"mode": "cbs"}))


class ValueKind:
    kind = "value"

    def __init__(self, root):
        self.registry, self.loader = Registry(root), FakeChainLoader()
        self.manager = ValueManager(self.registry, self.loader, base_id="tiny")

    def publish(self, name: str, *, bad: bool = False) -> int:
        version = max(self.registry.versions(name), default=0) + 1
        (self.registry.root / name / f"v{version:04d}").mkdir(parents=True)
        if bad:
            self.loader.bad.add(version)
        self.registry.set_current(name, version)
        return version


class PolicyKind:
    kind = "policy"

    def __init__(self, root):
        self.registry = PolicyRegistry(root)
        self.manager = policy_manager(self.registry)

    def publish(self, name: str, *, bad: bool = False) -> int:
        return publish_policy(self.registry, name, corrupt=bad)


@pytest.fixture(params=[ValueKind, PolicyKind], ids=["value", "policy"])
def kind(request, tmp_path):
    return request.param(tmp_path / "registry")


async def test_a_pin_holds_until_current_changes_on_disk(kind):
    manager = kind.manager
    kind.publish("a"), kind.publish("a")
    await manager.reconcile()
    await manager.load("a", 1, pin=True)
    kind.publish("b")  # another entry's change: the watcher reconciles everything
    await manager.reconcile()
    assert manager.served["a"].version == 1 and manager.status("a").pinned
    assert manager.served["b"].version == 1
    newest = kind.publish("a")  # a new CURRENT: the pin is lifted and the watcher follows it
    await manager.reconcile()
    assert manager.served["a"].version == newest and not manager.status("a").pinned


async def test_unload_stops_serving_until_an_admin_load(kind):
    manager = kind.manager
    kind.publish("a")
    await manager.reconcile()
    await manager.unload("a")
    assert manager.names() == [] and manager.status("a").serving_version is None
    kind.publish("a")
    await manager.reconcile()
    assert manager.names() == []  # the watcher leaves an unloaded entry alone
    with pytest.raises(NotFoundError) as raised:
        await manager.unload("a")
    assert raised.value.code == f"{kind.kind}_not_found"
    await manager.load("a")
    assert manager.served["a"].version == 2


async def test_a_refused_version_is_recorded_with_time_and_the_old_one_serves(kind):
    manager = kind.manager
    kind.publish("a")
    await manager.reconcile()
    bad = kind.publish("a", bad=True)
    await manager.reconcile()
    status = manager.status("a")
    assert status.serving_version == 1 and status.current_on_disk == bad
    (refusal,) = status.refused
    assert refusal.version == bad and "sha256" in refusal.reason and refusal.at > 0
    assert str(kind.registry.root) not in refusal.reason
    with pytest.raises(ConflictError) as raised:  # an admin may retry it: refused again, a 409 with the reason
        await manager.load("a", bad)
    assert raised.value.code == f"{kind.kind}_refused" and "sha256" in raised.value.message
    with pytest.raises(NotFoundError) as raised:
        await manager.load("a", 9)
    assert (raised.value.code, raised.value.param) == (f"{kind.kind}_not_found", "version")
    assert manager.served["a"].version == 1


async def test_rollback_skips_refused_versions_and_points_current_at_what_serves(kind):
    manager = kind.manager
    kind.publish("a"), kind.publish("a", bad=True)
    await manager.reconcile()
    top = kind.publish("a")
    await manager.reconcile()
    assert manager.served["a"].version == top
    await manager.rollback("a")
    assert manager.served["a"].version == 1 and kind.registry.current("a") == 1
    with pytest.raises(ConflictError) as raised:
        await manager.rollback("a")
    assert raised.value.code == "no_older_version"


async def test_a_slow_load_holds_only_its_own_name(tmp_path):
    values = ValueKind(tmp_path)
    values.publish("slow"), values.publish("fast")
    values.loader.gates["slow"] = threading.Event()
    slow = asyncio.create_task(values.manager.load("slow"))
    assert await asyncio.to_thread(values.loader.started.wait, 30)  # slow's load holds its lock
    await asyncio.wait_for(values.manager.load("fast"), 30)  # one lock for all names: this would wait for slow
    assert values.manager.names() == ["fast"] and not slow.done()
    values.loader.gates["slow"].set()
    await slow
    assert values.manager.names() == ["fast", "slow"]


# ----------------------------------------------------------------------------- one route shape
def admin_client(kind):
    """The real admin routes and error handlers around `kind.manager` (no engine: not entered as a
    context manager, so the app's lifespan, which starts the engine, does not run)."""
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.settings import ServerSettings

    app = build_app(ServerSettings())
    app.state.serving = object()
    app.state.values = kind.manager if kind.kind == "value" else None
    app.state.policies = kind.manager if kind.kind == "policy" else None
    return TestClient(app)


async def test_the_admin_routes_have_one_shape_and_refuse_bad_bodies(kind):
    kind.publish("a"), kind.publish("a")
    await kind.manager.reconcile()
    prefix = "/v1/values" if kind.kind == "value" else "/v1/policies"
    client = admin_client(kind)
    pinned = client.post(f"{prefix}/a/load", json={"version": 1})
    assert pinned.status_code == 200 and pinned.json()["serving_version"] == 1 and pinned.json()["pinned"]
    for body, param in (({"version": "1"}, "version"), ({"version": 0}, "version"), ({"versoin": 1}, "versoin")):
        error = client.post(f"{prefix}/a/load", json=body)
        assert error.status_code == 400 and error.json()["error"]["param"] == param, error.text
    followed = client.post(f"{prefix}/a/load", json={})
    assert followed.json()["serving_version"] == 2 and not followed.json()["pinned"]
    listing = client.get(prefix).json()
    assert [s["name"] for s in listing["data"]] == ["a"] and listing["registry"] == kind.registry.location
    assert client.delete(f"{prefix}/a").json() == {"name": "a", "deleted": True}  # unloaded, files kept
    assert client.get(f"{prefix}/a").json()["serving_version"] is None and kind.registry.versions("a") == [1, 2]
    assert client.delete(f"{prefix}/a").json()["error"]["code"] == f"{kind.kind}_not_found"


async def test_a_policy_version_is_deleted_from_disk_by_its_own_route(tmp_path):
    policies = PolicyKind(tmp_path)
    for _ in range(3):
        policies.publish("a")
    await policies.manager.reconcile()
    await policies.manager.load("a", 2, pin=True)
    client = admin_client(policies)
    assert client.delete("/v1/policies/a/versions/2").json()["error"]["code"] == "policy_in_use"
    assert client.delete("/v1/policies/a/versions/3").json()["error"]["code"] == "policy_is_current"
    assert client.delete("/v1/policies/a/versions/1").json() == {"name": "a", "version": 1, "deleted": True}
    assert policies.registry.versions("a") == [2, 3]


async def test_reconcile_prunes_the_cache_to_the_versions_served(kind):
    """After each reconcile the registry's cache keeps only what a served entry reads (a value chain:
    all its versions); the registry decides what a cache is (a folder registry has none)."""
    manager, asked = kind.manager, []
    kind.publish("a"), kind.publish("a"), kind.publish("b")
    kind.registry.prune_cache = lambda in_use: asked.append(set(in_use)) or []
    await manager.reconcile()
    assert asked[-1] == {("a", 2), ("b", 1)}
    manager.served["a"].versions = [1, 2]  # a chain V_1, V_2 reads both
    assert manager.in_use() == {("a", 1), ("a", 2), ("b", 1)}

    def unreadable(in_use):
        raise PermissionError("read-only cache")

    kind.registry.prune_cache = unreadable
    assert manager.prune_cache() == []  # logged: costs disk, never a request
