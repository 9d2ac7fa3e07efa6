"""Faults on a cluster of its own: a sub-model replica killed mid-request (six-GPU layout)."""

from __future__ import annotations

import time

import pytest

from tests.ray_fixtures import (SUBMODELS, _shared_stack_owner, auth, isolated_ray, nifti_bytes,  # noqa: F401
                                start_stack, tiny_models)
from tests.test_cluster_api import poll

pytestmark = pytest.mark.ray


def _stats(name):
    from ray import serve as rayserve

    return rayserve.get_deployment_handle(name, app_name="mriseg").stats.remote().result()


def test_replica_killed_mid_request_completes_or_fails_retryably(isolated_ray, tmp_path):
    import ray

    models = tiny_models(tmp_path / "models")
    stack = isolated_ray["stack"] = start_stack(
        tmp_path, models, num_gpus=6,
        submodel_options={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}, "max_ongoing_requests": 4},
        router={"max_upload_bytes": 16 << 20})

    # six-gpu layout: Ray gave every sub-model replica a GPU of its own
    gpu_ids = {n: tuple(_stats(n)["gpu_ids"]) for n in SUBMODELS}
    assert all(len(g) == 1 for g in gpu_ids.values())
    assert len(set(gpu_ids.values())) == 6

    victim = _stats("organs")
    with stack.client() as c:
        r = c.post("/v1/segmentations/upload", content=nifti_bytes(shape=(96, 96, 96), seed=4),
                   headers={**auth("site-a"), "content-type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while _stats("organs")["in_flight"] == 0:  # wait until organs is computing this job
            assert time.monotonic() < deadline, "organs never received the request"
            time.sleep(0.05)
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        job = poll(c, "site-a", job_id)

    print("outcome:", job["status"], job["error"], job["submodels"].get("organs"))
    assert job["status"] in ("succeeded", "failed"), job  # settled, never dropped
    if job["status"] == "failed":
        assert job["error"]["status"] == 503 and job["error"]["retryable"], job["error"]
    else:
        # the router re-sent the call to the replacement replica
        assert job["submodels"]["organs"]["attempts"] == 2
        assert job["submodels"]["organs"]["pid"] != victim["pid"]
    assert _stats("organs")["pid"] != victim["pid"]  # Serve replaced the replica
