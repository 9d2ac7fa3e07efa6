"""Faults on real local Ray clusters: the router replica killed, a sub-model replica killed
mid-request, a worker node removed mid-request, the router's journal folder lost. Every
accepted job must settle, done or failed with a reason, and have one set of outputs."""

from __future__ import annotations

import time

import pytest

from tests.helpers.stack import SUBMODELS, auth, nifti_bytes, poll, settle_through_restarts, start_stack, tiny_models

pytestmark = pytest.mark.ray


def _stats(name):
    from ray import serve as rayserve

    return rayserve.get_deployment_handle(name, app_name="mriseg").stats.remote().result()


def _replicas(name) -> int:
    from ray import serve as rayserve

    d = rayserve.status().applications["mriseg"].deployments[name]
    return int(d.replica_states.get("RUNNING", 0))


def _serve_actors(fragment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and fragment in a["name"])


@pytest.mark.changes_shared_stack  # the killed router's sandbox work folders stay behind
def test_router_killed_with_jobs_in_flight_resumes_them(serve_stack):
    import ray

    results = serve_stack.tmp / "results"
    with serve_stack.client() as c:
        ids = []
        for seed in range(3):  # two slots: two jobs run, one waits
            r = c.post("/v1/segmentations/upload", params={"roi_subset": "liver,spleen"},
                       content=nifti_bytes(shape=(72, 72, 64), seed=40 + seed),  # under the 2 MiB upload cap
                       headers={**auth("site-a"), "content-type": "application/octet-stream"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 120
        while c.get(f"/v1/segmentations/{ids[0]}", headers=auth("site-a")).json()["status"] != "running":
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.1)
        before = c.get(f"/v1/segmentations/{ids[-1]}", headers=auth("site-a")).json()
        (victim,) = _serve_actors("#Router#")
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        jobs = [settle_through_restarts(c, "site-a", i) for i in ids]
        assert _serve_actors("#Router#") != [victim]  # Serve started a new router replica

    print("outcomes:", [(j["status"], j["resumed"], j["error"]) for j in jobs])
    assert before["status"] in ("queued", "running")
    for j in jobs:
        assert j["status"] == "succeeded", j  # each input was still at hand: resumed, not failed
        assert set(j["submodels"]) == {"organs"}
    assert sum(j["resumed"] for j in jobs) >= 2  # the two running jobs were charged the restart (a queued one is not)
    for i in ids:  # one set of outputs per job, nothing left spooled
        assert [p.name for p in (results / "site-a" / i).glob("segmentation*")] == ["segmentations.nii.gz"]
    assert not [p for p in (results / ".incoming").iterdir() if p.name.split(".")[0] in ids]


def test_a_request_on_a_removed_worker_node_is_retried_or_fails_retryably(isolated_ray, tmp_path):
    import ray

    models = tiny_models(tmp_path / "models", names=("organs",))
    # Two GPU worker nodes, one organs replica on each (a replica takes a whole GPU and one request).
    stack = isolated_ray["stack"] = start_stack(
        tmp_path, models, num_gpus=0, submodels=("organs",),
        worker_nodes=[{"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "num_gpus": 1}],
        submodel_options={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}, "max_ongoing_requests": 1,
                          "num_replicas": 2},
        router={"max_upload_bytes": 16 << 20})
    cluster = stack.extra["cluster"]
    placed = {}
    deadline = time.monotonic() + 60
    while len(placed) < 2:  # ask until both replicas have answered
        assert time.monotonic() < deadline, placed
        st = _stats("organs")
        placed[st["actor_name"]] = st["node_id"]
    worker_ids = {n.node_id: n for n in cluster.worker_nodes}
    assert set(placed.values()) == set(worker_ids)  # one replica on each worker, none on the head
    victim_node = worker_ids[sorted(placed.values())[0]]

    with stack.client() as c:
        ids = []
        for seed in range(2):  # one request per replica
            r = c.post("/v1/segmentations/upload", params={"roi_subset": "liver"},
                       content=nifti_bytes(shape=(128, 128, 96), seed=60 + seed),
                       headers={**auth("site-a"), "content-type": "application/octet-stream"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 120
        while not all("prepare_1.5mm_s" in c.get(f"/v1/segmentations/{i}", headers=auth("site-a")).json()["timings"]
                      for i in ids):  # both jobs have handed their volume to organs
            assert time.monotonic() < deadline, "the jobs never reached the sub-model"
            time.sleep(0.05)
        cluster.remove_node(victim_node, allow_graceful=False)
        jobs = [settle_through_restarts(c, "site-a", i) for i in ids]

    print("outcomes:", [(j["status"], j["submodels"].get("organs"), j["error"]) for j in jobs])
    hit = 0
    for j in jobs:
        assert j["status"] in ("succeeded", "failed"), j
        if j["status"] == "failed":
            assert j["error"]["status"] == 503 and j["error"]["retryable"], j["error"]
            hit += 1
        elif j["submodels"]["organs"]["attempts"] == 2:
            hit += 1
    assert hit >= 1  # the request on the removed node was retried or failed retryably, not lost
    for j in jobs:
        if j["status"] == "succeeded":
            assert len(list((tmp_path / "results" / "site-a" / j["id"]).glob("segmentations.nii.gz"))) == 1


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


def _router_state() -> tuple[str, dict[str, int]]:
    from ray import serve as rayserve

    d = rayserve.status().applications["mriseg"].deployments["Router"]
    replicas = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
    return str(getattr(d.status, "value", d.status)), replicas


def _router_actor() -> str:
    (name,) = _serve_actors("#Router#")
    return name


def test_router_whose_journal_is_lost_fails_its_health_check_and_is_replaced(isolated_ray, tmp_path):
    """Ingress.check_health probes the journal's folder: once the folder is gone, Serve marks the Router
    UNHEALTHY and replaces the replica, whose start makes the folder again; the stack serves again."""
    import shutil

    journal = tmp_path / "journal"
    models = tiny_models(tmp_path / "models", names=("organs",))
    stack = isolated_ray["stack"] = start_stack(
        tmp_path, models, num_gpus=0, submodels=("organs",),
        submodel_options={"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 4},
        router={"journal_dir": str(journal)},
        # checked every second; the timeout leaves room for a loaded 2-core machine
        router_options={"health_check_period_s": 1, "health_check_timeout_s": 10})
    assert _router_state() == ("HEALTHY", {"RUNNING": 1})
    before = _router_actor()
    time.sleep(3)  # a few periods of health checks on an intact journal: the replica stays
    assert _router_state()[0] == "HEALTHY" and _router_actor() == before

    shutil.rmtree(journal)
    seen, deadline = set(), time.monotonic() + 60
    while "UNHEALTHY" not in seen:
        assert time.monotonic() < deadline, f"the Router stayed {seen} with its journal folder gone"
        seen.add(_router_state()[0])
        time.sleep(0.1)

    deadline = time.monotonic() + 180
    while True:  # Serve stops the failing replica and starts another, which makes the journal folder again
        state, replicas = _router_state()
        names = _serve_actors("#Router#")
        if state == "HEALTHY" and replicas == {"RUNNING": 1} and len(names) == 1 and names != [before]:
            break
        assert time.monotonic() < deadline, f"the Router was not replaced: {state} {replicas} {names}"
        time.sleep(0.5)
    assert journal.is_dir()
    with stack.client() as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/segmentations/upload", params={"wait": "true", "roi_subset": "liver"},
                   content=nifti_bytes(seed=2),
                   headers={**auth("site-a"), "content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
    assert list(journal.glob("*.json")), "the replacement journals its jobs in the folder again"
