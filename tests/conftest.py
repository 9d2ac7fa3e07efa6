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
    """A fresh key that signs the session's job records (serve/records.py), removed at exit; set in the
    environment before any Ray cluster or subprocess starts, so they all inherit it."""
    from serve.records import RecordSigner

    folder = tempfile.mkdtemp(prefix="mriseg-record-key-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(RecordSigner.generate(Path(folder) / "record.key"))


os.environ["MRISEG_RECORD_KEY_FILE"] = _record_key()
