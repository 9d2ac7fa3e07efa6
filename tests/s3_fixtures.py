"""Session-scoped real S3 servers on loopback (import the fixtures you use into your test module).

``seaweed``: SeaweedFS (``weed mini``) with static keys and buckets ``inbox``,
``outbox``, ``models``, ``jobs``; ``moto``: moto_server (S3 + SQS with
notifications). Both are stopped at the end of the session.
"""

from __future__ import annotations

import uuid

import pytest

from serve.storage.embedded_s3 import MotoServer, SeaweedServer

SEAWEED_BUCKETS = ("inbox", "outbox", "models", "jobs")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A running SeaweedServer; its ``settings`` are an S3Settings for clients."""
    server = SeaweedServer(tmp_path_factory.mktemp("weed"), buckets=SEAWEED_BUCKETS)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A running MotoServer (S3 and SQS on one port)."""
    server = MotoServer(log_dir=tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def unique_prefix() -> str:
    """A fresh key prefix so tests sharing a session server never see each other's objects."""
    return f"t-{uuid.uuid4().hex[:10]}"
