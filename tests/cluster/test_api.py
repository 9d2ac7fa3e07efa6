"""The Serve app on a real local Ray cluster (shared per session): composition, tenancy, errors."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest

from tests.helpers.stack import SUBMODELS, auth, nifti_bytes, poll, wait_for_series

pytestmark = pytest.mark.ray

RAW = {"content-type": "application/octet-stream"}


def upload(client, site, data=None, wait=True, **params):
    params = {"wait": str(wait).lower(), **{k: v for k, v in params.items() if v is not None}}
    return client.post("/v1/segmentations/upload", params=params, content=data or nifti_bytes(),
                       headers={**auth(site), **RAW})


def result_labels(client, site, job_id) -> np.ndarray:
    r = client.get(f"/v1/segmentations/{job_id}/result", headers=auth(site))
    assert r.status_code == 200, r.text
    img = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
    return np.asarray(img.dataobj)


def submodel_calls(name: str) -> int:
    from ray import serve as rayserve

    return rayserve.get_deployment_handle(name, app_name="mriseg").stats.remote().result()["calls"]


def test_one_request_runs_all_six_concurrently_on_one_packed_gpu(serve_stack):
    import ray

    with serve_stack.client() as c:
        r = upload(c, "site-a")
        assert r.status_code == 200, r.text
        job = r.json()
    assert set(job["submodels"]) == set(SUBMODELS)
    windows = job["submodels"].values()
    # execution windows overlap: every sub-model started before any finished
    assert max(w["started"] for w in windows) < min(w["finished"] for w in windows)
    assert len({w["pid"] for w in windows}) == 6
    # Ray placed all six 0.16-GPU replicas on the single declared GPU
    assert all(w["gpu_ids"] == ["0"] for w in windows)
    assert ray.cluster_resources()["GPU"] == 1
    assert ray.available_resources().get("GPU", 0) == pytest.approx(1 - 6 * 0.16, abs=1e-3)
    for stage in ("decode_s", "prepare_1.5mm_s", "submodels_s", "merge_restore_s", "write_s", "total_s"):
        assert stage in job["timings"]


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (1.2, 1.4, 2.0)])
def test_merged_output_equals_in_process_segmenter(serve_stack, spacing):
    from serve.inference.modelstore import ModelStore
    from serve.inference.pipeline import Segmenter
    from serve.imaging.volume_io import read_volume_bytes

    data = nifti_bytes(shape=(36, 40, 30), spacing=spacing, seed=3)
    with serve_stack.client() as c:
        r = upload(c, "site-a", data)
        assert r.status_code == 200, r.text
        served = result_labels(c, "site-a", r.json()["id"])
    seg = Segmenter(ModelStore([serve_stack.model_dir]), device="cpu", threads=1)
    local = seg.segment(read_volume_bytes(data, "x.nii.gz"))
    assert served.shape == local.labels.shape
    np.testing.assert_array_equal(served, local.labels)
    assert local.labels.any()  # random-init models still label something, so equality is not vacuous


def int16_nifti_bytes(shape=(30, 28, 24), spacing=(1.2, 1.4, 2.0), seed: int = 5) -> bytes:
    """nifti_bytes' blob stored as int16, as MR scanners (and dcm2niix) write: an integer-valued input."""
    img = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(shape=shape, spacing=spacing, seed=seed)))
    out = nib.Nifti1Image(np.round(img.get_fdata()).astype(np.int16), img.affine)
    return gzip.compress(out.to_bytes(), compresslevel=1)


@pytest.mark.parametrize("order", [None, 3])
def test_the_resampling_order_reaches_the_router_and_is_recorded(serve_stack, order):
    """Resampled as asked (TotalSegmentator's -ro; its 1 when not asked): the served labels equal the in-process
    Segmenter's at that order, and the job and its mriseg.json say which order, and that the int16 input got the
    int32 cast."""
    from serve.inference.modelstore import ModelStore
    from serve.inference.pipeline import Segmenter
    from serve.imaging.volume_io import read_volume_bytes

    data = int16_nifti_bytes()
    want = 1 if order is None else order
    with serve_stack.client() as c:
        r = upload(c, "site-a", data, roi_subset="subcutaneous_fat,torso_fat,liver", resampling_order=order)
        assert r.status_code == 200, r.text
        job = r.json()
        served = result_labels(c, "site-a", job["id"])
        meta = c.get(f"/v1/segmentations/{job['id']}/files/mriseg.json", headers=auth("site-a")).json()
    assert job["options"]["resampling_order"] == want and job["input_cast"] == "int32"
    assert (meta["resampling_order"], meta["input_cast"]) == (want, "int32")
    seg = Segmenter(ModelStore([serve_stack.model_dir]), device="cpu", threads=1)
    local = seg.segment(read_volume_bytes(data, "x.nii.gz"), ["subcutaneous_fat", "torso_fat", "liver"],
                        resampling_order=want)
    np.testing.assert_array_equal(served, local.labels)
    other = seg.segment(read_volume_bytes(data, "x.nii.gz"), ["subcutaneous_fat", "torso_fat", "liver"],
                        resampling_order=3 if want == 1 else 1)
    assert not np.array_equal(other.labels, local.labels)  # the order shows in the labels: the check can fail


@pytest.mark.parametrize("value", [6, -1, True, 1.5, "3"])
def test_a_resampling_order_outside_0_to_5_is_refused_before_anything_runs(serve_stack, value):
    with serve_stack.client() as c:
        body = _problem(c.post("/v1/segmentations", json={"input": "s3://consortium/site-a/x.nii.gz",
                                                          "resampling_order": value}, headers=auth("site-a")), 422)
        assert body["errors"][0]["loc"][-1] == "resampling_order"
        if not isinstance(value, bool) and value not in (1.5, "3"):
            _problem(upload(c, "site-a", resampling_order=value), 422)


@pytest.mark.s3
def test_an_event_jobs_resampling_order_reaches_the_router(serve_stack):
    """The intake's engine hands the job's -ro to the router by Ray handle: the published labels are the
    in-process Segmenter's at that order, and job.json records it with the int16 input's int32 cast."""
    from serve.storage import staging
    from serve.cluster.router_engine import RouterEngine
    from serve.jobs.runner import JobRunner
    from serve.jobs.spec import JobSpec
    from serve.jobs.store import JobStore
    from serve.inference.modelstore import ModelStore
    from serve.inference.pipeline import Segmenter
    from serve.imaging.volume_io import read_volume_bytes

    s3 = serve_stack.extra["s3"]
    data = int16_nifti_bytes(seed=33)
    staging.put_bytes(data, "s3://consortium/site-a/inbox/case-33.nii.gz", s3)
    runner = JobRunner(JobStore("s3://consortium/mriseg-jobs/", s3), RouterEngine(app_name=serve_stack.app_name), s3)
    roi = ("liver", "subcutaneous_fat")
    out = runner.run(JobSpec("s3://consortium/site-a/inbox/case-33.nii.gz", "s3://consortium/site-a/results",
                             site="site-a", roi_subset=roi, input_prefix="site-a/inbox/", resampling_order=3))
    assert out.state == "succeeded" and out.computed, out.error
    doc = json.loads(staging.download_bytes(out.output_prefix + "job.json", settings=s3))
    assert doc["options"]["resampling_order"] == 3 and doc["input_cast"] == "int32"
    got = staging.download_bytes(out.output_prefix + "segmentation.nii.gz", settings=s3)
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(got)).dataobj)
    seg = Segmenter(ModelStore([serve_stack.model_dir]), device="cpu", threads=1)
    np.testing.assert_array_equal(labels, seg.segment(read_volume_bytes(data, "x.nii.gz"), list(roi),
                                                      resampling_order=3).labels)


def test_roi_subset_calls_only_the_needed_deployments(serve_stack):
    from serve.catalogue import load_catalogue

    cat = load_catalogue()
    roi = ["liver", cat.submodel("face").labels[0]]
    needed = {cat.owner(n).name for n in roi}
    assert len(needed) == 2
    before = {n: submodel_calls(n) for n in SUBMODELS}
    with serve_stack.client() as c:
        r = upload(c, "site-b", roi_subset=",".join(roi))
        assert r.status_code == 200, r.text
        job = r.json()
        labels = result_labels(c, "site-b", job["id"])
    after = {n: submodel_calls(n) for n in SUBMODELS}
    assert {n for n in SUBMODELS if after[n] != before[n]} == needed
    assert all(after[n] - before[n] == 1 for n in needed)
    assert set(job["submodels"]) == needed
    assert set(job["structures"].values()) == set(roi)
    allowed = {0} | {cat.structure_ids[n] for n in roi}
    assert set(np.unique(labels).tolist()) <= allowed


def test_twenty_concurrent_requests_from_two_sites_succeed_alike_and_private(serve_stack):
    data = nifti_bytes(shape=(32, 32, 32), seed=7)
    with serve_stack.client() as c:
        ref = upload(c, "site-a", data)
        assert ref.status_code == 200
        expected = result_labels(c, "site-a", ref.json()["id"])

        def one(i):
            site = "site-a" if i % 2 else "site-b"
            r = upload(c, site, data)
            return site, r

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(one, range(20)))
        for site, r in results:
            assert r.status_code == 200, r.text  # limit is 12 per site: none refused
            body = r.json()
            assert body["site"] == site and body["status"] == "succeeded"
            np.testing.assert_array_equal(result_labels(c, site, body["id"]), expected)
            other = "site-b" if site == "site-a" else "site-a"
            assert c.get(f"/v1/segmentations/{body['id']}", headers=auth(other)).status_code == 404


def test_site_b_starts_before_site_a_flood_drains(serve_stack):
    data = nifti_bytes(shape=(32, 32, 32), seed=11)
    with serve_stack.client() as c:
        flood = []
        for _ in range(10):
            r = upload(c, "site-a", data, wait=False)
            assert r.status_code == 202, r.text
            flood.append(r.json()["id"])
        r = upload(c, "site-b", data, wait=False)
        assert r.status_code == 202
        b = poll(c, "site-b", r.json()["id"])
        a = [poll(c, "site-a", j) for j in flood]
    assert b["status"] == "succeeded" and all(j["status"] == "succeeded" for j in a)
    # router slots: 2; with FIFO, B would start after all ten of A's
    assert b["start_seq"] < max(j["start_seq"] for j in a)
    assert sum(j["start_seq"] > b["start_seq"] for j in a) >= 5


def test_healthz_answers_while_the_router_is_busy(serve_stack):
    data = nifti_bytes(shape=(48, 48, 48), seed=5)
    with serve_stack.client() as c:
        ids = [upload(c, "site-b", data, wait=False).json()["id"] for _ in range(4)]
        statuses = []
        for _ in range(5):
            assert c.get("/healthz").json() == {"status": "ok"}
            statuses.append(c.get(f"/v1/segmentations/{ids[-1]}", headers=auth("site-b")).json()["status"])
        assert any(s in ("queued", "running") for s in statuses)  # the probes overlapped real work
        assert all(poll(c, "site-b", j)["status"] == "succeeded" for j in ids)


def test_structures_readyz_and_openapi_are_served_and_metrics_only_through_ray(serve_stack):
    with serve_stack.client() as c:
        s = c.get("/v1/structures", headers=auth("site-a")).json()
        assert len(s["structures"]) == 80
        avail = {m["name"]: m["state"] for m in s["submodels"]}
        assert all(avail[n] == "ready" for n in SUBMODELS)
        assert avail["total_fast"] == "unavailable"  # not deployed in this stack
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"]
        # the decoder sandbox's layers, as probed when the router started (all required on the test stack)
        assert ready.json()["sandbox"] == {"rlimits": True, "no_new_privs": True, "seccomp": True, "landlock": True}
        spec = c.get("/v1/openapi.json").json()
        assert {"/v1/segmentations", "/v1/segmentations/upload", "/v1/segmentations/{job_id}",
                "/v1/segmentations/{job_id}/result", "/v1/structures"} <= set(spec["paths"])
        assert c.get("/metrics", headers=auth("site-a")).status_code == 404  # not on the public API
        upload(c, "site-a")
    # the Router's metrics reach Prometheus through Ray's metrics agent, like every replica's (names ray_...)
    wait_for_series(serve_stack.extra["handle"].metrics_url,
                    [("ray_mriseg_volumes_total", {"site": "site-a"}),
                     ("ray_mriseg_submodel_call_seconds_bucket", {}),
                     ("ray_mriseg_stage_seconds_count", {"stage": "prepare_1.5mm"})])


# -- every error status, each provoked ----------------------------------------
def _problem(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_each_bad_request_gets_its_own_http_status_as_a_problem(serve_stack):
    with serve_stack.client() as c:
        ok = upload(c, "site-a")
        assert ok.status_code == 200
        done_id = ok.json()["id"]

        # 400: unknown structure, malformed S3 URI
        assert "not_an_organ" in _problem(upload(c, "site-a", roi_subset="liver,not_an_organ"), 400)["detail"]
        _problem(c.post("/v1/segmentations", json={"input": "http://evil.example/x.nii.gz"},
                        headers=auth("site-a")), 400)
        # 400: an empty structure list or output list (it used to fail later, as a 409 "install the weights")
        assert "names no structure" in _problem(upload(c, "site-a", roi_subset=" , "), 400)["detail"]
        _problem(c.post("/v1/segmentations", json={"input": "s3://consortium/site-a/x.nii.gz", "outputs": []},
                        headers=auth("site-a")), 400)
        assert "names no output" in _problem(upload(c, "site-a", outputs=""), 400)["detail"]  # not the default set
        # 401: no key, wrong key (also on the catalogue)
        _problem(c.get("/v1/structures"), 401)
        _problem(c.get("/v1/structures", headers={"X-API-Key": "nope-nope-nope-nope"}), 401)
        _problem(c.post("/v1/segmentations/upload", content=b"x", headers=RAW), 401)
        # auth comes before parsing: a malformed body from an unknown caller is still 401
        _problem(c.post("/v1/segmentations", content=b"{not json", headers={"content-type": "application/json"}), 401)
        _problem(c.get("/v1/segmentations/x/files/../../etc/passwd"), 401)
        # 403: another site's input or output prefix
        _problem(c.post("/v1/segmentations", json={"input": "s3://consortium/site-b/scan.nii.gz"},
                        headers=auth("site-a")), 403)
        _problem(upload(c, "site-a", output_prefix="s3://consortium/site-b/out/"), 403)
        # 404: unknown job, and another site's job
        _problem(c.get("/v1/segmentations/0123456789abcdef", headers=auth("site-a")), 404)
        _problem(c.get(f"/v1/segmentations/{done_id}", headers=auth("site-b")), 404)
        _problem(c.get(f"/v1/segmentations/{done_id}/result", headers=auth("site-b")), 404)
        _problem(c.delete(f"/v1/segmentations/{done_id}", headers=auth("site-b")), 404)
        # 409: cancelling a finished job; a sub-model not installed (fast mode's total_fast)
        _problem(c.delete(f"/v1/segmentations/{done_id}", headers=auth("site-a")), 409)
        _problem(upload(c, "site-a", fast="true"), 409)
        # 413: upload over the 2 MiB limit
        big = b"\0" * (3 << 20)
        _problem(c.post("/v1/segmentations/upload", content=big, headers={**auth("site-a"), **RAW}), 413)
        _problem(c.post("/v1/segmentations", content=b"{" + b" " * (100 << 10) + b"}",
                        headers={**auth("site-a"), "content-type": "application/json"}), 413)
        # 411: a chunked body (no Content-Length) where the limit must be checked before reading
        chunked_json = iter([b"{", b" " * (100 << 10), b"}"])
        _problem(c.post("/v1/segmentations", content=chunked_json,
                        headers={**auth("site-a"), "content-type": "application/json"}), 411)
        form = b"--b\r\ncontent-disposition: form-data; name=file; filename=x.nii\r\n\r\n" + big + b"\r\n--b--\r\n"
        _problem(c.post("/v1/segmentations/upload", content=iter([form]),
                        headers={**auth("site-a"), "content-type": "multipart/form-data; boundary=b"}), 411)
        # ...while a raw upload may stream in chunks, capped as it is read
        _problem(c.post("/v1/segmentations/upload", content=iter([big[:1 << 20]] * 3),
                        headers={**auth("site-a"), **RAW}), 413)
        # 415: wrong content type; a file type no reader handles
        _problem(c.post("/v1/segmentations/upload", content=b"hello",
                        headers={**auth("site-a"), "content-type": "text/plain"}), 415)
        _problem(upload(c, "site-a", nifti_bytes(), filename="scan.docx"), 415)
        # ...but ?filename= says what a browser's Blob part (named "blob") is
        blob = (b"--b\r\ncontent-disposition: form-data; name=file; filename=blob\r\n\r\n" + nifti_bytes()
                + b"\r\n--b--\r\n")
        named = c.post("/v1/segmentations/upload", params={"filename": "scan.nii.gz", "wait": "true"}, content=blob,
                       headers={**auth("site-a"), "content-type": "multipart/form-data; boundary=b"})
        assert named.status_code == 200 and named.json()["status"] == "succeeded", named.text
        # 422: corrupt NIfTI; a request body that breaks the schema
        corrupt = nifti_bytes()[:300]
        _problem(upload(c, "site-a", corrupt), 422)
        _problem(c.post("/v1/segmentations", json={"input": "s3://consortium/site-a/x.nii.gz", "colour": "red"},
                        headers=auth("site-a")), 422)
        # 429: site-c may have one job at a time
        slow = nifti_bytes(shape=(64, 64, 64), seed=9)
        first = upload(c, "site-c", slow, wait=False)
        assert first.status_code == 202
        refused = upload(c, "site-c", slow, wait=False)
        assert _problem(refused, 429)["retryable"] and refused.headers["retry-after"]
        assert poll(c, "site-c", first.json()["id"])["status"] == "succeeded"
        # 429: site-d may send 3 requests at once and 0.5 a second on average; other sites are not slowed
        for _ in range(3):
            _problem(c.get("/v1/segmentations/0123456789abcdef", headers=auth("site-d")), 404)
        limited = c.get("/v1/segmentations/0123456789abcdef", headers=auth("site-d"))
        assert "request rate" in _problem(limited, 429)["detail"] and int(limited.headers["retry-after"]) >= 1
        _problem(c.get("/v1/segmentations/0123456789abcdef", headers=auth("site-a")), 404)
        # 409: the result of a job that did not succeed
        cancelled = upload(c, "site-c", slow, wait=False).json()["id"]
        c.delete(f"/v1/segmentations/{cancelled}", headers=auth("site-c"))
        _problem(c.get(f"/v1/segmentations/{cancelled}/result", headers=auth("site-c")), 409)
        # 503: the result file is gone from the router (e.g. a replaced replica)
        assert poll(c, "site-c", cancelled)["status"] == "cancelled"
        # a cancelled job keeps its site's one slot until its worker thread returns (the decoder child is
        # killed at once, a resampling thread runs out): site-c may meet a short 429 first, as a client would
        deadline, r = time.monotonic() + 60, upload(c, "site-c")
        while r.status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.5)
            r = upload(c, "site-c")
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        gone = r.json()["id"]
        for f in (serve_stack.tmp / "results" / "site-c" / gone).glob("segmentations.nii.gz"):
            f.unlink()
        _problem(c.get(f"/v1/segmentations/{gone}/result", headers=auth("site-c")), 503)


def test_a_multipart_upload_is_accepted_and_its_result_fetched_later(serve_stack):
    with serve_stack.client() as c:
        files = {"file": ("case.nii.gz", io.BytesIO(nifti_bytes(seed=2)), "application/gzip")}
        r = c.post("/v1/segmentations/upload", files=files, headers=auth("site-b"))
        assert r.status_code == 202 and r.headers["location"].endswith(r.json()["id"])
        job = poll(c, "site-b", r.json()["id"])
        assert job["status"] == "succeeded"
        assert job["result_url"] == f"/v1/segmentations/{job['id']}/result"
        assert result_labels(c, "site-b", job["id"]).shape == (40, 36, 44)


@pytest.mark.s3
def test_an_s3_input_gets_s3_outputs_equal_to_the_upload_path(serve_stack):
    """Input staged from the site's S3 prefix; outputs in the S3 layout; equal to the upload path."""
    from serve.storage import staging

    s3 = serve_stack.extra["s3"]
    data = nifti_bytes(shape=(36, 32, 40), seed=21)
    staging.put_bytes(data, "s3://consortium/site-a/in/case-21.nii.gz", s3)
    with serve_stack.client() as c:
        r = c.post("/v1/segmentations", params={"wait": "true"}, headers=auth("site-a"),
                   json={"input": "s3://consortium/site-a/in/case-21.nii.gz", "roi_subset": ["liver", "spleen"],
                         "output_prefix": "s3://consortium/site-a/out/case-21/"})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["input"] == "s3://consortium/site-a/in/case-21.nii.gz"
        assert "stage_in_s" in job["timings"]
        uploaded = set(job["outputs"].values())
        assert "s3://consortium/site-a/out/case-21/segmentation.nii.gz" in uploaded
        assert "s3://consortium/site-a/out/case-21/statistics.json" in uploaded
        ref = upload(c, "site-a", data, roi_subset="liver,spleen")
        expected = result_labels(c, "site-a", ref.json()["id"])
        # a missing object is S3's 404, reported as the job's error
        missing = c.post("/v1/segmentations", params={"wait": "true"}, headers=auth("site-a"),
                         json={"input": "s3://consortium/site-a/in/nope.nii.gz"})
        _problem(missing, 404)
    got = staging.download_bytes("s3://consortium/site-a/out/case-21/segmentation.nii.gz", settings=s3)
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(got)).dataobj)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.s3
def test_durable_jobs_run_through_the_cluster_once(serve_stack):
    """serve.jobs.runner's runner with the intake's engine, which hands each job to the Router by Ray handle naming its
    site (no API key): outputs in S3, a resubmission does not recompute, a site the tenants lack is refused."""
    from serve.storage import staging
    from serve.cluster.router_engine import RouterEngine, RouterJobError
    from serve.jobs.runner import JobRunner
    from serve.jobs.spec import JobSpec
    from serve.jobs.store import JobStore

    s3 = serve_stack.extra["s3"]
    staging.put_bytes(nifti_bytes(shape=(32, 36, 32), seed=31), "s3://consortium/site-a/inbox/case-31.nii.gz", s3)
    engine = RouterEngine(app_name=serve_stack.app_name)
    assert engine.site_limits() == {"site-a": 12, "site-b": 12, "site-c": 1, "site-d": 1}
    with pytest.raises(RouterJobError, match="not in the tenants file") as refused:
        engine.model_checksums(["liver"], False, "site-z")
    assert refused.value.status == 403 and not refused.value.retryable
    runner = JobRunner(JobStore("s3://consortium/mriseg-jobs/", s3), engine, s3)
    spec = JobSpec("s3://consortium/site-a/inbox/case-31.nii.gz", "s3://consortium/site-a/results", site="site-a",
                   roi_subset=("liver", "spleen"), input_prefix="site-a/inbox/")
    first = runner.run(spec)
    assert first.state == "succeeded" and first.computed, first.error
    assert staging.object_exists(first.output_prefix + "segmentation.nii.gz", s3)
    assert staging.object_exists(first.output_prefix + "job.json", s3)
    again = runner.run(spec)
    assert again.state == "succeeded" and not again.computed and again.key == first.key
    assert engine.calls == 1
    # another resampling order is another job, run by the router at that order, recorded in its job.json
    ro3 = runner.run(dataclasses.replace(spec, resampling_order=3))
    assert ro3.state == "succeeded" and ro3.computed and ro3.key != first.key and engine.calls == 2, ro3.error
    doc = json.loads(staging.download_bytes(ro3.output_prefix + "job.json", settings=s3))
    assert doc["options"]["resampling_order"] == 3 and doc["input_cast"] == "none"  # float32, already at 1.5 mm
    # a job naming site-b but reading site-a's object (a forged record, say): the router refuses to run it
    theirs = JobSpec("s3://consortium/site-a/inbox/case-31.nii.gz", "s3://consortium/site-b/results", site="site-b",
                     roi_subset=("liver", "spleen"), input_prefix="site-a/inbox/")
    refused = runner.run(theirs)
    assert refused.state == "failed" and refused.error["status"] == 403, refused.error
    assert "site site-b may not read" in refused.error["detail"] and engine.calls == 2
