"""The registry in object storage, against a real S3 API (moto's server, boto3): publish, verify,
read through the cache, racing publishers, corruption, outages, pruning and polling."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from registry import CheckpointError, RegistryError, RegistryUnavailable, open_registry, open_store
from registry.local import LocalStore
from registry.policies import ADAPTER_WEIGHTS, PolicyRegistry
from registry.s3 import CLAIM, S3Store
from tests.registry.helpers import publish
from tests.registry.moto_store import aws_env, bucket, moto, new_bucket, start_endpoint  # noqa: F401

NAME = "pol"


def open_s3(bucket: str, cache: Path, **kw) -> PolicyRegistry:
    return open_registry(f"s3://{bucket}/policies", PolicyRegistry, cache_dir=cache, **kw)


def on_request(registry, operation: str, key_suffix: str, action) -> None:
    """Run `action()` once, just before `registry`'s client sends `operation` for a key ending in `key_suffix`."""
    fired = []

    def hook(params, **kwargs):
        if str(params.get("Key", "")).endswith(key_suffix) and not fired:
            fired.append(True)
            action()

    registry.store.client.meta.events.register(f"provide-client-params.s3.{operation}", hook)


# ------------------------------------------------------------------ locations
@pytest.mark.parametrize("location, bucket_name, prefix", [
    ("s3://team/iro/values", "team", "iro/values"),
    (Path("s3://team/iro/values/"), "team", "iro/values"),  # pathlib folds '//': what typer and pydantic hand over
    ("s3://team", "team", ""),
])
def test_s3_locations_open_the_object_store(location, bucket_name, prefix, tmp_path):
    store = open_store(location, cache_dir=tmp_path, client=object())  # no client needed to parse
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == (bucket_name, prefix)


def test_a_path_opens_a_folder_and_a_bad_bucket_is_refused(tmp_path, aws_env):
    assert isinstance(open_store(tmp_path / "values"), LocalStore)
    with pytest.raises(RegistryError, match="invalid bucket name"):
        open_store("s3://Bad_Bucket/x", cache_dir=tmp_path)
    with pytest.raises(RegistryError, match="poll_interval"):
        open_store("s3://good-bucket/x", cache_dir=tmp_path, poll_interval=0)


# ------------------------------------------------------------------ publish and read
def test_publish_then_read_through_a_verified_cache(bucket, tmp_path):
    writer, reader = open_s3(bucket, tmp_path / "writer"), open_s3(bucket, tmp_path / "reader")
    assert (publish(writer, NAME, b"one"), publish(writer, NAME, b"two")) == (1, 2)
    assert reader.names() == [NAME] and reader.versions(NAME) == [1, 2] and reader.current(NAME) == 2
    assert reader.resolve(NAME) == (NAME, 2)
    assert reader.manifest(NAME, 1).training == {"payload": "one"}
    assert not (tmp_path / "reader" / NAME / "v0001").exists()  # a manifest read fetches no weights
    m = reader.verify(NAME, 2)
    path = reader.path(NAME, 2)
    assert path == tmp_path / "reader" / NAME / "v0002" and (path / ADAPTER_WEIGHTS).read_bytes() == b"two"
    assert m.files and m.version == 2
    assert not reader.path(NAME, 9).exists() and reader.healthy and reader.last_error is None
    with pytest.raises(RegistryError, match="does not exist"):
        reader.resolve(f"{NAME}@9")


def test_rollback_delete_and_prune_never_reuse_a_number(bucket, tmp_path):
    reg = open_s3(bucket, tmp_path / "c")
    for payload in (b"a", b"b", b"c"):
        publish(reg, NAME, payload)
    assert reg.rollback(NAME) == 2 and reg.current(NAME) == 2
    with pytest.raises(RegistryError, match="is CURRENT"):
        reg.delete(NAME, 2)
    reg.delete(NAME, 3)
    assert reg.versions(NAME) == [1, 2]
    assert publish(reg, NAME, b"d") == 4  # v3's claim stays: a reader's cached v3 can never mean other bytes
    assert reg.remove_old(NAME, keep=1) == [1, 2]
    assert reg.versions(NAME) == [4] and reg.current(NAME) == 4
    reg.set_current(NAME, 4)
    with pytest.raises(RegistryError, match="does not exist"):
        reg.set_current(NAME, 3)


@pytest.mark.parametrize("each", [4, pytest.param(20, marks=pytest.mark.e2e)])  # 2 x 20: the figure (slow)
def test_two_publishers_racing_get_distinct_versions_and_none_is_lost(bucket, tmp_path, each):
    publishers = [open_s3(bucket, tmp_path / f"pub{i}") for i in range(2)]
    got: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        for n in range(each):
            payload = f"publisher {i} #{n}".encode()
            got[i].append((publish(publishers[i], NAME, payload), payload))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = [v for i in got for v, _ in got[i]]
    assert sorted(versions) == list(range(1, 2 * each + 1))  # distinct numbers, none twice
    reader = open_s3(bucket, tmp_path / "reader")
    assert reader.versions(NAME) == list(range(1, 2 * each + 1))
    for i in got:  # every version holds what its publisher wrote: nothing overwritten
        for version, payload in got[i]:
            assert (reader.path(NAME, version) / ADAPTER_WEIGHTS).read_bytes() == payload
            assert reader.manifest(NAME, version).training["payload"] == payload.decode()
    assert reader.current(NAME) == 2 * each  # CURRENT never went back to a loser's older version


def test_current_is_a_compare_and_swap(bucket, tmp_path):
    reg = open_s3(bucket, tmp_path / "c")
    publish(reg, NAME, b"a")
    publish(reg, NAME, b"b")
    assert reg.store.write_current(NAME, 1, only_forward=True) is False and reg.current(NAME) == 2
    client = reg.store.client
    key = f"policies/{NAME}/CURRENT"
    stale = client.head_object(Bucket=bucket, Key=key)["ETag"]
    reg.set_current(NAME, 1)
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as lost:  # what a writer holding the old ETag gets
        client.put_object(Bucket=bucket, Key=key, Body=b"v0002\n", IfMatch=stale)
    assert lost.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as taken:
        client.put_object(Bucket=bucket, Key=f"policies/{NAME}/v0001/{CLAIM}", Body=b"", IfNoneMatch="*")
    assert taken.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert reg.current(NAME) == 1


# ------------------------------------------------------------------ refusals
def test_a_corrupted_object_is_refused_with_its_reason_and_the_previous_version_serves(bucket, tmp_path):
    writer, reader = open_s3(bucket, tmp_path / "w"), open_s3(bucket, tmp_path / "r")
    publish(writer, NAME, b"good")
    serving = reader.path(NAME, 1)
    publish(writer, NAME, b"new")
    writer.store.client.put_object(Bucket=bucket, Key=f"policies/{NAME}/v0002/{ADAPTER_WEIGHTS}", Body=b"bit rot")
    with pytest.raises(CheckpointError, match=f"{ADAPTER_WEIGHTS} does not match its sha256") as refused:
        reader.verify(NAME, 2)
    assert refused.value.reason == "hash_mismatch"
    assert not (tmp_path / "r" / NAME / "v0002").exists()
    assert not [p for p in (tmp_path / "r" / NAME).iterdir() if p.name.startswith(".tmp-")]  # nothing half-written
    assert reader.path(NAME, 1) == serving and reader.verify(NAME, 1).version == 1


@pytest.mark.parametrize("files, reason", [
    ({"../escape.safetensors": "0" * 64}, "bad_file"),
    ({ADAPTER_WEIGHTS: "not-a-digest"}, "bad_manifest"),
    ({ADAPTER_WEIGHTS: "0" * 64}, "missing_file"),
])
def test_a_manifest_listing_what_it_must_not_is_refused(bucket, tmp_path, files, reason):
    import json

    reg = open_s3(bucket, tmp_path / "c")
    reg.store.client.put_object(Bucket=bucket, Key=f"policies/{NAME}/v0001/manifest.json",
                                Body=json.dumps({"format_version": 1, "files": files}).encode())
    with pytest.raises(CheckpointError) as refused:
        reg.path(NAME, 1)
    assert refused.value.reason == reason


# ------------------------------------------------------------------ outages
@pytest.fixture
def own_moto(aws_env):
    """A moto server of the test's own, to stop and restart."""
    endpoint = start_endpoint()
    yield endpoint, new_bucket(endpoint, aws_env)
    endpoint.stop()


def quick(bucket: str, cache: Path) -> PolicyRegistry:
    from registry.s3 import make_client

    return open_s3(bucket, cache, client=make_client(connect_timeout=1, read_timeout=5, max_attempts=1))


def test_an_outage_in_the_middle_of_a_publish_leaves_nothing_half_visible(own_moto, tmp_path):
    endpoint, bucket = own_moto
    writer, reader = quick(bucket, tmp_path / "w"), quick(bucket, tmp_path / "r")
    publish(writer, NAME, b"one")
    on_request(writer, "PutObject", "/manifest.json", endpoint.stop)
    with pytest.raises(RegistryUnavailable):
        publish(writer, NAME, b"two")  # claimed v2 and uploaded its files; the store went away before the manifest
    assert not writer.healthy and "cannot reach" in writer.last_error
    endpoint.start()
    assert reader.versions(NAME) == [1] and reader.current(NAME) == 1  # v2 never became visible
    assert not (tmp_path / "w" / NAME / "v0002").exists()
    assert publish(writer, NAME, b"three") == 3 and writer.healthy  # the burnt number is skipped
    assert reader.current(NAME) == 3 and (reader.path(NAME, 3) / ADAPTER_WEIGHTS).read_bytes() == b"three"


def test_an_outage_in_the_middle_of_a_load_keeps_the_cached_version_serving(own_moto, tmp_path):
    endpoint, bucket = own_moto
    writer, reader = quick(bucket, tmp_path / "w"), quick(bucket, tmp_path / "r")
    publish(writer, NAME, b"one")
    serving = reader.path(NAME, 1)
    publish(writer, NAME, b"two")
    on_request(reader, "GetObject", f"/v0002/{ADAPTER_WEIGHTS}", endpoint.stop)
    with pytest.raises(RegistryUnavailable):
        reader.path(NAME, 2)  # the manifest came, the weights did not
    assert not reader.healthy
    assert not (tmp_path / "r" / NAME / "v0002").exists()
    assert reader.verify(NAME, 1).version == 1 and reader.path(NAME, 1) == serving  # from the cache, store down
    with pytest.raises(RegistryUnavailable):
        reader.current(NAME)
    endpoint.start()
    assert (reader.path(NAME, 2) / ADAPTER_WEIGHTS).read_bytes() == b"two" and reader.healthy


def test_a_dead_endpoint_is_reported_not_raised_as_a_crash(tmp_path, aws_env):
    from tests.registry.moto_store import free_port

    aws_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    reg = quick("nowhere", tmp_path)
    for call in (reg.names, lambda: reg.versions(NAME), lambda: reg.current(NAME), lambda: reg.path(NAME, 1)):
        with pytest.raises(RegistryUnavailable):
            call()
    with pytest.raises(OSError):  # an outage is I/O to callers that catch OSError
        reg.names()
    assert not reg.healthy and "cannot reach s3://nowhere/policies" in reg.last_error


# ------------------------------------------------------------------ the cache
def test_prune_drops_cached_versions_nothing_uses(bucket, tmp_path):
    writer, reader = open_s3(bucket, tmp_path / "w"), open_s3(bucket, tmp_path / "r")
    for payload in (b"a", b"b", b"c"):
        publish(writer, NAME, payload)
    for v in (1, 2, 3):
        reader.path(NAME, v)
    reader.manifest(NAME, 1)
    assert reader.prune_cache({(NAME, 3)}) == []  # just used: a load may still be reading them
    reader.store.prune_grace_s = 0
    assert reader.prune_cache({(NAME, 3)}) == [(NAME, 1), (NAME, 2)]
    assert reader.store.cached() == [(NAME, 3)]
    assert (reader.path(NAME, 1) / ADAPTER_WEIGHTS).read_bytes() == b"a"  # fetched again on demand
    assert open_registry(tmp_path / "local", PolicyRegistry).prune_cache(set()) == []  # a folder has no cache


# ------------------------------------------------------------------ watching
async def test_the_watcher_sees_a_new_current_by_its_etag(bucket, tmp_path):
    writer, reader = open_s3(bucket, tmp_path / "w"), open_s3(bucket, tmp_path / "r", poll_interval=0.05)
    publish(writer, NAME, b"one")
    seen, target, stop = [], asyncio.Event(), asyncio.Event()

    async def reconcile():
        current = await asyncio.to_thread(reader.current, NAME)
        seen.append(current)
        if current == 2:
            target.set()

    polls, fingerprint = [], reader.store.fingerprint

    def counted():
        polls.append(fingerprint())
        return polls[-1]

    async def until(condition):
        while not condition():
            await asyncio.sleep(0.01)

    reader.store.fingerprint = counted
    task = asyncio.create_task(reader.watch(reconcile, stop))
    await asyncio.wait_for(until(lambda: seen), timeout=30)
    reconciles, polled = len(seen), len(polls)
    await asyncio.wait_for(until(lambda: len(polls) >= polled + 3), timeout=30)  # polls of an unchanged store
    assert len(seen) == reconciles  # an unchanged CURRENT costs a LIST and HEADs, not a reconcile
    await asyncio.to_thread(publish, writer, NAME, b"two")
    await asyncio.wait_for(target.wait(), timeout=30)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert seen[0] == 1 and seen[-1] == 2 and reader.healthy


async def test_the_watcher_survives_an_outage_and_reconciles_on_recovery(own_moto, tmp_path):
    endpoint, bucket = own_moto
    writer, reader = quick(bucket, tmp_path / "w"), quick(bucket, tmp_path / "r")
    reader.store.poll_interval = 0.05
    publish(writer, NAME, b"one")
    seen, stop = [], asyncio.Event()

    async def reconcile():
        seen.append(await asyncio.to_thread(reader.current, NAME))

    async def until(condition):
        while not condition():
            await asyncio.sleep(0.02)

    task = asyncio.create_task(reader.watch(reconcile, stop))
    await asyncio.wait_for(until(lambda: seen == [1]), timeout=30)
    await asyncio.to_thread(endpoint.stop)
    await asyncio.wait_for(until(lambda: not reader.healthy), timeout=30)
    assert "cannot reach" in reader.last_error and not task.done()
    await asyncio.to_thread(endpoint.start)
    await asyncio.wait_for(until(lambda: reader.healthy and len(seen) >= 2), timeout=30)  # recovery reconciles
    await asyncio.to_thread(publish, writer, NAME, b"two")
    await asyncio.wait_for(until(lambda: seen[-1] == 2), timeout=30)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
