"""S3 faults under a real local Ray cluster: S3 answering errors for a while, and the S3 server
stopped for 10 s mid-job. Jobs read their input from and write their outputs to SeaweedFS
(through :class:`tests.helpers.faultproxy.S3FaultProxy`); each must settle with one set of outputs."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlparse

import pytest

from serve.storage import staging
from serve.storage.embedded_s3 import SeaweedServer
from tests.helpers.faultproxy import S3FaultProxy
from tests.helpers.stack import BUCKET, auth, nifti_bytes, settle_through_restarts, start_stack, tiny_models

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def _keys(server: SeaweedServer, prefix: str) -> list[str]:
    got = server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix):] for o in got)


def _submit(c, n: int) -> str:
    r = c.post("/v1/segmentations", json={"input": f"s3://{BUCKET}/site-a/in/{n}.nii.gz", "roi_subset": ["liver"],
                                          "output_prefix": f"s3://{BUCKET}/site-a/out/{n}/"},
               headers=auth("site-a"))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _check_outputs(server: SeaweedServer, n: int, job: dict) -> None:
    assert job["status"] == "succeeded", job
    # staging's output layout (mriseg.json's content goes into job.json)
    assert _keys(server, f"site-a/out/{n}/") == ["job.json", "preview.png", "segmentation.nii.gz", "statistics.json"]
    done = json.loads(server.client().get_object(Bucket=BUCKET, Key=f"site-a/out/{n}/job.json")["Body"].read())
    assert done["status"] == "succeeded"


def test_jobs_succeed_through_s3_errors_and_a_10s_outage_mid_job(isolated_ray, tmp_path):
    server = SeaweedServer(tmp_path / "weed", buckets=[BUCKET]).start()
    try:
        for n in range(3):
            server.client().put_object(Bucket=BUCKET, Key=f"site-a/in/{n}.nii.gz", Body=nifti_bytes(seed=70 + n))
        upstream = urlparse(server.settings.endpoint_url).port
        with S3FaultProxy(upstream) as proxy:
            s3 = {**server.settings.model_dump(), "endpoint_url": proxy.endpoint_url}
            stack = isolated_ray["stack"] = start_stack(
                tmp_path, tiny_models(tmp_path / "models", names=("organs",)), num_gpus=1, submodels=("organs",),
                submodel_options={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5}}, s3=s3)
            with stack.client() as c:
                # 1. S3 throttles (503 SlowDown) for 4 s, then answers 500s for 2 s, from before the job starts.
                proxy.mode = "error"
                first = _submit(c, 0)
                time.sleep(4)
                proxy.mode = "500"
                time.sleep(2)
                proxy.mode = "pass"
                job0 = settle_through_restarts(c, "site-a", first)
                assert proxy.injected >= 3, proxy.injected  # the job really met the errors
                _check_outputs(server, 0, job0)

                # 2. The S3 server itself stops for 10 s while a job runs, then comes back with its data.
                second = _submit(c, 1)
                restarted = threading.Event()

                def outage() -> None:
                    server.stop()
                    time.sleep(10)
                    server.start()
                    restarted.set()

                deadline = time.monotonic() + 60
                while c.get(f"/v1/segmentations/{second}", headers=auth("site-a")).json()["status"] == "queued":
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                t = threading.Thread(target=outage, daemon=True)
                t.start()
                third = _submit(c, 2)  # accepted during the outage
                job1 = settle_through_restarts(c, "site-a", second)
                job2 = settle_through_restarts(c, "site-a", third)
                t.join(60)
                assert restarted.is_set()
            print("outcomes:", [(j["status"], j["error"], j["timings"].get("stage_in_s")) for j in (job0, job1, job2)])
            _check_outputs(server, 1, job1)
            _check_outputs(server, 2, job2)
            # inputs were not touched
            for n in range(3):
                assert staging.download_bytes(f"s3://{BUCKET}/site-a/in/{n}.nii.gz", settings=server.settings)
    finally:
        server.stop()
        server.cleanup()
