"""S3 event intake inside the Ray cluster: the EventIntake deployment polls SQS (moto_server's real
S3 -> SQS notifications) and takes pushed events at POST /v1/events; it hands each job to the Router by
Ray handle, naming the job's site, and holds no site's API key."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from serve.jobs.sqs import configure_notifications, create_queue_with_dlq
from tests.helpers.stack import auth, nifti_bytes, start_stack, tiny_models

pytestmark = [pytest.mark.s3, pytest.mark.timeout(900)]

ROI = ["liver"]


def wait_job_json(s3, bucket: str, key: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            doc = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            if doc.get("status") in ("succeeded", "failed"):
                return doc
        except s3.exceptions.NoSuchKey:
            pass
        time.sleep(1)
    raise AssertionError(f"no settled job.json at s3://{bucket}/{key} after {timeout}s")


def records(bucket: str, key: str, etag: str) -> dict:
    return {"Records": [{"eventName": "ObjectCreated:Put", "eventSource": "minio:s3",
                         "s3": {"bucket": {"name": bucket}, "object": {"key": key, "eTag": etag}}}]}


def test_event_intake_polls_sqs_takes_pushed_events_and_survives_a_replica_kill(moto, isolated_ray,
                                                                                 tmp_path):
    import ray
    from ray import serve as rayserve

    tag = uuid.uuid4().hex[:8]
    s3, sqs = moto.client(), moto.sqs()
    inbox, outbox, jobs = f"inbox-{tag}", f"outbox-{tag}", f"jobs-{tag}"
    for b in (inbox, outbox, jobs):
        s3.create_bucket(Bucket=b)
    queue_url, dlq_url = create_queue_with_dlq(sqs, f"intake-{tag}", max_receives=3, visibility_timeout_s=60)
    configure_notifications(s3, sqs, inbox, queue_url, ["site-a/in/"])
    rule = {"bucket": inbox, "site": "site-a", "output_root": f"s3://{outbox}/results", "roi_subset": ROI,
            "outputs": ["multilabel", "statistics"]}
    models = tiny_models(tmp_path / "models", names=("organs",), description="DEMO MODEL - not for clinical use")
    # the rules' inboxes and outputs lie inside site-a's prefixes, as the router checks at start
    stack = start_stack(tmp_path, models, num_gpus=0, submodels=("organs",),
                        submodel_options={"ray_actor_options": {"num_cpus": 0.5}},
                        tenant_prefixes={"site-a": [f"s3://{inbox}/site-a/", f"s3://{outbox}/results/site-a/"]},
                        s3=moto.settings.model_dump(), events={
                            "jobs": f"s3://{jobs}/records",
                            "rules": [{**rule, "prefix": "site-a/in/"}, {**rule, "prefix": "site-a/push/"}],
                            "queue_url": queue_url, "dlq_url": dlq_url,
                            "sqs_options": {"wait_time_s": 1, "heartbeat_s": 5, "visibility_timeout_s": 60}})
    isolated_ray["stack"] = stack
    data = nifti_bytes(shape=(24, 22, 20), seed=3)
    base = stack.url

    # 1. polled: an upload into the notified inbox is segmented by the in-cluster consumer
    s3.put_object(Bucket=inbox, Key="site-a/in/case 1.nii.gz", Body=data)
    doc = wait_job_json(s3, outbox, "results/site-a/case 1/job.json")
    assert doc["status"] == "succeeded", doc
    assert doc["demo_models"] is True  # this stack runs demo models: the output set must say so
    assert s3.head_object(Bucket=outbox, Key="results/site-a/case 1/segmentation.nii.gz")["ContentLength"] > 0

    # 2. pushed: a MinIO-style Records[] body for an object in a push-only inbox
    etag = s3.put_object(Bucket=inbox, Key="site-a/push/case2.nii.gz", Body=data)["ETag"].strip('"')
    body = records(inbox, "site-a/push/case2.nii.gz", etag)
    with httpx.Client(base_url=base, timeout=60) as c:
        assert c.post("/v1/events", json=body).status_code == 401               # no key
        r = c.post("/v1/events", json=body, headers=auth("site-b"))             # another site's inbox
        assert r.status_code == 202 and r.json()["accepted"] == 0 and r.json()["ignored"] == 1, r.text
        bad = c.post("/v1/events", content=b'{"not": "an event"}', headers=auth("site-a"))
        assert bad.status_code == 400 and "Records" in bad.json()["detail"], bad.text
        r = c.post("/v1/events", json=body, headers=auth("site-a"))
        assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
        assert r.json()["jobs"][0]["output_prefix"] == f"s3://{outbox}/results/site-a/case2/"
    doc = wait_job_json(s3, outbox, "results/site-a/case2/job.json")
    assert doc["status"] == "succeeded", doc
    # EventBridge's shape for the same object: already done, so no second output set
    eb = {"detail-type": "Object Created", "source": "aws.s3",
          "detail": {"bucket": {"name": inbox}, "object": {"key": "site-a/push/case2.nii.gz", "etag": etag}}}
    with httpx.Client(base_url=base, timeout=60) as c:
        assert c.post("/v1/events", json=eb, headers=auth("site-a")).json()["accepted"] == 1

    # 3. the intake replica dies; Serve replaces it and the queue keeps being served
    # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<id>
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "#EventIntake#" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    s3.put_object(Bucket=inbox, Key="site-a/in/case3.nii.gz", Body=data)
    doc = wait_job_json(s3, outbox, "results/site-a/case3/job.json", timeout=300)
    assert doc["status"] == "succeeded", doc
    status = rayserve.status().applications["mriseg"].deployments["EventIntake"]
    assert str(getattr(status.status, "value", status.status)) == "HEALTHY"

    # every object has exactly one output set, and nothing is left in either queue
    def listing(prefix: str) -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=outbox, Prefix=prefix).get("Contents", []))

    for case in ("case 1", "case2", "case3"):
        assert listing(f"results/site-a/{case}/") == [f"results/site-a/{case}/{n}" for n in
                                                      ("job.json", "segmentation.nii.gz", "statistics.json")]
    assert listing("results/site-b/") == []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        a = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        if a["ApproximateNumberOfMessages"] == "0" and a["ApproximateNumberOfMessagesNotVisible"] == "0":
            break
        time.sleep(1)
    else:
        raise AssertionError(f"messages left in the queue: {a}")
