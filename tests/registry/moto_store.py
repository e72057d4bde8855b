"""A real S3 API for registry tests: moto's server mode in this process (HTTP on a free port),
reached with boto3 through the standard settings (`AWS_ENDPOINT_URL`, dummy credentials).

Import the fixtures where they are used: `from tests.registry.moto_store import moto, bucket  # noqa: F401`.
The server is `bench.moto_s3`'s (its docstring says why its conditional PutObject is made atomic).
"""

from __future__ import annotations

import uuid

import pytest

from bench.moto_s3 import MotoEndpoint, free_port, start_endpoint  # noqa: F401 (re-exported to the tests)


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
