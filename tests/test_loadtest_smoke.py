"""Bounded Locust smoke run against a real local Ray Serve app (tiny models): zero errors, not speed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_fixtures import SITE_KEYS, nifti_bytes, serve_stack, _shared_stack_owner  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ray
def test_locust_headless_smoke_run_has_no_errors(serve_stack, tmp_path):  # noqa: F811
    upload = tmp_path / "volume.nii.gz"
    upload.write_bytes(nifti_bytes(shape=(40, 36, 44)))  # under the stack's 2 MiB upload limit
    env = {**os.environ,
           "MRISEG_LT_KEYS": ",".join(f"{s}={k}" for s, k in SITE_KEYS.items() if s in ("site-a", "site-b")),
           "MRISEG_LT_UPLOAD": str(upload)}
    csv_prefix = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", "3", "-r", "3", "-t", "45s", "--stop-timeout", "60", "--host", serve_stack.url,
           "--csv", str(csv_prefix), "--only-summary", "--skip-log-setup"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0, proc.stderr[-2000:]
    assert int(total["Failure Count"]) == 0, Path(f"{csv_prefix}_failures.csv").read_text()
    # the percentiles the load test reports are there
    for col in ("50%", "95%", "99%", "Requests/s"):
        assert total[col] not in ("", "N/A")
    assert proc.returncode == 0, proc.stderr[-2000:]
