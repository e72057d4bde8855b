"""The folder store behind the shared interface: its watch (moved from the server) and health."""

from __future__ import annotations

import asyncio
import shutil

from registry import open_registry
from registry.local import LocalStore
from registry.policies import PolicyRegistry
from tests.registry.helpers import publish

NAME = "pol"


def test_open_registry_creates_a_missing_folder(tmp_path):
    reg = open_registry(tmp_path / "a" / "policies", PolicyRegistry, create=True)
    assert isinstance(reg.store, LocalStore) and reg.root.is_dir() and reg.location == str(tmp_path / "a" / "policies")
    assert reg.names() == [] and reg.healthy
    assert publish(reg, NAME, b"x") == 1 and reg.current(NAME) == 1
    assert PolicyRegistry(tmp_path / "a" / "policies").versions(NAME) == [1]  # the constructor opens the same


async def test_the_folder_watch_reconciles_on_a_change_and_waits_for_a_missing_folder(tmp_path):
    root = tmp_path / "policies"
    reg = open_registry(root, PolicyRegistry)
    seen, stop = [], asyncio.Event()

    async def reconcile():
        seen.append(reg.current(NAME) if reg.root.is_dir() else "missing")
        if seen[-1] == 1:
            raise RuntimeError("a reconcile that fails")  # logged; the watch goes on

    async def until(condition):
        while not condition():
            await asyncio.sleep(0.02)

    task = asyncio.create_task(reg.watch(reconcile, stop))
    await asyncio.wait_for(until(lambda: seen and not reg.healthy), timeout=30)
    assert seen[0] == "missing" and "is not a folder" in reg.last_error
    root.mkdir()
    await asyncio.to_thread(publish, reg, NAME, b"one")
    await asyncio.wait_for(until(lambda: 1 in seen and reg.healthy), timeout=30)
    await asyncio.to_thread(publish, reg, NAME, b"two")
    await asyncio.wait_for(until(lambda: seen[-1] == 2), timeout=30)
    shutil.rmtree(root)
    await asyncio.wait_for(until(lambda: not reg.healthy), timeout=30)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert not task.exception()


def test_same_location_compares_folders_resolved_and_urls_by_bucket_and_prefix(tmp_path, monkeypatch):
    reg = open_registry(tmp_path / "policies", PolicyRegistry, create=True)
    monkeypatch.chdir(tmp_path)
    assert reg.same_location("policies") and reg.same_location(str(tmp_path / "x" / ".." / "policies"))
    assert not reg.same_location(tmp_path / "other") and not reg.same_location("s3://b/policies")
    s3 = PolicyRegistry("s3://bkt/iro/policies", cache_dir=tmp_path / "cache", client=object())
    assert s3.same_location("s3://bkt/iro/policies/") and s3.same_location("s3:/bkt/iro/policies")  # pathlib's folded form
    assert not s3.same_location("s3://bkt/iro") and not s3.same_location(tmp_path / "cache")
