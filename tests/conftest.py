"""Shared test setup and the fixtures many folders use (a folder's own fixtures are in its conftest.py).

Helpers that are not fixtures are plain modules, imported as usual: tests/helpers/ for those of several
folders, a module in the folder for its own. Imports of numpy, torch, Ray and serve are inside the fixtures,
so the environment below is set before any of them loads."""

import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

# Before anything imports torch/nnunetv2/ray: bounded threads, no telemetry, no auth for local Ray.
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


def _record_key() -> str:
    """A fresh key that signs the session's job records (serve/jobs/records.py), removed at exit; set in the
    environment before any Ray cluster or subprocess starts, so they all inherit it."""
    from serve.jobs.records import RecordSigner

    folder = tempfile.mkdtemp(prefix="mriseg-record-key-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(RecordSigner.generate(Path(folder) / "record.key"))


os.environ["MRISEG_RECORD_KEY_FILE"] = _record_key()


#: The order of the groups the session runs in (see pytest_collection_modifyitems); a test in none is group 0.
_STACK_GROUPS = (("serve_stack", 1), ("isolated_ray", 2), ("up_two_sites", 3))


def _stack_group(item) -> float:
    names = set(getattr(item, "fixturenames", ()))
    group = max((g for f, g in _STACK_GROUPS if f in names), default=0)
    if group == 1 and item.get_closest_marker("changes_shared_stack"):
        return 1.5  # what it leaves behind (a killed router's work folders) must not meet the others' checks
    return group


def pytest_collection_modifyitems(session, config, items):
    """Run the tests on the session's shared Ray stack one after another, then those that start their own.

    A test that starts its own stack stops the shared one (one Ray cluster at a time on a small machine), so
    in file order the shared stack was started four times a session, each start costing tens of seconds.
    A shared-stack test marked ``changes_shared_stack`` runs after the other shared-stack tests. Within a group
    the collected order stays.
    """
    items[:] = sorted(items, key=_stack_group)  # sorted() is stable


# -- fixtures of several folders -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """All six sub-models plus the fast one: randomly initialised tiny nnU-Net folders (seeded)."""
    from serve.demo import write_random_models
    from serve.inference.modelload import configure_threads

    configure_threads(1)
    return write_random_models(tmp_path_factory.mktemp("models") / "models")


@pytest.fixture(scope="session")
def segmenter(tiny_models):
    """A CPU :class:`serve.inference.pipeline.Segmenter` over :func:`tiny_models`."""
    from serve.inference.modelstore import ModelStore
    from serve.inference.pipeline import Segmenter

    return Segmenter(ModelStore([tiny_models]), device="cpu", threads=1)


#: The buckets of the session's SeaweedFS (the ``seaweed`` fixture).
SEAWEED_BUCKETS = ("inbox", "outbox", "models", "jobs")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A running SeaweedFS (``weed mini``, static keys, buckets :data:`SEAWEED_BUCKETS`) on loopback; its
    ``settings`` are an S3Settings for clients. Stopped at the end of the session."""
    from serve.storage.embedded_s3 import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("weed"), buckets=SEAWEED_BUCKETS)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A running moto_server (S3 and SQS with notifications, on one port). Stopped at the end of the session."""
    from serve.storage.embedded_s3 import MotoServer

    server = MotoServer(log_dir=tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def unique_prefix() -> str:
    """A fresh key prefix so tests sharing a session server never see each other's objects."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def _shared_stack_owner():
    """The owner of the session's shared Ray stack (tests/helpers/stack.py), stopped at the end of the session."""
    from tests.helpers.stack import SHARED_STACK

    yield SHARED_STACK
    SHARED_STACK.stop()


@pytest.fixture
def serve_stack(_shared_stack_owner):
    """The session's shared stack, a :class:`tests.helpers.stack.Stack` (started on first use, restarted after
    an isolated test)."""
    return _shared_stack_owner.ensure()


@pytest.fixture
def isolated_ray(_shared_stack_owner, tmp_path):
    """Stops the shared stack; the test starts its own with :func:`tests.helpers.stack.start_stack` and
    registers it here (``isolated_ray["stack"]``), to be stopped after the test."""
    from tests.helpers.stack import stop_stack

    _shared_stack_owner.stop()
    holder: dict = {}
    yield holder
    stop_stack(holder.get("stack"))
