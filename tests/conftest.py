"""Shared test setup. Expensive fixtures live in tests/*_fixtures.py and are imported where used."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

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
