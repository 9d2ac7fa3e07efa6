"""The hostile-input corpus and hostile S3 keys through the real API on the shared stack: every
input gets a 4xx with a message (never a 5xx), the router's memory stays bounded, and the next
ordinary request is served normally."""

from __future__ import annotations

import concurrent.futures

import pytest

from loadtest.flood import DiskPeak, destructive_inputs
from loadtest.localcluster import cluster_pids
from loadtest.soak import role
from serve.storage.s3client import make_client
from tests.helpers.hostile_corpus import corpus
from tests.helpers.stack import BUCKET, auth, nifti_bytes, poll

pytestmark = pytest.mark.ray
UPLOAD_LIMIT = 2 << 20  # the shared stack's max_upload_bytes
ROUTER_GROWTH_BOUND_MB = 300


def _router_rss_mb() -> float:
    import psutil

    return max(psutil.Process(p).memory_info().rss / 2**20 for p in cluster_pids() if role(p) == "router")


def test_hostile_uploads_get_4xx_and_the_router_keeps_serving(serve_stack):
    entries = corpus()
    assert len(entries) >= 20
    before = _router_rss_mb()
    outcomes = {}
    with serve_stack.client() as c:
        def send(e) -> tuple[int, str]:
            r = c.post("/v1/segmentations/upload", params={"filename": e.filename, "roi_subset": "liver"},
                       content=e.data, headers={**auth("site-a"), "content-type": "application/octet-stream"})
            if r.status_code == 202:  # accepted: the decoder's verdict arrives on the job
                job = poll(c, "site-a", r.json()["id"], timeout=120)
                assert job["status"] == "failed", (e.name, job)
                return job["error"]["status"], job["error"]["detail"]
            assert r.headers["content-type"].startswith("application/problem+json"), (e.name, r.text)
            return r.status_code, r.json()["detail"]

        # four in flight (site-a may hold 12 jobs): each decode is a child process of about half a second
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for e, (status, detail) in zip(entries, pool.map(send, entries)):
                outcomes[e.name] = (status, detail)
                expected = (413,) if len(e.data) > UPLOAD_LIMIT else (400,) if not e.data else e.statuses
                assert status in expected, (e.name, status, detail)
                assert detail and "Traceback" not in detail, (e.name, detail)
        # the next ordinary request is served normally
        ok = c.post("/v1/segmentations/upload", params={"wait": "true", "roi_subset": "liver"},
                    content=nifti_bytes(seed=3), headers={**auth("site-a"), "content-type": "application/octet-stream"})
        assert ok.status_code == 200 and ok.json()["status"] == "succeeded", ok.text
    growth = _router_rss_mb() - before
    print(f"router RSS growth over the corpus: {growth:.0f} MB")
    for name, (status, detail) in sorted(outcomes.items()):
        print(f"  {name}: {status} {detail[:100]}")
    assert growth < ROUTER_GROWTH_BOUND_MB


def test_hostile_s3_uris_are_refused_and_odd_but_valid_keys_segmented(serve_stack):
    s3 = make_client(serve_stack.extra["s3"])
    unicode_key = "site-a/in/ünïcødé 名前 #1?.nii.gz"
    s3.put_object(Bucket=BUCKET, Key=unicode_key, Body=nifti_bytes(seed=5))
    with serve_stack.client() as c:
        def post(uri: str):
            return c.post("/v1/segmentations", json={"input": uri, "roi_subset": ["liver"]}, headers=auth("site-a"))

        # '..' cannot climb into another site's prefix
        assert post(f"s3://{BUCKET}/site-a/../site-b/x.nii.gz").status_code == 403
        assert post(f"s3://{BUCKET}/site-a/./x.nii.gz").status_code == 403
        # over S3's 1024-byte key limit, control characters, a bucket name that is not one, another scheme
        for uri in (f"s3://{BUCKET}/site-a/{'é' * 600}.nii.gz", f"s3://{BUCKET}/site-a/x\x00.nii.gz",
                    "s3://[::1]/site-a/x.nii.gz", "http://169.254.169.254/latest/meta-data",
                    f"s3://{BUCKET}@evil.example/site-a/x.nii.gz"):
            r = post(uri)
            assert r.status_code in (400, 403, 422), (uri, r.status_code, r.text)
        # over the schema's 2048 characters
        assert post(f"s3://{BUCKET}/site-a/" + "x" * 2100).status_code == 422
        # a missing object: accepted, then failed with a 404 reason
        missing = post(f"s3://{BUCKET}/site-a/in/not-there.nii.gz")
        assert missing.status_code == 202
        job = poll(c, "site-a", missing.json()["id"], timeout=120)
        assert job["status"] == "failed" and job["error"]["status"] == 404, job
        # a unicode key with '#' and '?' is an ordinary object: segmented
        r = post(f"s3://{BUCKET}/{unicode_key}")
        assert r.status_code == 202, r.text
        assert poll(c, "site-a", r.json()["id"], timeout=120)["status"] == "succeeded"


# -- issue #33: a site's bytes reach nothing of the router, another site, or its memory and disk ---------

def _router_pid() -> int:
    (pid,) = [p for p in cluster_pids() if role(p) == "router"]
    return pid


def test_issue_33_findings_stay_with_the_sender(serve_stack):
    """Each finding through the real API: a 4xx for that job, the same router process alive, router memory
    and scratch disk bounded, and another site's job succeeding right after."""
    payloads = destructive_inputs(full=False)
    router, before = _router_pid(), _router_rss_mb()
    scratch = serve_stack.tmp / "scratch"
    with serve_stack.client() as c:
        for name, filename, data, statuses in payloads:
            assert len(data) < UPLOAD_LIMIT, (name, len(data))
            with DiskPeak(scratch) as disk:
                r = c.post("/v1/segmentations/upload", params={"filename": filename, "roi_subset": "liver"},
                           content=data, headers={**auth("site-a"), "content-type": "application/octet-stream"})
                assert r.status_code == 202, (name, r.text)
                job = poll(c, "site-a", r.json()["id"], timeout=120)
            assert job["status"] == "failed", (name, job)
            status, detail = job["error"]["status"], job["error"]["detail"]
            assert status in statuses, (name, status, detail)
            assert "root:" not in detail and "Traceback" not in detail, (name, detail)
            print(f"  {name}: {status} {detail[:120]} (scratch peak {disk.peak >> 20} MiB)")
            assert disk.peak < 100 << 20, (name, disk.peak)
            assert _router_pid() == router, f"{name}: the router process changed"
            other = c.post("/v1/segmentations/upload", params={"wait": "true", "roi_subset": "liver"},
                           content=nifti_bytes(seed=7), headers={**auth("site-b"),
                                                                 "content-type": "application/octet-stream"})
            assert other.status_code == 200 and other.json()["status"] == "succeeded", (name, other.text)
    growth = _router_rss_mb() - before
    print(f"router RSS growth over the issue-33 payloads: {growth:.0f} MB")
    assert growth < ROUTER_GROWTH_BOUND_MB
    assert not list(scratch.iterdir()), "decoder work folders were left behind"
