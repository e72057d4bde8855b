"""The value registry (chains) in object storage, against moto's S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.hashing import sha256_file
from registry import CheckpointError
from tests.registry.moto_store import aws_env, bucket, moto  # noqa: F401
from valuefn.checkpoint import ADAPTER_FILE, FORMAT_VERSION, HEAD_FILE
from valuefn.registry import Registry, open_registry


def publish_value(registry: Registry, payload: bytes, **kw) -> int:
    def write(d: Path) -> dict[str, str]:
        (d / ADAPTER_FILE).write_bytes(payload)
        (d / HEAD_FILE).write_bytes(payload[::-1])
        return {f: sha256_file(d / f) for f in (ADAPTER_FILE, HEAD_FILE)}

    manifest = {"format_version": FORMAT_VERSION, "name": "v", "version": 1, "backbone": {"name": "tiny"},
                "model": {}, "chain": []}
    return registry.publish("v", write, manifest, **kw)


def test_a_value_chain_in_object_storage(bucket, tmp_path):
    writer = open_registry(f"s3://{bucket}/values", Registry, cache_dir=tmp_path / "w")
    assert publish_value(writer, b"first", extend_chain=True) == 1
    assert publish_value(writer, b"second", extend_chain=True, beta=0.5) == 2
    assert publish_value(writer, b"third", extend_chain=False) == 3
    writer.rollback("v")
    reader = Registry(Path(f"s3://{bucket}/values"), cache_dir=tmp_path / "r")  # how --values-dir s3://... arrives
    assert reader.current("v") == 2
    assert [(link.version, link.beta) for link in reader.manifest("v", 2).chain] == [(1, 1.0), (2, 0.5)]
    assert reader.remove_old("v", keep=1) == []  # v1 is in CURRENT's chain, v3 is the newest
    assert reader.verify("v", 2).version == 2
    assert (reader.path("v", 1) / ADAPTER_FILE).read_bytes() == b"first"
    writer.store.client.put_object(Bucket=bucket, Key=f"values/v/v0003/{HEAD_FILE}", Body=b"tampered")
    with pytest.raises(CheckpointError, match=HEAD_FILE) as refused:
        reader.verify("v", 3)
    assert refused.value.reason == "hash_mismatch"
