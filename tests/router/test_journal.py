"""The router's job journal: records round-trip, and a new router resumes or fails what the old one left."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from serve.router.state import Job, JobOptions
from serve.router.journal import JobJournal, job_from_record, job_to_record
from serve.router.service import JobService, RouterSettings
from serve.router.tenancy import Tenancy
from serve.errors import MrisegError
from serve.records_schema import JOURNAL_FORMAT, JournalRecord, UnsupportedRecordFormat
from tests.helpers.stack import BUCKET, write_tenants


def _service(tmp_path, execute=None, **settings) -> JobService:
    """A job service on ``tmp_path`` whose jobs run ``execute`` (default: the real execution)."""
    tenancy = Tenancy.load(write_tenants(tmp_path / "tenants.yaml"))

    async def never(*_a, **_k):  # sub-models are not reached in these tests
        raise AssertionError("no sub-model call expected")

    return JobService(tenancy, never, never, [], RouterSettings(results_dir=str(tmp_path / "results"), **settings),
                      execute=execute)


def test_record_round_trip_keeps_every_field():
    job = Job(site="site-a", options=JobOptions(["liver"], True, ("multilabel",), "s3://b/site-a/out/"),
              input_uri=f"s3://{BUCKET}/site-a/x.nii.gz", status="succeeded", timings={"total_s": 1.5},
              structures={5: "liver"}, error=None, resumed=1, demo=True)
    back = job_from_record(job_to_record(job))
    assert back == job
    assert back.structures == {5: "liver"} and back.options.outputs == ("multilabel",)
    assert back.demo and back.public()["demo_models"] is True
    with pytest.raises(TypeError, match="demo"):
        job_from_record({**job_to_record(job), "demo": "yes"})


def test_the_resampling_order_and_input_cast_survive_a_restart():
    """A resumed job is resampled as it was asked to be; a record from before the option runs at the default;
    a record with an order no request could give is not trusted."""
    job = Job(site="site-a", options=JobOptions(["liver"], False, ("multilabel",), None, 3), input_cast="int32")
    back = job_from_record(job_to_record(job))
    assert back.options.resampling_order == 3 and back.input_cast == "int32" and back == job
    assert back.public()["options"]["resampling_order"] == 3 and back.public()["input_cast"] == "int32"
    old = job_to_record(job)
    del old["options"]["resampling_order"], old["input_cast"], old["format"]  # as written before either
    assert job_from_record(old).options.resampling_order == 1 and job_from_record(old).input_cast is None
    for bad in (6, True, "3", None):
        with pytest.raises(ValueError, match="resampling_order"):
            job_from_record({**job_to_record(job), "options": {**job_to_record(job)["options"],
                                                               "resampling_order": bad}})
    with pytest.raises(TypeError, match="input_cast"):
        job_from_record({**job_to_record(job), "input_cast": 32})


def test_unreadable_record_is_set_aside(tmp_path):
    j = JobJournal(tmp_path)
    j.save(Job(site="site-a", options=JobOptions()))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")  # JSON, but not a record
    (tmp_path / ".tmp-half.json").write_text("{")
    assert len(j.load()) == 1
    assert (tmp_path / "broken.unreadable").exists() and not (tmp_path / ".tmp-half.json").exists()
    assert (tmp_path / "list.unreadable").exists()


def test_records_are_written_as_mriseg_journal_1_and_legacy_ones_without_a_format_still_load(tmp_path):
    """Records name their format; one written before formats (no ``format``; a member this version does not
    know dropped, as before) loads as it did; within ``mriseg.journal/1`` a stray member is not trusted."""
    j = JobJournal(tmp_path)
    job = Job(site="site-a", options=JobOptions(["liver"]), input_uri=f"s3://{BUCKET}/site-a/x.nii.gz",
              status="failed", error={"status": 422, "title": "Unreadable volume", "detail": "d", "retryable": False})
    j.save(job)
    written = json.loads((tmp_path / f"{job.id}.json").read_text())
    assert written["format"] == JOURNAL_FORMAT and JournalRecord.model_validate(written).id == job.id
    legacy = Job(site="site-a", options=JobOptions(), status="succeeded")
    rec = {k: v for k, v in job_to_record(legacy).items() if k != "format"}
    (tmp_path / f"{legacy.id}.json").write_text(json.dumps({**rec, "gone": 1}))
    stray = Job(site="site-a", options=JobOptions())
    (tmp_path / f"{stray.id}.json").write_text(json.dumps({**job_to_record(stray), "gone": 1}))
    assert sorted(x.id for x in j.load()) == sorted([job.id, legacy.id])
    assert [x for x in j.load() if x.id == legacy.id] == [legacy]
    assert (tmp_path / f"{stray.id}.unreadable").exists()


def test_a_record_of_a_newer_format_is_refused_and_left_where_it_is(tmp_path, caplog):
    """A record of ``mriseg.journal/2`` (a newer router's, on a downgraded replica) is neither guessed at nor
    set aside: the error says what to do, and the record stays for the version that wrote it."""
    job = Job(site="site-a", options=JobOptions())
    newer = {**job_to_record(job), "format": "mriseg.journal/2"}
    with pytest.raises(UnsupportedRecordFormat, match="mriseg.journal/2.*newer mriseg-serve"):
        job_from_record(newer)
    (tmp_path / f"{job.id}.json").write_text(json.dumps(newer))
    with caplog.at_level(logging.ERROR, logger="serve.router.journal"):
        assert JobJournal(tmp_path).load() == []
    assert json.loads((tmp_path / f"{job.id}.json").read_text()) == newer
    assert "mriseg.journal/2" in caplog.text and "newer mriseg-serve" in caplog.text


def test_new_router_resumes_what_it_can_and_fails_the_rest_with_a_reason(tmp_path, caplog):
    caplog.set_level("INFO", logger="mriseg.audit")
    old = _service(tmp_path)
    incoming = old.spool.root
    s3_job = Job(site="site-a", options=JobOptions(), input_uri=f"s3://{BUCKET}/site-a/a.nii.gz", status="running")
    spooled_job = Job(site="site-b", options=JobOptions(), status="queued")
    (incoming / f"{spooled_job.id}.nii.gz").write_bytes(b"volume bytes")
    lost_upload = Job(site="site-a", options=JobOptions(), status="running")
    looping = Job(site="site-a", options=JobOptions(), input_uri=f"s3://{BUCKET}/site-a/b.nii.gz",
                  status="running", resumed=2)
    # charged twice while it ran, then re-queued: waiting in the queue, it cannot have crashed the router
    patient = Job(site="site-b", options=JobOptions(), input_uri=f"s3://{BUCKET}/site-b/c.nii.gz",
                  status="queued", resumed=2)
    gone_site = Job(site="site-x", options=JobOptions(), input_uri="s3://other/x.nii.gz", status="queued")
    done = Job(site="site-a", options=JobOptions(), status="succeeded", outputs={"multilabel": "/r/x.nii.gz"})
    for j in (s3_job, spooled_job, lost_upload, looping, patient, gone_site, done):
        old.journal.save(j)

    ran: list[tuple[str, str | None, str]] = []

    async def fake_execute(job, spooled, filename):
        ran.append((job.id, spooled.name if spooled else None, filename))
        return job

    new = _service(tmp_path, fake_execute)

    async def go():
        n = new.resume_interrupted()
        assert new.resume_interrupted() == 0  # once only
        await asyncio.gather(*(new.wait(new.jobs[i]) for i in (s3_job.id, spooled_job.id, patient.id)))
        return n

    assert asyncio.run(go()) == 3
    jobs = new.jobs
    assert {r[0] for r in ran} == {s3_job.id, spooled_job.id, patient.id}
    assert (spooled_job.id, f"{spooled_job.id}.nii.gz", f"{spooled_job.id}.nii.gz") in ran
    for j in (s3_job, spooled_job, patient):
        assert jobs[j.id].status == "succeeded"
    # only the restart a job was running through is charged
    assert (jobs[s3_job.id].resumed, jobs[spooled_job.id].resumed, jobs[patient.id].resumed) == (1, 0, 2)
    assert not list(incoming.glob(f"{spooled_job.id}*"))  # the spool goes once the job settles
    for j, words in ((lost_upload, "upload it again"), (looping, "restarted 3 times while this job was running"),
                     (gone_site, "no longer configured")):
        assert jobs[j.id].status == "failed", j
        assert jobs[j.id].error["status"] == 503 and words in jobs[j.id].error["detail"]
    # the give-up reason blames no one's input: another job may have been what crashed the router
    detail = jobs[looping.id].error["detail"]
    assert "input" not in detail.lower() and "protect the other jobs" in detail and "resubmit" in detail
    assert jobs[done.id].status == "succeeded" and jobs[done.id].outputs == done.outputs
    # what the new router settled is on disk for the next one
    on_disk = {j.id: j.status for j in JobJournal(tmp_path / "results" / ".jobs").load()}
    assert on_disk[s3_job.id] == "succeeded" and on_disk[lost_upload.id] == "failed"
    # one structured audit record per outcome, with ids only: no object keys or file names
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mriseg.audit"]
    by_job = {}
    for r in records:
        by_job.setdefault(r["job"], []).append(r["event"])
    assert by_job[s3_job.id] == ["job.resumed", "job.settled"]
    assert by_job[lost_upload.id] == ["job.settled"]
    assert all(r["site"] for r in records)
    assert not any(".nii" in r.getMessage() or "s3://" in r.getMessage() for r in caplog.records)


def test_a_failed_job_logs_no_object_key_from_its_causes(tmp_path, caplog):
    """botocore quotes the request URL (bucket and key) in its errors; our 5xx error says enough alone."""
    import logging

    from botocore.exceptions import EndpointConnectionError

    from serve.storage.staging import storage_error

    caplog.set_level("DEBUG")
    old = _service(tmp_path)
    key = "site-a/Jane_Doe_1961-04-02.nii.gz"
    job = Job(site="site-a", options=JobOptions(), input_uri=f"s3://{BUCKET}/{key}", status="running")
    old.journal.save(job)

    async def unreachable(job, spooled, filename):
        try:
            raise EndpointConnectionError(endpoint_url=f"http://127.0.0.1:1/{BUCKET}/{key}")
        except EndpointConnectionError as e:
            raise storage_error(e, BUCKET, "read the input") from e

    new = _service(tmp_path, unreachable)

    async def go():
        new.resume_interrupted()
        try:
            await new.wait(new.jobs[job.id])
        except Exception:  # noqa: BLE001 - the job's failure is what is checked below
            pass

    asyncio.run(go())
    assert new.jobs[job.id].status == "failed" and new.jobs[job.id].error["status"] == 502
    text = "\n".join(logging.Formatter().format(r) for r in caplog.records)
    assert "S3UnavailableError" in text and "Jane_Doe" not in text


def test_a_spooled_upload_no_job_owns_is_removed_at_start(tmp_path):
    old = _service(tmp_path)
    queued = Job(site="site-a", options=JobOptions(), status="queued")
    old.journal.save(queued)
    (old.spool.root / f"{queued.id}.nii.gz").write_bytes(b"kept: its job resumes from it")
    (old.spool.root / "0123456789abcdef0123456789abcdef.nii.gz").write_bytes(b"orphan: died before the journal")
    new = _service(tmp_path)
    assert [f.name for f in new.spool.root.iterdir()] == [f"{queued.id}.nii.gz"]


def _break_journal(svc: JobService) -> None:
    """A real OSError (a file where the journal folder was) on every journal write, as on a failing disk."""
    import shutil

    shutil.rmtree(svc.journal.root)
    svc.journal.root.write_text("")


def test_a_restart_onto_a_failing_disk_settles_every_interrupted_job_in_memory_and_keeps_going(tmp_path, caplog):
    old = _service(tmp_path)
    resumable = Job(site="site-a", options=JobOptions(), input_uri=f"s3://{BUCKET}/site-a/a.nii.gz", status="running")
    lost_upload = Job(site="site-a", options=JobOptions(), status="running")
    spooled_job = Job(site="site-b", options=JobOptions(), status="queued")
    (old.spool.root / f"{spooled_job.id}.nii.gz").write_bytes(b"volume bytes")
    for j in (resumable, lost_upload, spooled_job):
        old.journal.save(j)
    new = _service(tmp_path)
    _break_journal(new)
    assert new.resume_interrupted() == 0  # nothing can be queued unrecorded, and nothing raises
    for j in (resumable, lost_upload, spooled_job):
        job = new.jobs[j.id]
        assert job.status == "failed" and job.error["status"] == 503, job
    assert "resubmit" in new.jobs[resumable.id].error["detail"]
    assert not list(new.spool.root.iterdir())
    assert new.scheduler.stats().running == 0
    assert sum("journal record could not be written" in r.getMessage() for r in caplog.records) == 3


def test_a_job_settling_onto_a_failing_disk_still_settles_and_cleans_its_spool(tmp_path):
    async def breaks_the_disk(job, spooled, filename):  # the job ran; the disk fails before it is settled
        assert spooled is not None and spooled.read_bytes() == b"volume bytes"
        _break_journal(svc)
        return job

    svc = _service(tmp_path, breaks_the_disk)

    async def go():
        job = svc.submit(svc.tenancy.sites["site-a"], JobOptions(), upload=b"volume bytes")
        return await svc.wait(job)

    job = asyncio.run(go())
    assert job.status == "succeeded" and not list(svc.spool.root.iterdir())


_CANCEL_ON_A_FULL_DISK = """
import pathlib, resource, signal, sys
from serve.router.state import Job, JobOptions
from tests.router.test_journal import _service
svc = _service(pathlib.Path(sys.argv[1]))
job = Job(site="site-a", options=JobOptions(), input_uri=sys.argv[2], status="running")
svc.journal.save(job)
svc.jobs[job.id] = job
# from here every write that grows a file fails with the kernel's EFBIG, as on a full disk; removing still works
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
svc.cancel(svc.tenancy.sites["site-a"], job.id)
print(job.id, job.status)
"""


def test_a_cancel_the_disk_cannot_record_is_not_run_again_by_a_restart(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    # a child process: the file-size limit must not reach pytest's own capture files
    done = subprocess.run([sys.executable, "-c", _CANCEL_ON_A_FULL_DISK, str(tmp_path),
                           f"s3://{BUCKET}/site-a/a.nii.gz"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    job_id, status = done.stdout.split()
    assert status == "cancelled"
    assert "could not be written (OSError)" in done.stderr and "restart forgets the job" in done.stderr
    new = _service(tmp_path)
    assert job_id not in new.jobs and new.resume_interrupted() == 0


def test_the_journal_counts_the_bytes_of_its_records(tmp_path):
    j = JobJournal(tmp_path)
    a, b = Job(site="site-a", options=JobOptions()), Job(site="site-b", options=JobOptions())
    for job in (a, b):
        j.save(job)
    a.status, a.structures = "succeeded", {i: f"structure_{i}" for i in range(80)}
    j.save(a)  # a record replaced by a bigger one counts once, at its new size

    def on_disk() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("*.json"))

    assert j.size(a.id) == (tmp_path / f"{a.id}.json").stat().st_size > j.size(b.id) > 0
    assert j.total_bytes == on_disk()
    again = JobJournal(tmp_path)  # a restarted router counts what it finds
    again.load()
    assert again.total_bytes == on_disk() and again.size(a.id) == j.size(a.id)
    j.remove(b.id)
    assert j.total_bytes == j.size(a.id) == on_disk() and j.size(b.id) == 0


def test_the_journal_can_live_in_a_folder_of_its_own(tmp_path):
    """router.journal_dir: the records go there (in k8s: a volume of their own), apart from the spool and the
    results, and a restarted router resumes from them as from the default {results_dir}/.jobs."""
    journal = tmp_path / "journal-volume"
    old = _service(tmp_path, journal_dir=str(journal))
    queued = Job(site="site-a", options=JobOptions(), status="queued")
    (old.spool.root / f"{queued.id}.nii.gz").write_bytes(b"volume bytes")
    old.journal.save(queued)
    assert [p.name for p in journal.iterdir()] == [f"{queued.id}.json"]
    assert not (tmp_path / "results" / ".jobs").exists()

    async def quick(job, spooled, filename):
        return job

    new = _service(tmp_path, quick, journal_dir=str(journal))
    assert list(new.spool.root.iterdir())  # its journalled job owns the spooled upload: kept

    async def go():
        assert new.resume_interrupted() == 1
        await new.wait(new.jobs[queued.id])

    asyncio.run(go())
    assert [j.status for j in JobJournal(journal).load()] == ["succeeded"]
    assert not list(new.spool.root.iterdir())


def test_a_restart_re_authorises_each_job_against_the_tenants_file_as_it_now_is(tmp_path, caplog):
    """The tenants file changed while the router was down: only jobs the sites may still run are resumed."""
    import yaml

    caplog.set_level("INFO", logger="mriseg.audit")
    old = _service(tmp_path)
    inside = Job(site="site-a", options=JobOptions(output_prefix=f"s3://{BUCKET}/site-a/in/out/"),
                 input_uri=f"s3://{BUCKET}/site-a/in/a.nii.gz", status="running")
    input_out = Job(site="site-a", options=JobOptions(), input_uri=f"s3://{BUCKET}/site-a/old/b.nii.gz",
                    status="queued")
    output_out = Job(site="site-a", options=JobOptions(output_prefix=f"s3://{BUCKET}/site-a/old/out/"),
                     input_uri=f"s3://{BUCKET}/site-a/in/c.nii.gz", status="running", resumed=1)
    upload_out = Job(site="site-a", options=JobOptions(output_prefix=f"s3://{BUCKET}/site-a/old/out/"),
                     status="queued")
    (old.spool.root / f"{upload_out.id}.nii.gz").write_bytes(b"volume bytes")
    gone = Job(site="site-b", options=JobOptions(), input_uri=f"s3://{BUCKET}/site-b/d.nii.gz", status="queued")
    for j in (inside, input_out, output_out, upload_out, gone):
        old.journal.save(j)

    # site-a now owns only its in/ folder; site-b is gone
    doc = yaml.safe_load((tmp_path / "tenants.yaml").read_text())
    doc["sites"]["site-a"]["prefixes"] = [f"s3://{BUCKET}/site-a/in/"]
    del doc["sites"]["site-b"]
    (tmp_path / "now.yaml").write_text(yaml.safe_dump(doc))

    async def never(*_a, **_k):
        raise AssertionError("no sub-model call expected")

    ran: list[str] = []

    async def fake_execute(job, spooled, filename):
        ran.append(job.id)
        return job

    new = JobService(Tenancy.load(tmp_path / "now.yaml"), never, never, [],
                     RouterSettings(results_dir=str(tmp_path / "results")), execute=fake_execute)

    async def go():
        n = new.resume_interrupted()
        await new.wait(new.jobs[inside.id])
        return n

    assert asyncio.run(go()) == 1 and ran == [inside.id]
    assert new.jobs[inside.id].status == "succeeded" and new.jobs[inside.id].resumed == 1
    for j, what in ((input_out, "its input"), (output_out, "its output_prefix"), (upload_out, "its output_prefix")):
        job = new.jobs[j.id]
        assert job.status == "failed" and job.error["status"] == 403 and not job.error["retryable"], job
        assert what in job.error["detail"] and "no longer inside site site-a's prefixes" in job.error["detail"]
        assert "s3://" not in job.error["detail"]
    assert new.jobs[output_out.id].resumed == 1  # refused, not charged another restart
    assert new.jobs[gone.id].status == "failed" and "no longer configured" in new.jobs[gone.id].error["detail"]
    assert not list(new.spool.root.iterdir())  # the refused upload's spooled volume goes with it
    on_disk = {j.id: j.status for j in JobJournal(tmp_path / "results" / ".jobs").load()}
    assert on_disk[input_out.id] == on_disk[output_out.id] == on_disk[upload_out.id] == "failed"
    settled = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mriseg.audit"]
    assert {r["job"] for r in settled if r["event"] == "job.settled" and r.get("error") == 403} == {
        input_out.id, output_out.id, upload_out.id}


def test_a_site_removed_from_the_tenants_file_drains_its_accepted_jobs(tmp_path):
    """The scheduler asks for the limit of a site whose queued jobs outlived its tenants entry: one at a time,
    not a KeyError that would stop the scheduler for every site."""
    svc = _service(tmp_path)
    assert svc.site_limit("site-a") == svc.tenancy.sites["site-a"].max_concurrent_jobs
    svc.tenancy.sites.pop("site-a")
    assert svc.site_limit("site-a") == 1


def test_the_idempotency_key_and_request_fingerprint_survive_a_restart(tmp_path):
    """A restarted router answers a repeated POST from the record; a key of the wrong type is not trusted."""
    job = Job(site="site-a", options=JobOptions(["liver"]), input_uri=f"s3://{BUCKET}/site-a/x.nii.gz",
              status="succeeded", idempotency_key="k-1", request_hash="ab" * 32)
    back = job_from_record(job_to_record(job))
    assert back == job and (back.idempotency_key, back.request_hash) == ("k-1", "ab" * 32)
    for name in ("idempotency_key", "request_hash"):
        with pytest.raises(TypeError, match=name):
            job_from_record({**job_to_record(job), name: 7})
    JobJournal(tmp_path / "results" / ".jobs").save(job)
    svc = _service(tmp_path)
    site = svc.tenancy.sites["site-a"]
    assert svc.submit_once(site, JobOptions(["liver"]), "k-1", "ab" * 32) == (svc.jobs[job.id], False)
    with pytest.raises(MrisegError, match=f"made job {job.id}") as reused:
        svc.submit_once(site, JobOptions(["liver"]), "k-1", "cd" * 32)
    assert reused.value.status == 422


def test_the_health_check_fails_when_the_journal_cannot_take_a_record(tmp_path):
    """Its folder gone (an unmounted volume) or its disk nearly full: the replica must say it is unhealthy."""
    from serve.router.journal import JournalUnhealthyError

    svc = _service(tmp_path, journal_dir=str(tmp_path / "journal"))
    asyncio.run(svc.check_health())  # healthy as started
    (tmp_path / "journal").rename(tmp_path / "journal-unmounted")
    (tmp_path / "journal").write_text("not a folder")  # root writes into a read-only folder; not into a file
    with pytest.raises(JournalUnhealthyError, match="cannot take a record"):
        asyncio.run(svc.check_health())

    (tmp_path / "full").mkdir()
    full = _service(tmp_path / "full", journal_min_free_bytes=1 << 62)  # more than any disk has free
    with pytest.raises(JournalUnhealthyError, match="journal_min_free_bytes"):
        asyncio.run(full.check_health())
    assert not list((tmp_path / "full" / "results" / ".jobs").glob(".tmp-*"))  # the probe leaves nothing
