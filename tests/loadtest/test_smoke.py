"""Bounded Locust smoke run and short soak against a real local Ray Serve app (tiny models, real S3):
zero errors and a bounded RSS for every cluster process, not speed.

MRISEG_SOAK_SECONDS sets the load's length (default 15 s, what CI runs); a longer run of the same test,
e.g. ``MRISEG_SOAK_SECONDS=300 scripts/test.sh tests/loadtest/test_smoke.py``, or ``python -m loadtest.soak``
(docs/performance.md), is the real soak.
"""

from __future__ import annotations

import os

import pytest

from loadtest.localcluster import cluster_pids
from loadtest.soak import markdown, put_s3_inputs, soak
from serve.storage.s3client import make_client
from tests.helpers.stack import BUCKET, SITE_KEYS, nifti_bytes

# Per-process RSS bound for the short soak: the largest process (a sub-model replica or the router,
# torch and nnU-Net loaded) measured about 0.7 GB here; a leak of a volume per request would cross it.
RSS_BOUND_MB = 1200
#: Long enough for every Locust user class to finish requests (each starts with one) and for several RSS samples.
SOAK_SECONDS = int(os.environ.get("MRISEG_SOAK_SECONDS", "15"))


@pytest.mark.ray
def test_a_short_locust_soak_has_no_failures_and_stays_within_memory(serve_stack, tmp_path):
    upload = tmp_path / "volume.nii.gz"
    upload.write_bytes(nifti_bytes(shape=(40, 36, 44)))  # under the stack's 2 MiB upload limit
    s3_inputs = put_s3_inputs(make_client(serve_stack.extra["s3"]), BUCKET, upload.read_bytes())
    keys = {s: SITE_KEYS[s] for s in s3_inputs}
    res = soak(serve_stack.url, keys, cluster_pids, seconds=SOAK_SECONDS, uploads=[upload], workdir=tmp_path,
               users=3, interval_s=2.0, s3_inputs=s3_inputs)
    print(markdown(res, "CI smoke"))
    load = res["load"]
    assert load["requests"] > 0, load["stderr_tail"]
    assert load["failures"] == 0, load["failure_log"]
    assert {"upload (wait) roi", "bulk submit"} <= set(load["by_name"]) or \
        {"upload (wait) all", "bulk submit"} <= set(load["by_name"]), load["by_name"]
    for col in ("p50_ms", "p95_ms", "p99_ms", "requests_per_s"):  # the percentiles the load test reports
        assert load[col] not in ("", "N/A")
    assert load["returncode"] == 0, load["stderr_tail"]
    roles = {p["role"] for p in res["processes"]}
    assert {"router", "replica organs", "raylet"} <= roles, roles
    over = {p["role"]: p["peak_mb"] for p in res["processes"] if p["peak_mb"] > RSS_BOUND_MB}
    assert not over, over
