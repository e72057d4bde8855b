"""ValueManager's request-facing rules without an engine (issue 25): version pins only to loadable
versions, loaded once under a lock; admin writes on a read-only registry answer 409; refusals bounded."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from server.errors import ConflictError, GuidanceError, NotFoundError
from server.registry_manager import MAX_REFUSALS
from server.value_manager import ValueManager
from valuefn.checkpoint import CheckpointError
from valuefn.registry import Registry


class CountingLoader:
    """Stands in for `ValueLoader`: a chain per load, counted; `gate` holds loads until set."""

    def __init__(self):
        self.loads: list[tuple[str, int]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def load_chain(self, name: str, version: int):
        self.started.set()
        self.gate.wait(30)
        self.loads.append((name, version))
        return SimpleNamespace(name=name, version=version, versions=[version])


def make_registry(root, name: str, versions: int) -> Registry:
    for v in range(1, versions + 1):
        (root / name / f"v{v:04d}").mkdir(parents=True)
    (root / name / "CURRENT").write_text(f"v{versions:04d}\n")
    return Registry(root)


def manager_with(tmp_path, versions: int = 3):
    registry = make_registry(tmp_path, "demo", versions)
    loader = CountingLoader()
    manager = ValueManager(registry, loader, base_id="tiny")
    manager.served["demo"] = loader.load_chain("demo", versions)
    loader.loads.clear()
    return manager, loader


async def test_a_pinned_version_is_loaded_once_for_concurrent_requests(tmp_path):
    manager, loader = manager_with(tmp_path)
    loader.gate.clear()
    waiting = [asyncio.create_task(manager.chain_for("demo@1")) for _ in range(5)]
    assert await asyncio.to_thread(loader.started.wait, 30)  # the first load is under way; the rest queued
    assert not any(task.done() for task in waiting)
    loader.gate.set()
    chains = await asyncio.gather(*waiting)
    assert loader.loads == [("demo", 1)]
    assert all(chain is chains[0] for chain in chains)


@pytest.mark.parametrize("spec,error,code", [
    ("demo@9", NotFoundError, "value_not_found"),  # not on disk
    ("demo@\u00b2", GuidanceError, None),  # was int("²"): a bare ValueError
    ("demo\n", GuidanceError, None),  # `$` matched before the newline
    ("demo@1\n", GuidanceError, None),
])
async def test_only_listed_versions_with_valid_specs_are_pinned(tmp_path, spec, error, code):
    manager, loader = manager_with(tmp_path)
    with pytest.raises(error) as raised:
        await manager.chain_for(spec, param="value")
    assert raised.value.param == "value" and (code is None or raised.value.code == code)
    assert loader.loads == []


async def test_an_unloaded_value_cannot_be_pinned_and_loses_its_pins(tmp_path):
    manager, loader = manager_with(tmp_path)
    await manager.chain_for("demo@1")
    await manager.unload("demo")
    assert manager._extra == {}
    with pytest.raises(NotFoundError, match="unloaded"):
        await manager.chain_for("demo@1")
    with pytest.raises(NotFoundError):
        await manager.chain_for("demo@2")
    assert loader.loads == [("demo", 1)]


async def test_a_refused_version_is_not_loaded_again_and_refusals_are_bounded(tmp_path):
    manager, loader = manager_with(tmp_path)

    def refuse(name, version):
        raise CheckpointError(f"{tmp_path}/demo/v{version:04d}/head.safetensors: sha256 mismatch",
                              reason="bad_hash", path=tmp_path / "demo" / f"v{version:04d}")

    loader.load_chain = refuse
    with pytest.raises(GuidanceError) as first:
        await manager.chain_for("demo@1")
    assert first.value.code == "value_refused" and str(tmp_path) not in first.value.message
    with pytest.raises(GuidanceError, match="was refused"):
        await manager.chain_for("demo@1")
    for version in range(2, MAX_REFUSALS + 10):
        manager._refuse("demo", version, ValueError("bad"))
    assert len(manager.refused["demo"]) == MAX_REFUSALS


async def test_rollback_on_a_read_only_registry_is_a_409_with_the_reason(tmp_path, monkeypatch):
    manager, loader = manager_with(tmp_path)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("os.replace", read_only)  # CURRENT is written by an atomic replace
    with pytest.raises(ConflictError) as raised:
        await manager.rollback("demo")
    assert raised.value.code == "registry_read_only" and "Permission denied" in raised.value.message
    assert manager.served["demo"].version == 3 and loader.loads == [("demo", 2)]  # verified, then refused to write


def test_a_refusal_is_logged_with_its_tag_and_shown_without_paths(tmp_path, caplog):
    manager, _ = manager_with(tmp_path)
    folder = tmp_path / "demo" / "v0002"
    manager._refuse("demo", 2, CheckpointError(f"{folder}/head.safetensors does not match its sha256",
                                               reason="hash_mismatch", path=folder))
    assert "hash_mismatch" in caplog.text and str(folder) in caplog.text  # the operator sees where
    reason = manager.refused["demo"][2].reason
    assert reason.startswith("hash_mismatch") and str(tmp_path) not in reason and "demo@2" in reason
