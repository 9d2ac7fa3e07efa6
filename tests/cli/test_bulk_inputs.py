"""``mriseg bulk`` keeps one output set per input version: a replaced input runs again, inputs sharing an
output folder fail unrun, a POST whose answer was lost is not sent twice, and no key reaches stderr
(real SeaweedFS; the router without Ray; a scripted HTTP server for the API's answers)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

from serve.storage import staging
from serve.cli.bulk import FAILED, SKIPPED, SUCCEEDED, already_done, api_backend, list_volumes, run_bulk
from serve.jobs.spec import JobSpec
from serve.records_schema import OutputRecord
from tests.helpers.volumes import body_volume
from tests.helpers.openapi_fakes import CheckedServer, ProxyAnswer
from tests.helpers.stack import nifti_bytes
from tests.cli.scripted_api import problem

pytestmark = pytest.mark.s3

#: what a job's own job.json records of its input (serve.jobs.publish.job_doc)
INPUT_FIELDS = {"uri", "etag", "version_id", "size", "sha256"}


def _recording_backend(ran: list[str]):
    def backend(spec: JobSpec):
        ran.append(spec.input_uri)
        return SUCCEEDED, "", "job-1"

    return backend


# -- 1. a replaced input is not done ------------------------------------------------------------
def test_the_routers_output_set_names_the_input_version_so_a_replaced_input_runs_again(seaweed, tmp_path,
                                                                                        unique_prefix):
    """The API path: the router's completion job.json records the object it read (as a job's does);
    after a corrected re-upload under the same key, bulk runs the input again instead of skipping it."""
    import yaml

    from serve.router.state import JobOptions
    from serve.router.service import JobService, RouterSettings
    from serve.router.tenancy import Tenancy

    inbox, out = f"s3://inbox/{unique_prefix}/in/", f"s3://outbox/{unique_prefix}/"
    uri = inbox + "case.nii.gz"
    staging.put_bytes(nifti_bytes(shape=(16, 16, 16), seed=1), uri, seaweed.settings)
    spec = JobSpec(uri, out, "site-a", roi_subset=("spleen",), outputs=("statistics",),
                   input_prefix=f"{unique_prefix}/in/")
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump({"sites": {"site-a": {
        "keys": ["key-site-a-0123456789abcdef"], "prefixes": [inbox, out], "max_concurrent_jobs": 2}}}))

    async def describe(name):
        from types import SimpleNamespace

        return {"state": "ready", "model": SimpleNamespace(checksum="c0ffee", dataset_json={})}

    async def labels(name, refs, spacing):
        return {"labels": np.zeros(refs[0].shape, np.uint8), "started": 0.0, "finished": 0.0}

    async def segment() -> None:
        svc = JobService(Tenancy.load(tmp_path / "tenants.yaml"), labels, describe, ["organs"],
                         RouterSettings(results_dir=str(tmp_path / "r"), s3=seaweed.settings.model_dump()),
                         put=lambda array: array,
                         merge=lambda volume, *rest: (np.zeros(volume.shape, np.uint8), {}, {}))  # no label maps
        job = svc.submit(svc.tenancy.sites["site-a"], JobOptions(["spleen"], False, ("statistics",),
                                                                 spec.output_prefix), input_uri=uri)
        await asyncio.wait_for(svc.wait(job), 120)
        assert job.status == "succeeded", job.error

    asyncio.run(segment())
    [listed] = list_volumes(inbox, seaweed.settings)
    doc = json.loads(staging.download_bytes(spec.output_prefix + "job.json", settings=seaweed.settings))
    assert set(doc["input"]) == INPUT_FIELDS and doc["input"]["uri"] == uri
    assert OutputRecord.model_validate(doc).status == "succeeded"  # the router's job.json, as written
    assert doc["input"]["etag"].strip('"') == listed.etag.strip('"')
    assert already_done(spec.output_prefix, seaweed.settings, spec.options(), listed)
    ran: list[str] = []
    kw = dict(site="site-a", roi_subset=["spleen"], outputs=["statistics"], progress=False)
    assert [i.outcome for i in run_bulk(inbox, out, _recording_backend(ran), seaweed.settings, **kw)] == [SKIPPED]

    staging.put_bytes(nifti_bytes(shape=(16, 16, 16), seed=2), uri, seaweed.settings)  # the corrected scan
    [replaced] = list_volumes(inbox, seaweed.settings)
    assert not already_done(spec.output_prefix, seaweed.settings, spec.options(), replaced)
    again = run_bulk(inbox, out, _recording_backend(ran), seaweed.settings, **kw)
    assert [i.outcome for i in again] == [SUCCEEDED] and ran == [uri]


def test_a_set_that_does_not_say_which_input_made_it_is_run_again(seaweed, unique_prefix):
    """A done job.json without an ``input`` (older versions), or one naming another object, is not
    proof that the listed input was segmented: bulk reruns it; one naming the listed object is skipped."""
    inbox, out = f"s3://inbox/{unique_prefix}/legacy/", f"s3://outbox/{unique_prefix}/"
    etag = staging.put_bytes(b"x", inbox + "case.nii.gz", seaweed.settings)["ETag"]
    spec = JobSpec(inbox + "case.nii.gz", out, input_prefix=f"{unique_prefix}/legacy/")
    job_json = spec.output_prefix + "job.json"
    ran: list[str] = []
    for record, expected in ((None, SUCCEEDED),
                             ({"uri": spec.input_uri, "etag": '"0123456789abcdef0123456789abcdef"'}, SUCCEEDED),
                             ({"uri": "s3://inbox/elsewhere/case.nii.gz", "etag": etag}, SUCCEEDED),
                             ({"uri": spec.input_uri, "etag": etag.strip('"'), "version_id": None}, SKIPPED)):
        doc = {"status": "done", "options": spec.options(), **({"input": record} if record else {})}
        staging.put_json(doc, job_json, seaweed.settings)
        items = run_bulk(inbox, out, _recording_backend(ran), seaweed.settings, progress=False)
        assert [i.outcome for i in items] == [expected], record
    assert len(ran) == 3


def test_a_replaced_input_runs_again_with_local_models(seaweed, tiny_models, tmp_path, unique_prefix):
    """``--local-models``: the skip no longer happens before the job runner sees the new ETag. The new
    version is segmented (beside the old set, the job runner's rule), and a further rerun computes nothing."""
    import nibabel as nib

    from serve.cli.bulk import local_backend

    inbox, out = f"s3://inbox/{unique_prefix}/local/", f"s3://outbox/{unique_prefix}/"
    for seed in (1, 2):
        vol = body_volume("RAS", shape=(16, 16, 12), spacing=(1.5, 1.5, 1.5), seed=seed)
        nib.save(nib.Nifti1Image(vol.data, vol.affine), str(tmp_path / f"v{seed}.nii.gz"))
    staging.upload_file(tmp_path / "v1.nii.gz", inbox + "case.nii.gz", seaweed.settings)
    backend = local_backend([str(tiny_models)], f"s3://jobs/{unique_prefix}", seaweed.settings)
    kw = dict(progress=False, roi_subset=["liver"], outputs=["multilabel"])
    first = run_bulk(inbox, out, backend, seaweed.settings, **kw)
    assert [i.outcome for i in first] == [SUCCEEDED]

    info = staging.upload_file(tmp_path / "v2.nii.gz", inbox + "case.nii.gz", seaweed.settings)
    second = run_bulk(inbox, out, backend, seaweed.settings, **kw)
    assert [i.outcome for i in second] == [SUCCEEDED], second[0].reason
    doc = json.loads(staging.download_bytes(second[0].output_prefix + "job.json", settings=seaweed.settings))
    assert doc["input"]["etag"] == info.etag and doc["status"] == "succeeded"
    third = run_bulk(inbox, out, backend, seaweed.settings, **kw)
    assert [(i.outcome, i.output_prefix) for i in third] == [(SKIPPED, second[0].output_prefix)]


# -- 2. inputs sharing an output folder -----------------------------------------------------------
def test_inputs_that_map_to_one_output_folder_all_fail_before_anything_runs(seaweed, unique_prefix):
    """``p1/scan.nii``, ``p1/scan.nii.gz`` and ``p1/scan.zip`` are all case ``p1/scan``: none runs (not even
    where a done set is there from an earlier run), each says which others share its folder; the rest run."""
    inbox, out = f"s3://inbox/{unique_prefix}/shared/", f"s3://outbox/{unique_prefix}/"
    shared = [inbox + n for n in ("p1/scan.nii", "p1/scan.nii.gz", "p1/scan.zip")]
    for uri in shared + [inbox + "p1/other.nii.gz"]:
        staging.put_bytes(b"x", uri, seaweed.settings)
    folder = JobSpec(shared[1], out, input_prefix=f"{unique_prefix}/shared/").output_prefix
    staging.put_json({"status": "done", "options": JobSpec(shared[1], out).options()}, folder + "job.json",
                     seaweed.settings)
    ran: list[str] = []
    items = {i.input: i for i in run_bulk(inbox, out, _recording_backend(ran), seaweed.settings, progress=False)}
    assert ran == [inbox + "p1/other.nii.gz"] and items[inbox + "p1/other.nii.gz"].outcome == SUCCEEDED
    for uri in shared:
        assert items[uri].outcome == FAILED and items[uri].reason.startswith("409 Output folder shared")
        assert all(o in items[uri].reason for o in shared if o != uri) and folder in items[uri].reason


# -- 3. a POST whose answer was lost is sent again with its Idempotency-Key -------------------------


@pytest.mark.parametrize("answer", ["drop", ProxyAnswer(502, "application/json", b'{"title": "Bad gateway"}'),
                                    ProxyAnswer(504, "application/json", b'{"title": "Gateway timeout"}')])
def test_a_post_whose_answer_was_lost_is_sent_again_with_the_same_idempotency_key(answer, serve_api):
    """A dropped connection or a proxy's 502/504 may hide a job the cluster took: the POST is sent again
    with the same Idempotency-Key, which the cluster answers with that job (tests/cluster/test_idempotency.py),
    so the input runs once, and the job is followed to its end."""
    server = serve_api([answer, (202, {"id": "j1", "status": "queued"})])
    try:
        run = api_backend(f"http://127.0.0.1:{server.server_address[1]}", "key", poll_s=0.01, timeout_s=60)
        assert run(JobSpec("s3://in/a.nii.gz", "s3://out")) == (SUCCEEDED, "", "j1")
        assert server.posted == 2 and server.keys[0] and server.keys[0] == server.keys[1]
        assert run(JobSpec("s3://in/b.nii.gz", "s3://out"))[0] == SUCCEEDED
        assert len(set(server.keys)) == 2  # another input, another key
    finally:
        server.shutdown()


def test_a_post_the_cluster_answered_with_a_lasting_error_is_not_sent_again(serve_api):
    """A 500 (a bug) or a 4xx is the answer: the input fails with it, after one POST."""
    server = serve_api([problem(500, "Internal error", "the operators have the log")])
    try:
        run = api_backend(f"http://127.0.0.1:{server.server_address[1]}", "key", poll_s=0.01, timeout_s=60)
        assert run(JobSpec("s3://in/a.nii.gz", "s3://out")) == (
            FAILED, "500 Internal error: the operators have the log", "")
        assert server.posted == 1
    finally:
        server.shutdown()


def test_a_post_the_cluster_refused_or_never_got_is_sent_again(serve_api):
    """429/503 and a refused connection prove nothing was queued: those are waited out and sent again."""
    server = serve_api([problem(503, "Service unavailable"), problem(429, "Too many requests"),
                     (202, {"id": "j1", "status": "queued"})])
    try:
        run = api_backend(f"http://127.0.0.1:{server.server_address[1]}", "key", poll_s=0.01, timeout_s=60)
        assert run(JobSpec("s3://in/a.nii.gz", "s3://out")) == (SUCCEEDED, "", "j1") and server.posted == 3
    finally:
        server.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late: list[CheckedServer] = []
    starter = threading.Timer(1.5, lambda: late.append(serve_api([(202, {"id": "j1", "status": "queued"})], port)))
    starter.start()  # connection refused until then
    try:
        run = api_backend(f"http://127.0.0.1:{port}", "key", poll_s=0.01, timeout_s=60)
        t = time.monotonic()
        assert run(JobSpec("s3://in/a.nii.gz", "s3://out")) == (SUCCEEDED, "", "j1")
        assert time.monotonic() - t >= 1.4 and late[0].posted == 1
    finally:
        starter.join()
        for s in late:
            s.shutdown()


# -- 4. no object key on stderr -------------------------------------------------------------------
def test_failed_inputs_are_not_named_on_stderr_but_the_report_names_them(seaweed, unique_prefix, tmp_path,
                                                                        monkeypatch, capsys, serve_api):
    from serve.cli.bulk import main

    inbox = f"s3://inbox/{unique_prefix}/phi/"
    for name in ("Doe^Jane/scan.nii", "Doe^Jane/scan.nii.gz"):  # keys often carry a patient's name
        staging.put_bytes(b"x", inbox + name, seaweed.settings)
    s = seaweed.settings
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s.secret_access_key)
    monkeypatch.setenv("MRISEG_API_KEY", "key")
    report = tmp_path / "r.json"
    api = serve_api([problem(500, "nothing may be submitted here")])
    try:
        rc = main([inbox, "--out", f"s3://outbox/{unique_prefix}/", "--s3-endpoint", s.endpoint_url,
                   "--api", f"http://127.0.0.1:{api.server_address[1]}", "--report", str(report), "--no-progress"])
    finally:
        api.shutdown()
    assert api.posted == 0
    printed = capsys.readouterr()
    assert rc == 1 and "Doe" not in printed.out + printed.err
    assert "2 input(s) failed; see the report" in printed.err and "#1 (sha256 " in printed.err
    assert "409 Output folder shared" in printed.err
    items = json.loads(report.read_text())["items"]
    assert {i["input"] for i in items} == {inbox + "Doe^Jane/scan.nii", inbox + "Doe^Jane/scan.nii.gz"}


def test_an_api_that_cannot_be_reached_stops_bulk_at_once_with_what_to_check(seaweed, unique_prefix,
                                                                           monkeypatch, capsys):
    """Not after every input has waited a day for it."""
    from serve.cli.bulk import main

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("MRISEG_API_KEY", "key")
    t = time.monotonic()
    rc = main([f"s3://inbox/{unique_prefix}/in/", "--out", f"s3://outbox/{unique_prefix}/", "--s3-endpoint",
               seaweed.settings.endpoint_url, "--api", f"http://127.0.0.1:{closed}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the cluster API" in err and "check --api" in err
    assert time.monotonic() - t < 60  # a hang guard: the point is that it does not wait out a deadline
