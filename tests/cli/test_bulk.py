"""``mriseg bulk`` against a real SeaweedFS: interrupted (killed) and resumed, with a correct report."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from serve.storage import staging
from serve.cli.bulk import SKIPPED, SUCCEEDED, already_done, list_volumes
from tests.helpers.volumes import body_volume

pytestmark = pytest.mark.s3

N_GOOD = 8


@pytest.fixture
def inbox(seaweed, tmp_path, unique_prefix):
    import nibabel as nib

    for i in range(N_GOOD):
        vol = body_volume("RAS", shape=(16, 16, 12), spacing=(1.5, 1.5, 1.5), seed=i)
        path = tmp_path / f"c{i}.nii.gz"
        nib.save(nib.Nifti1Image(vol.data, vol.affine), str(path))
        staging.upload_file(path, f"s3://inbox/{unique_prefix}/in/sub/case{i}.nii.gz", seaweed.settings)
    staging.put_bytes(b"\x1f\x8bcorrupt", f"s3://inbox/{unique_prefix}/in/broken.nii.gz", seaweed.settings)
    staging.put_bytes(b"readme", f"s3://inbox/{unique_prefix}/in/README.txt", seaweed.settings)
    return f"s3://inbox/{unique_prefix}/in/"


def bulk_cmd(inbox_uri, prefix, models, report) -> list[str]:
    return [sys.executable, "-m", "serve.cli.bulk", inbox_uri, "--out", f"s3://outbox/{prefix}/", "--site", "site-a",
            "--local-models", str(models), "--jobs", f"s3://jobs/{prefix}", "--concurrency", "2",
            "--roi-subset", "liver", "--outputs", "multilabel,statistics", "--report", str(report), "--no-progress", "--lease-s", "4"]


def bulk_env(seaweed) -> dict:
    s = seaweed.settings
    return {**os.environ, "AWS_ACCESS_KEY_ID": s.access_key_id, "AWS_SECRET_ACCESS_KEY": s.secret_access_key,
            "MRISEG_S3_ENDPOINT": s.endpoint_url, "OMP_NUM_THREADS": "1"}


def test_list_volumes_ignores_other_files(seaweed, inbox):
    got = list_volumes(inbox, seaweed.settings)
    assert len(got) == N_GOOD + 1 and not any(g.uri.endswith(".txt") for g in got)
    assert all(g.etag for g in got)  # what a rerun compares with the job.json's input


def test_a_key_that_cannot_name_an_output_fails_alone(seaweed, unique_prefix):
    """S3 lists a key with a tab in it; the other inputs still run and the report names the odd one."""
    from serve.cli.bulk import FAILED, run_bulk

    inbox = f"s3://inbox/{unique_prefix}/odd/"
    seaweed.client().put_object(Bucket="inbox", Key=f"{unique_prefix}/odd/a\tb.nii.gz", Body=b"x")
    staging.put_bytes(b"x", inbox + "fine.nii.gz", seaweed.settings)
    ran: list[str] = []

    def backend(spec):
        ran.append(spec.input_uri)
        return SUCCEEDED, "", "job-1"

    items = run_bulk(inbox, f"s3://outbox/{unique_prefix}/", backend, seaweed.settings, progress=False)
    status = {i.input.rsplit("/", 1)[1]: (i.outcome, i.reason) for i in items}
    assert ran == [inbox + "fine.nii.gz"] and status["fine.nii.gz"][0] == SUCCEEDED
    assert status["a\tb.nii.gz"][0] == FAILED and "control characters" in status["a\tb.nii.gz"][1]


def test_a_set_done_with_other_options_is_not_skipped(seaweed, unique_prefix):
    """Rerunning with ``--fast`` (or other outputs or structures) on the same ``--out`` runs again."""
    from serve.cli.bulk import run_bulk
    from serve.jobs.spec import JobSpec

    inbox = f"s3://inbox/{unique_prefix}/opts/"
    etag = staging.put_bytes(b"x", inbox + "case.nii.gz", seaweed.settings)["ETag"]
    out = f"s3://outbox/{unique_prefix}/"
    spec = JobSpec(inbox + "case.nii.gz", out, input_prefix=f"{unique_prefix}/opts/")
    staging.put_json({"status": "done", "options": spec.options(), "input": {"uri": spec.input_uri, "etag": etag}},
                     spec.output_prefix + "job.json", seaweed.settings)
    ran: list[bool] = []

    def backend(s):
        ran.append(s.fast)
        return SUCCEEDED, "", "job-1"

    same = run_bulk(inbox, out, backend, seaweed.settings, progress=False)
    assert [i.outcome for i in same] == [SKIPPED] and ran == []
    fast = run_bulk(inbox, out, backend, seaweed.settings, progress=False, fast=True)
    assert [i.outcome for i in fast] == [SUCCEEDED] and ran == [True]
    assert already_done(spec.output_prefix, seaweed.settings)  # without options: any done set
    assert not already_done(spec.output_prefix, seaweed.settings, {**spec.options(), "roi_subset": ["liver"]})


def test_a_set_made_with_another_resampling_order_or_before_it_was_recorded_is_not_skipped(seaweed,
                                                                                            unique_prefix):
    """Old outputs never pass for new ones: a set of -ro 3 is not one of -ro 1, and a set whose job.json has no
    resampling_order (made before the option, with another resampling) is no set of any order."""
    from serve.cli.bulk import run_bulk
    from serve.jobs.spec import JobSpec

    inbox = f"s3://inbox/{unique_prefix}/ro/"
    etag = staging.put_bytes(b"x", inbox + "case.nii.gz", seaweed.settings)["ETag"]
    out = f"s3://outbox/{unique_prefix}/"
    spec = JobSpec(inbox + "case.nii.gz", out, input_prefix=f"{unique_prefix}/ro/", resampling_order=3)
    record = {"status": "done", "input": {"uri": spec.input_uri, "etag": etag}}
    staging.put_json({**record, "options": spec.options()}, spec.output_prefix + "job.json", seaweed.settings)
    ran: list[int] = []

    def backend(s):
        ran.append(s.resampling_order)
        return SUCCEEDED, "", "job-1"

    assert [i.outcome for i in run_bulk(inbox, out, backend, seaweed.settings, progress=False,
                                       resampling_order=3)] == [SKIPPED]
    assert [i.outcome for i in run_bulk(inbox, out, backend, seaweed.settings, progress=False)] == [SUCCEEDED]
    assert ran == [1]
    old = {k: v for k, v in spec.options().items() if k != "resampling_order"}
    staging.put_json({**record, "options": old}, spec.output_prefix + "job.json", seaweed.settings)
    for order in (1, 3):
        assert [i.outcome for i in run_bulk(inbox, out, backend, seaweed.settings, progress=False,
                                           resampling_order=order)] == [SUCCEEDED]
    assert ran == [1, 1, 3]


def test_a_local_rerun_with_other_options_reports_where_its_outputs_went(seaweed, tiny_models, tmp_path,
                                                                         unique_prefix):
    """``--local-models`` never writes over a set made with other options (a job's rule): the rerun's
    outputs go to ``runs/<key>/`` beside it, and the report says so."""
    import nibabel as nib

    from serve.cli.bulk import local_backend, run_bulk

    vol = body_volume("RAS", shape=(16, 16, 12), spacing=(1.5, 1.5, 1.5))
    nib.save(nib.Nifti1Image(vol.data, vol.affine), str(tmp_path / "c.nii.gz"))
    inbox = f"s3://inbox/{unique_prefix}/rerun/"
    staging.upload_file(tmp_path / "c.nii.gz", inbox + "case.nii.gz", seaweed.settings)
    out = f"s3://outbox/{unique_prefix}/"
    backend = local_backend([str(tiny_models)], f"s3://jobs/{unique_prefix}", seaweed.settings)
    first = run_bulk(inbox, out, backend, seaweed.settings, progress=False, roi_subset=["liver"])
    second = run_bulk(inbox, out, backend, seaweed.settings, progress=False, roi_subset=["liver"],
                      outputs=["multilabel"])
    assert [i.outcome for i in first] == [i.outcome for i in second] == [SUCCEEDED]
    base = first[0].output_prefix
    assert base == f"{out}default/case/" and second[0].output_prefix.startswith(base + "runs/")
    assert already_done(second[0].output_prefix, seaweed.settings,
                        {"roi_subset": ["liver"], "fast": False, "outputs": ["multilabel"], "resampling_order": 1})
    again = run_bulk(inbox, out, backend, seaweed.settings, progress=False, roi_subset=["liver"])
    assert [i.outcome for i in again] == [SKIPPED]


def test_bulk_resumes_after_interruption_with_correct_report(seaweed, inbox, tiny_models, tmp_path,
                                                             unique_prefix):
    outs = [f"s3://outbox/{unique_prefix}/site-a/sub/case{i}/" for i in range(N_GOOD)]

    def done() -> set[str]:
        return {o for o in outs if already_done(o, seaweed.settings)}

    first = subprocess.Popen(bulk_cmd(inbox, unique_prefix, tiny_models, tmp_path / "r1.json"),
                             env=bulk_env(seaweed), start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400  # hang guard only
    while len(done()) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = done()
    assert 2 <= len(before) < N_GOOD, (len(before), first.stdout.read().decode()[-2000:])
    assert not (tmp_path / "r1.json").exists()  # killed: no report

    second = subprocess.run(bulk_cmd(inbox, unique_prefix, tiny_models, tmp_path / "r2.json"),
                            env=bulk_env(seaweed), capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr[-2000:]  # one input failed
    report = json.loads((tmp_path / "r2.json").read_text())
    items = {i["input"]: i for i in report["items"]}
    assert len(items) == N_GOOD + 1 == report["summary"]["total"]
    skipped = {i["output_prefix"] for i in report["items"] if i["outcome"] == SKIPPED}
    assert skipped == before
    succeeded = {i["output_prefix"] for i in report["items"] if i["outcome"] == SUCCEEDED}
    assert succeeded == set(outs) - before
    broken = items[inbox + "broken.nii.gz"]
    assert broken["outcome"] == "failed" and "422" in broken["reason"]
    assert report["summary"] == {"succeeded": N_GOOD - len(before), "failed": 1, "skipped": len(before),
                                 "total": N_GOOD + 1}
    assert done() == set(outs)
    assert f"{N_GOOD - len(before)} succeeded, 1 failed, {len(before)} skipped" in second.stdout

    # a third run finds everything done; the CSV report says so
    third = subprocess.run(bulk_cmd(inbox, unique_prefix, tiny_models, tmp_path / "r3.csv"),
                           env=bulk_env(seaweed), capture_output=True, text=True, timeout=600)
    rows = list(csv.DictReader(open(tmp_path / "r3.csv")))
    assert len(rows) == N_GOOD + 1
    assert sorted(r["outcome"] for r in rows) == ["failed"] + [SKIPPED] * N_GOOD, third.stderr[-1000:]


@pytest.mark.ray
def test_bulk_through_the_cluster_api_resumes(serve_stack, tmp_path):
    """The real HTTP API (POST /v1/segmentations with output_prefix, then polling); a rerun skips done inputs."""
    import uuid

    from serve.cli.bulk import api_backend, run_bulk, write_report
    from tests.helpers.stack import SITE_KEYS, nifti_bytes

    s3 = serve_stack.extra["s3"]
    root = f"s3://consortium/site-a/bulk-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        staging.put_bytes(nifti_bytes(shape=(24, 24, 24), seed=40 + i), f"{root}/in/case{i}.nii.gz", s3)
    staging.put_bytes(b"\x1f\x8bcorrupt", f"{root}/in/broken.nii.gz", s3)
    backend = api_backend(serve_stack.url, SITE_KEYS["site-a"], poll_s=0.5)
    kw = dict(site="site-a", concurrency=2, roi_subset=["liver"], outputs=("multilabel",), progress=False)

    first = run_bulk(f"{root}/in/", f"{root}/out/", backend, s3, **kw)
    by_case = {i.input.rsplit("/", 1)[1]: i for i in first}
    assert [by_case[f"case{i}.nii.gz"].outcome for i in range(3)] == ["succeeded"] * 3
    assert by_case["broken.nii.gz"].outcome == "failed" and "422" in by_case["broken.nii.gz"].reason
    for i in range(3):
        assert already_done(f"{root}/out/site-a/case{i}/", s3)

    second = run_bulk(f"{root}/in/", f"{root}/out/", backend, s3, **kw)
    assert sorted(i.outcome for i in second) == ["failed", "skipped", "skipped", "skipped"]
    report = json.loads(write_report(second, tmp_path / "r.json").read_text())
    assert report["summary"] == {"succeeded": 0, "failed": 1, "skipped": 3, "total": 4}

    # a corrected case0 under the same key: the router's job.json named the version it read, so it runs again
    staging.put_bytes(nifti_bytes(shape=(24, 24, 24), seed=50), f"{root}/in/case0.nii.gz", s3)
    third = {i.input.rsplit("/", 1)[1]: i.outcome for i in run_bulk(f"{root}/in/", f"{root}/out/", backend, s3, **kw)}
    assert third == {"case0.nii.gz": "succeeded", "case1.nii.gz": "skipped", "case2.nii.gz": "skipped",
                     "broken.nii.gz": "failed"}
    listed = {v.uri: v.etag for v in list_volumes(f"{root}/in/", s3)}
    doc = json.loads(staging.download_bytes(f"{root}/out/site-a/case0/job.json", settings=s3))
    assert doc["input"]["etag"] == listed[f"{root}/in/case0.nii.gz"]


def test_the_api_backend_waits_out_limits_and_restarts_instead_of_failing_the_job(serve_api):
    """A site at its job limit (429), its request rate (429) or a restarting router (503): the job is still
    queued or running, so bulk waits (honouring Retry-After) and reports what the job did."""
    from serve.cli.bulk import api_backend
    from serve.jobs.spec import JobSpec
    from tests.cli.scripted_api import problem

    posts = [problem(429, "Too many requests"), (202, {"id": "j1", "status": "queued"})]
    gets = [problem(429, "Too many requests"), problem(503, "Service unavailable"),
            (200, {"id": "j1", "status": "running"}), (200, {"id": "j1", "status": "succeeded"})]
    server = serve_api(posts, gets=gets)
    run = api_backend(f"http://127.0.0.1:{server.server_address[1]}", "key", poll_s=0.01, timeout_s=60)
    assert run(JobSpec("s3://in/a.nii.gz", "s3://out")) == (SUCCEEDED, "", "j1")
    assert len(posts) == 1 and len(gets) == 1  # every scripted answer was given
