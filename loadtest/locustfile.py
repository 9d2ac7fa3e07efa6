"""Locust load test of the mriseg HTTP API (headless).

A mix of interactive single requests (upload, wait for the result) and bulk
submissions of volumes already in S3 (submit, poll until done), from several
sites with their own API keys, with a variety of ``roi_subset``s.

    MRISEG_LT_KEYS="site-a=KEY_A,site-b=KEY_B" \\
    MRISEG_LT_S3_INPUTS="site-a=s3://bucket/site-a/x.nii.gz,site-b=s3://bucket/site-b/y.nii.gz" \\
    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 10m --host http://127.0.0.1:8000 \\
           --csv loadtest/results/locust

Locust's ``--csv`` files carry the p50/p95/p99 latencies, requests/s and
failures per request type; the bulk jobs appear as ``bulk job (submit to
done)``, measured from submission to the job's final state.

Environment:
  MRISEG_LT_KEYS       site=key pairs (required)
  MRISEG_LT_UPLOAD     NIfTI file(s) to upload, comma-separated (default: a synthetic 60x48x20 @ 3 mm volume)
  MRISEG_LT_S3_INPUTS  site=s3://... pairs; without it only interactive uploads run
  MRISEG_LT_POLL_S     poll interval of bulk jobs (default 1)
  MRISEG_LT_JOB_TIMEOUT_S  give up on a job after this long (default 1800; counts as a failure)
"""

from __future__ import annotations

import io
import os
import random
import time

from locust import HttpUser, between, events, task

# None = all 80 structures; the others touch one, two or three sub-models
ROI_SETS: list[list[str] | None] = [
    None,
    ["liver", "spleen"],
    ["kidney_left", "kidney_right", "femur_left"],
    ["subcutaneous_fat", "skeletal_muscle"],
    ["brain", "face"],
    ["tibia", "quadriceps_femoris_left", "aorta"],
]


def _pairs(value: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (v.strip() for v in value.split(","))):
        site, _, rest = item.partition("=")
        out.setdefault(site.strip(), [])
        out[site.strip()].append(rest.strip())
    return out


KEYS = {s: v[0] for s, v in _pairs(os.environ.get("MRISEG_LT_KEYS", "")).items()}
S3_INPUTS = _pairs(os.environ.get("MRISEG_LT_S3_INPUTS", ""))
POLL_S = float(os.environ.get("MRISEG_LT_POLL_S", "1"))
JOB_TIMEOUT_S = float(os.environ.get("MRISEG_LT_JOB_TIMEOUT_S", "1800"))


def _upload_bodies() -> list[tuple[str, bytes]]:
    paths = [p for p in os.environ.get("MRISEG_LT_UPLOAD", "").split(",") if p]
    if paths:
        return [(os.path.basename(p), open(p, "rb").read()) for p in paths]
    import gzip

    import nibabel as nib

    from loadtest.inputs import TINY, make_volume

    data, affine = make_volume(TINY, seed=7)
    raw = io.BytesIO()
    img = nib.Nifti1Image(data, affine)
    img.to_file_map({"image": nib.FileHolder(fileobj=raw), "header": nib.FileHolder(fileobj=raw)})
    return [("volume.nii.gz", gzip.compress(raw.getvalue(), compresslevel=1))]


UPLOADS = _upload_bodies()


@events.test_start.add_listener
def _check_config(environment, **_kw):
    if not KEYS:
        raise SystemExit("set MRISEG_LT_KEYS='site-a=KEY,...' (the sites' API keys)")


class _Site(HttpUser):
    abstract = True

    def on_start(self) -> None:
        self.site = random.choice(sorted(KEYS))
        self.client.headers["Authorization"] = f"Bearer {KEYS[self.site]}"


class InteractiveUser(_Site):
    """A radiologist's tool: upload one volume and wait for the segmentation."""

    weight = 3
    wait_time = between(0.5, 2)

    @task
    def upload_and_wait(self) -> None:
        name, body = random.choice(UPLOADS)
        roi = random.choice(ROI_SETS)
        params = {"wait": "true", "filename": name, "outputs": "multilabel"}
        if roi:
            params["roi_subset"] = ",".join(roi)
        with self.client.post("/v1/segmentations/upload", params=params, data=body,
                              headers={"Content-Type": "application/octet-stream"},
                              name="upload (wait)" + (" roi" if roi else " all"), catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif r.json().get("status") != "succeeded":
                r.failure(f"job ended {r.json().get('status')}")
            else:
                r.success()


if S3_INPUTS:
    class BulkUser(_Site):
        """A site's pipeline: submit volumes already in its S3 prefix, poll until each is done."""

        weight = 1
        wait_time = between(1, 3)

        def on_start(self) -> None:
            sites = [s for s in S3_INPUTS if s in KEYS]
            if not sites:
                raise SystemExit("MRISEG_LT_S3_INPUTS names no site that MRISEG_LT_KEYS has a key for")
            self.site = random.choice(sites)
            self.client.headers["Authorization"] = f"Bearer {KEYS[self.site]}"

        @task
        def submit_and_poll(self) -> None:
            body = {"input": random.choice(S3_INPUTS[self.site]), "outputs": ["multilabel"]}
            roi = random.choice(ROI_SETS)
            if roi:
                body["roi_subset"] = roi
            t0 = time.perf_counter()
            with self.client.post("/v1/segmentations", json=body, name="bulk submit", catch_response=True) as r:
                if r.status_code != 202:
                    r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                job_id = r.json()["id"]
            status, exc = "timeout", None
            while time.perf_counter() - t0 < JOB_TIMEOUT_S:
                time.sleep(POLL_S)
                with self.client.get(f"/v1/segmentations/{job_id}", name="bulk poll", catch_response=True) as g:
                    if g.status_code != 200:
                        g.failure(f"HTTP {g.status_code}")
                        status = f"poll HTTP {g.status_code}"
                        break
                    status = g.json().get("status")
                    if status in ("succeeded", "failed", "cancelled"):
                        break
            if status != "succeeded":
                exc = RuntimeError(f"bulk job ended {status}")
            events.request.fire(request_type="JOB", name="bulk job (submit to done)",
                                response_time=(time.perf_counter() - t0) * 1000, response_length=0,
                                exception=exc, context={})
