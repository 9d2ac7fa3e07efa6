"""Every accepted job settles with a reason: sub-model calls that hang or are cancelled under the router,
cancels racing completion or landing mid-write, and memory that a stuck job must not pin (asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import numpy as np

from serve.errors import ConflictError
from serve.inference.preprocess import prepare
from serve.router.state import Job, JobOptions
from serve.router.service import JobService, RouterSettings
from serve.router.tenancy import Tenancy
from tests.helpers.stack import BUCKET, nifti_bytes, write_tenants

VOLUME = nifti_bytes(shape=(16, 16, 16))
SPLEEN = JobOptions(["spleen"], False, ("statistics",))  # one sub-model: organs


async def _ready(name):
    return {"state": "ready", "model": SimpleNamespace(checksum="c0ffee", dataset_json={})}


def _service(tmp_path, call, describe=_ready, deployed=("organs",), steps=None, **settings) -> JobService:
    """A job service on ``tmp_path``; ``steps`` replace its parts (JobService's execute, merge, write, ...)."""
    tenancy = Tenancy.load(write_tenants(tmp_path / "tenants.yaml"))
    # model_construct: the tests' sub-second timeouts are below what a settings file may hold
    return JobService(tenancy, call, describe, list(deployed),
                      RouterSettings.model_construct(results_dir=str(tmp_path / "r"), **settings),
                      put=lambda array: array, **(steps or {}))


def _empty_merge(volume, *rest):
    """The stand-in sub-model's labels carry no label map: an empty segmentation on the input grid."""
    return np.zeros(volume.shape, np.uint8), {}, {}


async def _labels(name, refs, spacing):
    return {"labels": np.zeros(refs[0].shape, np.uint8), "started": 0.0, "finished": 0.0}


async def _cancel_while_its_thread_runs(svc: JobService, site, job: Job, started: list) -> None:
    """Cancel once a worker-thread stage has started: its slot stays taken until the thread returns."""
    while not started and not job.done:
        await asyncio.sleep(0.01)
    assert started, job.error
    svc.cancel(site, job.id)
    await asyncio.sleep(0.1)
    assert svc.scheduler.stats().running == 1  # the thread still runs: its slot is not lent out
    await asyncio.wait_for(svc.wait(job), 10)
    await asyncio.sleep(0.05)
    assert job.status == "cancelled" and svc.scheduler.stats().running == 0


def test_a_sub_model_that_never_answers_fails_the_job_and_frees_the_slot(tmp_path):
    async def hang(name, refs, spacing):
        await asyncio.Event().wait()

    async def main():
        svc = _service(tmp_path, hang, slots=1, submodel_timeout_s=0.5)
        site = svc.tenancy.sites["site-a"]
        stuck = svc.submit(site, SPLEEN, upload=VOLUME)
        await asyncio.wait_for(svc.wait(stuck), 60)
        assert stuck.status == "failed" and stuck.error["status"] == 503
        assert "did not answer within 0.5 s" in stuck.error["detail"] and stuck.error["retryable"]
        assert svc.scheduler.stats().running == 0

    asyncio.run(main())


def test_a_call_cancelled_under_the_router_is_a_failure_not_a_user_cancel(tmp_path):
    async def cancelled(name, refs, spacing):
        raise asyncio.CancelledError()

    async def main():
        svc = _service(tmp_path, cancelled)
        job = svc.submit(svc.tenancy.sites["site-a"], SPLEEN, upload=VOLUME)
        await asyncio.wait_for(svc.wait(job), 60)
        assert job.status == "failed" and job.error["status"] == 503 and "cancelled by the cluster" in \
            job.error["detail"]

    asyncio.run(main())


def test_cancel_after_the_job_finished_but_before_it_settled_is_409(tmp_path):
    async def quick(job, spooled, filename):
        return job

    async def main():
        svc = _service(tmp_path, _labels, steps={"execute": quick})
        site = svc.tenancy.sites["site-a"]
        job = svc.submit(site, SPLEEN, upload=VOLUME)
        fut = svc.future(job.id)
        while not fut.done():
            await asyncio.sleep(0)
        assert not job.done  # the done-callback that settles it has not run yet
        try:
            svc.cancel(site, job.id)
            raise AssertionError("cancel must refuse a finished job")
        except ConflictError as e:
            assert "already succeeded" in e.message
        await asyncio.sleep(0.05)
        assert svc.get(site, job.id).status == "succeeded" and svc.journal.load()[0].status == "succeeded"

    asyncio.run(main())


def test_cancel_during_the_write_keeps_the_slot_until_the_thread_ends_and_skips_the_upload(tmp_path):
    uploads, writing = [], []

    def slow_write(result, volume, outdir, outputs, roi_subset=None):
        writing.append(time.time())
        time.sleep(0.5)
        return {}

    async def main():
        svc = _service(tmp_path, _labels, slots=1, steps={
            "write": slow_write, "upload": lambda outdir, prefix: uploads.append(prefix) or {}, "merge": _empty_merge})
        site = svc.tenancy.sites["site-a"]
        opts = JobOptions(["spleen"], False, ("statistics",), f"s3://{BUCKET}/site-a/out/")
        job = svc.submit(site, opts, upload=VOLUME)
        await _cancel_while_its_thread_runs(svc, site, job, writing)
        assert uploads == []  # nothing reaches the site's prefix after it was told "cancelled"

    asyncio.run(main())


def test_a_stuck_job_does_not_pin_every_later_job_in_memory(tmp_path):
    svc = _service(tmp_path, _labels, max_jobs_kept=2)
    stuck = Job(site="site-a", options=SPLEEN, status="running")
    svc.kept.remember(stuck)
    for _ in range(5):
        svc.kept.remember(Job(site="site-a", options=SPLEEN, status="succeeded"))
    assert len(svc.jobs) == 2 and stuck.id in svc.jobs


def test_a_journal_record_of_the_wrong_shape_is_set_aside_and_the_rest_resume(tmp_path):
    old = _service(tmp_path, _labels)
    good = Job(site="site-a", options=SPLEEN, input_uri=f"s3://{BUCKET}/site-a/a.nii.gz", status="running")
    old.journal.save(good)
    for field, value in (("created", "yesterday"), ("resumed", "1"), ("site", None), ("status", "odd")):
        bad = Job(site="site-a", options=SPLEEN, input_uri=f"s3://{BUCKET}/site-a/b.nii.gz", status="running")
        old.journal.save(bad)
        path = old.journal.root / f"{bad.id}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))

    async def quick(job, spooled, filename):
        return job

    new = _service(tmp_path, _labels, steps={"execute": quick})  # a bad 'created' used to break the sort at start-up
    assert list(new.jobs) == [good.id] and len(list(new.journal.root.glob("*.unreadable"))) == 4

    async def main():
        assert new.resume_interrupted() == 1
        await new.wait(new.jobs[good.id])

    asyncio.run(main())
    assert new.jobs[good.id].status == "succeeded"


def test_a_request_cancelled_by_a_draining_replica_is_retried_then_503(tmp_path):
    from ray.serve.exceptions import RequestCancelledError

    calls = []

    async def draining(name, refs, spacing):
        calls.append(name)
        raise RequestCancelledError("replica shutting down")

    async def main():
        svc = _service(tmp_path, draining)
        job = svc.submit(svc.tenancy.sites["site-a"], SPLEEN, upload=VOLUME)
        await asyncio.wait_for(svc.wait(job), 60)
        assert job.status == "failed" and job.error["status"] == 503 and job.error["retryable"]
        assert calls == ["organs", "organs"]  # submodel_retries = 1

    asyncio.run(main())


def test_a_job_the_router_cannot_record_is_refused_with_503_and_never_runs(tmp_path):
    """A full or failing disk under the journal: the client hears 503 and nothing runs unseen."""
    import shutil

    import pytest

    from serve.errors import ServiceUnavailableError

    calls = []

    async def call(name, refs, spacing):
        calls.append(name)
        return await _labels(name, refs, spacing)

    async def main():
        svc = _service(tmp_path, call, steps={"merge": _empty_merge})
        site = svc.tenancy.sites["site-a"]
        shutil.rmtree(svc.journal.root)
        svc.journal.root.write_text("")  # a real OSError (not a directory) on every journal write
        for submit in (lambda: svc.submit(site, SPLEEN, upload=VOLUME),
                       lambda: svc.submit(site, SPLEEN, input_uri=f"s3://{BUCKET}/site-a/in/v.nii.gz")):
            with pytest.raises(ServiceUnavailableError, match="nothing was queued"):
                submit()
        await asyncio.sleep(0.5)
        assert calls == [] and svc.scheduler.stats().running == 0 and not svc.jobs
        assert svc.spool.files() == []  # no spooled upload left behind
        svc.journal.root.unlink()
        svc.journal.root.mkdir()
        job = svc.submit(site, SPLEEN, upload=VOLUME)  # the disk is back: accepted and run
        await asyncio.wait_for(svc.wait(job), 60)
        assert job.done  # settled (as failed here: the stand-in model has no labels), so its slot is free
        assert calls == ["organs"] and svc.journal.load()[0].status == "succeeded"

    asyncio.run(main())


def test_a_sub_model_that_cannot_describe_itself_fails_the_job_with_503(tmp_path):
    """A deployment whose replicas never start queues the describe call: bounded, then a retryable 503."""
    async def never(name):
        await asyncio.Event().wait()

    async def ray_error(name):
        raise RuntimeError("ActorDiedError: the replica's actor died")

    async def main():
        for describe, says in ((never, "did not describe itself within 0.5 s"), (ray_error, "cannot be reached")):
            svc = _service(tmp_path, _labels, describe, slots=1, submodel_timeout_s=0.5)
            job = svc.submit(svc.tenancy.sites["site-a"], SPLEEN, upload=VOLUME)
            await asyncio.wait_for(svc.wait(job), 60)
            assert job.status == "failed" and job.error["status"] == 503 and job.error["retryable"], job.error
            assert says in job.error["detail"] and svc.scheduler.stats().running == 0

    asyncio.run(main())


def test_a_full_run_with_an_unreadable_model_source_is_503_not_a_partial_result(tmp_path):
    """Skipping a model whose source is down would pass off fewer structures as the full answer."""
    async def describe(name):
        if name == "muscles":
            return {"state": "unreachable", "detail": "model source s3://models/ cannot be read", "model": None}
        return await _ready(name)

    async def main():
        svc = _service(tmp_path, _labels, describe, deployed=("organs", "muscles"))
        full = svc.submit(svc.tenancy.sites["site-a"], JobOptions(None, False, ("statistics",)), upload=VOLUME)
        await asyncio.wait_for(svc.wait(full), 60)
        assert full.status == "failed" and full.error["status"] == 503 and "muscles" in full.error["detail"]
        # a model that is simply not deployed is still skipped and reported
        svc = _service(tmp_path, _labels, _ready, deployed=("organs",))
        sms, _, skipped = await svc.submodels.plan(Job(site="site-a", options=JobOptions()))
        assert [sm.name for sm in sms] == ["organs"] and "muscles" in skipped

    asyncio.run(main())


def test_cancel_during_a_worker_thread_stage_keeps_the_slot_until_the_thread_ends(tmp_path):
    """Otherwise a site could cancel and resubmit past its limit while the orphaned threads pile up."""
    started = []

    def slow_prepare(volume, spacing, **kw):
        started.append(time.time())
        time.sleep(0.5)
        return prepare(volume, spacing, **kw)

    async def main():
        svc = _service(tmp_path, _labels, slots=1, steps={"prepare": slow_prepare})
        site = svc.tenancy.sites["site-a"]
        job = svc.submit(site, SPLEEN, upload=VOLUME)
        await _cancel_while_its_thread_runs(svc, site, job, started)

    asyncio.run(main())


def test_a_site_at_its_job_limit_is_answered_before_its_upload_body_is_read(tmp_path):
    """Uploads being read count against the site's job limit with its queued and running jobs, so a site
    cannot make the router hold more bodies in memory than it may run jobs; other sites are unaffected."""
    import pytest

    from serve.errors import TooManyRequestsError

    gate: list[asyncio.Event] = []

    async def held(name, refs, spacing):  # a sub-model that answers once the test lets it
        await gate[0].wait()
        return await _labels(name, refs, spacing)

    svc = _service(tmp_path, held)
    one, other = svc.tenancy.sites["site-c"], svc.tenancy.sites["site-d"]  # a limit of 1 job each
    with svc.upload_slot(one):
        with pytest.raises(TooManyRequestsError, match="queued, running or uploading"):
            with svc.upload_slot(one):
                pass
        with svc.upload_slot(other):
            pass

    async def main():
        gate.append(asyncio.Event())
        with svc.upload_slot(one):
            job = svc.submit(one, SPLEEN, upload=VOLUME)
        with pytest.raises(TooManyRequestsError):  # its one job is queued or running: no room to read another
            with svc.upload_slot(one):
                pass
        gate[0].set()
        await asyncio.wait_for(svc.wait(job), 30)
        assert job.done  # settled (as failed here: the stand-in model has no labels), so its slot is free
        with svc.upload_slot(one):  # settled: room again
            pass

    asyncio.run(main())


def test_a_site_flooding_the_router_evicts_its_own_finished_jobs_not_another_sites(tmp_path):
    svc = _service(tmp_path, _labels, max_jobs_kept=4)
    theirs = Job(site="site-b", options=SPLEEN, status="succeeded")
    svc.kept.remember(theirs)
    flood = [Job(site="site-a", options=SPLEEN, status="failed") for _ in range(10)]
    for j in flood:
        svc.kept.remember(j)
    assert len(svc.jobs) == 4 and theirs.id in svc.jobs
    assert [j for j in svc.jobs.values() if j.site == "site-a"] == flood[-3:]  # the flood's newest stay


def test_router_restarts_are_charged_to_the_running_job_only(tmp_path):
    """A job that crashes its router every time is running at each restart; another site's job waits behind
    it in the queue. The runner is charged each restart and given up after max_resumes; the waiting job,
    through more restarts than max_resumes, is never charged and then runs (before: it was failed too, told
    to check its own input)."""
    import shutil

    max_resumes = 2
    (tmp_path / "life0").mkdir()
    first = _service(tmp_path / "life0", _labels, slots=1, max_resumes=max_resumes)
    crasher, waiting = (Job(site=s, options=SPLEEN, status=st) for s, st in (("site-a", "running"),
                                                                             ("site-b", "queued")))
    for job in (crasher, waiting):  # the disk as a router that died while the crasher ran left it
        (first.spool.root / f"{job.id}.nii.gz").write_bytes(VOLUME)
        first.journal.save(job)
    shutil.copytree(first.settings.results_dir, tmp_path / "life1" / "r")  # life N runs on the disk N-1 left

    for restart in range(1, max_resumes + 2):
        died = asyncio.Event()

        async def crashes_the_router(name, refs, spacing):
            died.set()
            await asyncio.Event().wait()

        # in the last life the crasher is given up below: what runs now answers
        call = _labels if restart == max_resumes + 1 else crashes_the_router
        svc = _service(tmp_path / f"life{restart}", call, slots=1, max_resumes=max_resumes,
                       steps={"merge": _empty_merge})

        async def one_life(svc=svc, restart=restart):
            assert svc.resume_interrupted() == (2 if restart <= max_resumes else 1)
            if restart <= max_resumes:
                await asyncio.wait_for(died.wait(), 60)
                assert svc.jobs[waiting.id].status == "queued"  # behind the crasher, which holds the one slot
                # the router dies here: the next one starts from what is on disk now (a crash settles nothing)
                shutil.copytree(svc.settings.results_dir, tmp_path / f"life{restart + 1}" / "r")
                for job_id in (waiting.id, crasher.id):  # this router's memory goes with it, unrun
                    svc.scheduler.cancel(job_id)
            else:
                await asyncio.wait_for(svc.wait(svc.jobs[waiting.id]), 60)

        asyncio.run(one_life())
        assert svc.jobs[waiting.id].resumed == 0, restart

    gave_up, ran = svc.jobs[crasher.id], svc.jobs[waiting.id]
    assert ran.status == "succeeded", ran.error
    assert gave_up.status == "failed" and gave_up.resumed == max_resumes
    detail = gave_up.error["detail"]
    assert f"restarted {max_resumes + 1} times while this job was running" in detail
    assert "input" not in detail.lower() and "resubmit" in detail


def _kept(svc: JobService, job: Job) -> None:
    """What submit does with a new job: journal it, then keep it (evicting what the bounds say)."""
    svc.journal.save(job)
    svc.kept.remember(job)


def test_the_journal_is_bounded_by_bytes_evicting_settled_jobs_oldest_first(tmp_path):
    svc = _service(tmp_path, _labels)
    running = [Job(site="site-a", options=SPLEEN, status=s) for s in ("running", "queued")]
    for j in running:
        _kept(svc, j)
    svc.settings.journal_max_bytes = svc.journal.total_bytes * 3  # room for four more records or so
    settled = [Job(site="site-a", options=SPLEEN, status="succeeded") for _ in range(10)]
    for j in settled:
        (tmp_path / "r" / "site-a" / j.id).mkdir(parents=True)  # its local results
        _kept(svc, j)
    assert svc.journal.total_bytes <= svc.settings.journal_max_bytes
    kept = [j for j in settled if j.id in svc.jobs]
    assert 0 < len(kept) < len(settled) and kept == settled[-len(kept):]  # the newest stay
    assert all(j.id in svc.jobs for j in running)  # unsettled: never evicted
    assert sorted(p.stem for p in svc.journal.root.glob("*.json")) == sorted(svc.jobs)
    assert sorted(p.name for p in (tmp_path / "r" / "site-a").iterdir()) == sorted(j.id for j in kept)

    # only unsettled jobs left over the bound: none is evicted, and accepting goes on
    svc.settings.journal_max_bytes = 1
    more = Job(site="site-a", options=SPLEEN, status="queued")
    _kept(svc, more)
    assert set(svc.jobs) == {j.id for j in running} | {more.id}


def test_a_site_flooding_the_journal_with_bytes_evicts_its_own_finished_jobs(tmp_path):
    """By bytes the site whose records take the most pays first, though another site keeps more jobs."""
    svc = _service(tmp_path, _labels)
    small = [Job(site="site-a", options=SPLEEN, status="succeeded") for _ in range(3)]
    big = [Job(site="site-b", options=SPLEEN, status="failed",
               error={"status": 422, "title": "Bad input", "detail": "x" * 4000, "retryable": False})
           for _ in range(2)]
    for j in (small[0], big[0], small[1], big[1], small[2]):
        _kept(svc, j)
    svc.settings.journal_max_bytes = svc.journal.total_bytes - 1
    _kept(svc, Job(site="site-a", options=SPLEEN, status="queued"))
    assert big[0].id not in svc.jobs  # site-b's oldest, though site-a's records are older and more
    assert all(j.id in svc.jobs for j in small + big[1:])


def test_a_job_an_idempotency_key_made_within_a_day_is_evicted_after_the_rest_of_its_site(tmp_path, caplog):
    """Its key is promised for a day (docs/api.md): the site's unkeyed jobs and keyed ones older than a day go
    first; only a site with nothing else left loses it, and the log says the limits are too small for that."""
    svc = _service(tmp_path, _labels, max_jobs_kept=3)
    day_old = Job(site="site-a", options=SPLEEN, status="succeeded", idempotency_key="k0", request_hash="h",
                  created=time.time() - 25 * 3600)
    keyed = Job(site="site-a", options=SPLEEN, status="succeeded", idempotency_key="k1", request_hash="h")
    for j in (day_old, keyed):
        svc.kept.remember(j)
    flood = [Job(site="site-a", options=SPLEEN, status="failed") for _ in range(4)]
    for j in flood:
        svc.kept.remember(j)
    assert list(svc.jobs) == [keyed.id] + [j.id for j in flood[-2:]]
    assert "less than a day old is evicted" not in caplog.text
    svc.settings.max_jobs_kept = 1
    svc.kept.remember(Job(site="site-b", options=SPLEEN, status="running"))  # running: never evicted
    assert [j.site for j in svc.jobs.values()] == ["site-b"]
    assert "less than a day old is evicted" in caplog.text
