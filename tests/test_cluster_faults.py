"""On a cluster of its own (six-GPU layout): scale from zero, a sub-model replica killed mid-request."""

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


def _replicas(name) -> int:
    from ray import serve as rayserve

    d = rayserve.status().applications["mriseg"].deployments[name]
    return int(d.replica_states.get("RUNNING", 0))


def test_replica_killed_mid_request_completes_or_fails_retryably(isolated_ray, tmp_path):
    import ray

    models = tiny_models(tmp_path / "models")
    # six-gpu.yaml's shape: one GPU per replica, face scales from zero
    stack = isolated_ray["stack"] = start_stack(
        tmp_path, models, num_gpus=6,
        submodel_options={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}, "max_ongoing_requests": 4},
        per_model={"face": {"autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                                                   "target_ongoing_requests": 1, "upscale_delay_s": 0,
                                                   "downscale_delay_s": 600}}},
        router={"max_upload_bytes": 16 << 20})

    with stack.client() as c:
        # ready although face has no replica: it may scale from zero
        assert _replicas("face") == 0
        assert c.get("/readyz").status_code == 200
        subs = {m["name"]: m for m in c.get("/v1/structures", headers=auth("site-b")).json()["submodels"]}
        assert subs["face"]["state"] == "cold" and subs["organs"]["state"] == "ready"
        assert _replicas("face") == 0  # asking for the catalogue did not wake it
        r = c.post("/v1/segmentations/upload", params={"wait": "true", "roi_subset": "face"},
                   content=nifti_bytes(seed=1), headers={**auth("site-b"), "content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert set(r.json()["submodels"]) == {"face"}
        assert _replicas("face") == 1

    # Ray gave every sub-model replica a GPU of its own
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
