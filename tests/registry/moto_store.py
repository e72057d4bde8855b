"""A real S3 API for registry tests: moto's server mode in this process (HTTP on a free port),
reached with boto3 through the standard settings (`AWS_ENDPOINT_URL`, dummy credentials).

Import the fixtures where they are used: `from tests.registry.moto_store import moto, bucket  # noqa: F401`.

moto checks a conditional PutObject (If-None-Match / If-Match) and then stores the object in two
steps while serving each request on its own thread; real S3 applies the condition atomically. The
session fixture makes moto's PutObject handler one critical section so the store gives the
guarantee S3 documents, and the race tests exercise our code, not moto's thread interleaving.
"""

from __future__ import annotations

import socket
import threading
import uuid
from dataclasses import dataclass

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoEndpoint:
    """One ThreadedMotoServer; `stop()`/`start()` make an outage on the same port (the stored
    objects live in this process's moto backends and survive it)."""

    port: int
    server: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _atomic_conditional_puts() -> None:
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_atomic", False):
        return
    lock, put_object = threading.Lock(), S3Response.put_object

    def atomic_put_object(self):
        with lock:
            return put_object(self)

    atomic_put_object._atomic = True
    S3Response.put_object = atomic_put_object


def start_endpoint() -> MotoEndpoint:
    _atomic_conditional_puts()
    endpoint = MotoEndpoint(free_port())
    endpoint.start()
    return endpoint


@pytest.fixture(scope="session")
def moto():
    endpoint = start_endpoint()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """Dummy credentials and no profile, so nothing reads this machine's AWS configuration."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def new_bucket(endpoint: MotoEndpoint, monkeypatch) -> str:
    """A fresh bucket on `endpoint`, with AWS_ENDPOINT_URL pointing there."""
    from registry.s3 import make_client

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    name = f"reg-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(moto, aws_env) -> str:
    """A fresh bucket on the session's moto server."""
    return new_bucket(moto, aws_env)
