"""The event intake's worker: per-site fair scheduling of pushed jobs, and what it does with jobs that do not
settle (real SeaweedFS S3 for the held pushes and job records; the segmenting engine is a stand-in that writes
a file, since these tests are about the intake's queueing, not about segmentation)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from serve.clock import SYSTEM_CLOCK, ManualClock
from serve.errors import ServiceUnavailableError


class _Engine:
    """A :class:`serve.jobs.engine.Engine` that records which site's job runs when, and waits for ``gate`` first."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.ran: list[str] = []          # sites, in the order their jobs started
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

    def model_checksums(self, roi_subset, fast, site: str) -> dict[str, str]:
        if self.fail:  # as the router answers while a sub-model restarts
            raise ServiceUnavailableError("sub-model(s) organs cannot be reached on the cluster right now")
        return {"organs": "sha-organs"}

    def segment_file(self, path: Path, spec, outdir: Path) -> dict:
        self.ran.append(spec.site)
        self.gate.wait(60)
        self.calls += 1
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "segmentations.nii.gz").write_bytes(b"labels")
        return {"timings": {}, "structures": {}, "models": {"organs": "sha-organs"}, "unavailable": {}, "demo": True}


# -- the scheduler alone ------------------------------------------------------------------------------------
def test_a_sites_flood_waits_behind_itself_not_in_front_of_another_sites_job():
    from serve.jobs.scheduler import SiteScheduler

    order: list[str] = []
    gate = threading.Event()

    def job(name: str):
        def run():
            order.append(name)
            gate.wait(10)
        return run

    sched = SiteScheduler(1, lambda: {"a": 4, "b": 4})
    try:
        futures = [sched.submit("a", job(f"a{i}")) for i in range(6)]
        while not order:  # a's first job holds the one worker; the rest of its flood waits
            time.sleep(0.01)
        futures.append(sched.submit("b", job("b0")))
        gate.set()
        for f in futures:
            f.result(10)
    finally:
        sched.close()
    assert order[:3] == ["a0", "b0", "a1"], order  # b's one job runs second, not after a's backlog
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4", "a5"]


def test_a_site_runs_at_most_its_limit_while_other_sites_use_the_free_workers():
    from serve.jobs.scheduler import SiteScheduler

    running: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    lock = threading.Lock()

    def job(site: str):
        def run():
            with lock:
                running[site] += 1
                most[site] = max(most[site], running[site])
            time.sleep(0.05)
            with lock:
                running[site] -= 1
        return run

    sched = SiteScheduler(4, lambda: {"a": 1})  # b is not named: the default limit, 1
    try:
        futures = [sched.submit(s, job(s)) for s in ["a"] * 6 + ["b"] * 3]
        for f in futures:
            f.result(10)
        assert most == {"a": 1, "b": 1}
        more = SiteScheduler(4, lambda: {"a": 3, "b": 1})
        try:
            futures = [more.submit("a", job("a")) for _ in range(9)]
            for f in futures:
                f.result(10)
        finally:
            more.close()
        assert most["a"] == 3
    finally:
        sched.close()


def test_jobs_still_waiting_when_the_scheduler_closes_are_cancelled_not_run():
    from serve.jobs.scheduler import SiteScheduler

    gate = threading.Event()
    sched = SiteScheduler(1, dict)
    first = sched.submit("a", lambda: gate.wait(10))
    later = sched.submit("a", lambda: pytest.fail("ran after close"))
    while not first.running():
        time.sleep(0.01)
    sched.close()
    gate.set()
    assert first.result(10) is True and later.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit("a", lambda: None)


# -- the worker, on real S3 ---------------------------------------------------------------------------------
def _setup(seaweed, prefix: str, tmp_path, engine, lease_s: float = 30.0, clock=SYSTEM_CLOCK):
    from serve.jobs.intake_settings import IntakeSettings
    from serve.jobs.runner import JobRunner
    from serve.jobs.store import JobStore

    settings = IntakeSettings(jobs=f"s3://jobs/{prefix}", lease_s=lease_s, concurrency=1, s3=seaweed.settings)
    runner = JobRunner(JobStore(settings.jobs, seaweed.settings, lease_s=lease_s, clock=clock), engine,
                       seaweed.settings, work_dir=tmp_path)
    return settings, runner


def _spec(prefix: str, site: str, case: str, s3):
    from serve.storage import staging
    from serve.jobs.spec import JobSpec

    spec = JobSpec(f"s3://inbox/{prefix}/{site}/in/{case}.nii.gz", f"s3://outbox/{prefix}", site=site,
                   input_prefix=f"{prefix}/{site}/in/", outputs=("multilabel",))
    staging.put_bytes(f"a volume of {site}".encode(), spec.input_uri, s3)
    return spec


def _settled(worker, timeout: float = 120, clock: ManualClock | None = None, step_s: float = 0.25) -> None:
    """Wait until the worker holds nothing; with a ManualClock, move it on by ``step_s`` while waiting, so the
    backoffs and leases the worker waits out pass in a fraction of their real time."""
    deadline = time.monotonic() + timeout  # hang guard only (real time)
    while (worker.journal.held() or worker._in_flight) and time.monotonic() < deadline:
        if clock is None:
            time.sleep(0.2)
        else:
            clock.advance(step_s)
            time.sleep(0.02)  # real time for the worker's threads to act on the new time
    assert worker.journal.held() == []


@pytest.mark.s3
def test_one_sites_pushed_jobs_do_not_delay_another_sites_push(seaweed, unique_prefix, tmp_path):
    """Site a pushes five jobs, then site b one: b's runs second, not after a's backlog (before: one FIFO pool)."""
    from serve.jobs.intake import IntakeWorker

    engine = _Engine()
    engine.gate.clear()  # a's first job holds the one worker while the pushes arrive
    settings, runner = _setup(seaweed, unique_prefix, tmp_path, engine)
    worker = IntakeWorker(settings, runner=runner, site_limits=lambda: {"site-a": 4, "site-b": 4})
    try:
        worker.submit([_spec(unique_prefix, "site-a", f"case{i}", seaweed.settings).to_dict() for i in range(5)])
        deadline = time.monotonic() + 60
        while not engine.ran and time.monotonic() < deadline:  # a's first job holds the one worker
            time.sleep(0.05)
        worker.submit([_spec(unique_prefix, "site-b", "case0", seaweed.settings).to_dict()])
        engine.gate.set()
        _settled(worker)
    finally:
        worker.close()
    assert engine.ran == ["site-a", "site-b", "site-a", "site-a", "site-a", "site-a"], engine.ran


@pytest.mark.s3
def test_a_pushed_job_that_keeps_failing_retryably_is_given_up_with_a_reason(seaweed, unique_prefix,
                                                                             tmp_path):
    """The router answers 503 every time: five runs, each after a wait twice the last, then an error job.json the
    site can read, nothing held."""
    from serve.storage import staging
    from serve.jobs.intake import IntakeWorker
    from serve.jobs.pushes import MAX_ATTEMPTS, retry_delay_s

    clock = ManualClock()  # the 1 + 2 + 4 + 8 s of backoff pass on it, not in real time
    settings, runner = _setup(seaweed, unique_prefix, tmp_path, _Engine(fail=True), lease_s=2.0, clock=clock)
    spec = _spec(unique_prefix, "site-a", "case", seaweed.settings)
    runs: list[float] = []
    run = runner.run

    def timed(job_spec):
        runs.append(clock.time())
        return run(job_spec)

    runner.run = timed
    worker = IntakeWorker(settings, runner=runner, clock=clock)
    try:
        worker.submit([spec.to_dict()])
        _settled(worker, clock=clock)
    finally:
        worker.close()
    doc = json.loads(staging.download_bytes(spec.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "failed" and doc["error"]["status"] == 503
    assert f"given up after {MAX_ATTEMPTS} runs" in doc["error"]["detail"]
    assert len(runs) == MAX_ATTEMPTS
    waits = [b - a for a, b in zip(runs, runs[1:])]
    assert all(w >= 0.95 * retry_delay_s(i, worker.sweep_s) for i, w in enumerate(waits, start=1)), waits


@pytest.mark.s3
def test_a_pushed_job_another_worker_holds_waits_for_its_claim_and_is_not_given_up(seaweed, unique_prefix,
                                                                                    tmp_path):
    """A dead worker's claim outlives the five backed-off runs: those looks at a job running elsewhere are no
    runs of ours, so the pushed job waits for the claim to lapse, then runs and is done -- not let go and lost."""
    from serve.storage import staging
    from serve.jobs.intake import IntakeWorker
    from serve.jobs.store import JobStore

    engine = _Engine()
    clock = ManualClock()  # the dead worker's 20 s lease runs out on it, not in real time
    settings, runner = _setup(seaweed, unique_prefix, tmp_path, engine, lease_s=2.0, clock=clock)
    spec = _spec(unique_prefix, "site-a", "case", seaweed.settings)
    full, key, models = runner.key_for(spec)
    # longer than the five runs' backoff (1 + 2 + 4 + 8 s with a 1 s sweep)
    dead = JobStore(settings.jobs, seaweed.settings, owner="dead-worker", lease_s=20.0, clock=clock)
    assert dead.claim(key, full, models)[1]
    worker = IntakeWorker(settings, runner=runner, clock=clock)
    try:
        worker.submit([spec.to_dict()])
        _settled(worker, clock=clock)
    finally:
        worker.close()
    doc = json.loads(staging.download_bytes(spec.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "succeeded" and engine.calls == 1


def test_the_wait_between_runs_of_an_unsettled_pushed_job_doubles_up_to_a_cap():
    from serve.jobs.pushes import MAX_RETRY_DELAY_S, retry_delay_s

    assert [retry_delay_s(n, 60) for n in range(1, 5)] == [60, 120, 240, 480]
    assert retry_delay_s(12, 60) == MAX_RETRY_DELAY_S


def test_a_configured_worker_without_a_runner_or_an_engine_says_to_give_one():
    """The worker sits below the cluster and builds no engine of its own: the deployment hands it the router's."""
    from serve.jobs.intake import IntakeWorker
    from serve.jobs.intake_settings import IntakeSettings

    with pytest.raises(TypeError, match="needs a runner or an engine"):
        IntakeWorker(IntakeSettings(jobs="s3://jobs/records/"))
    assert IntakeWorker(IntakeSettings()).runner is None  # intake off: nothing to run, nothing asked for


@pytest.mark.s3
def test_the_intake_signs_its_records_with_its_record_key_file_where_one_is_set(seaweed, unique_prefix, tmp_path,
                                                                                monkeypatch):
    """``events.record_key_file`` stands in for $MRISEG_RECORD_KEY_FILE: the held pushes are signed with it, and a
    key file that cannot be read stops the intake, naming it."""
    from serve.jobs.intake import IntakeWorker
    from serve.jobs.intake_settings import IntakeSettings
    from serve.jobs.runner import JobRunner
    from serve.jobs.store import JobStore
    from serve.jobs.pushes import PushJournal
    from serve.jobs.records import RecordKeyError, RecordSigner

    monkeypatch.delenv("MRISEG_RECORD_KEY_FILE", raising=False)
    key = RecordSigner.generate(tmp_path / "record.key")
    settings = IntakeSettings.from_mapping({"jobs": f"s3://jobs/{unique_prefix}", "record_key_file": str(key)},
                                           seaweed.settings.model_dump())
    assert settings.record_key_file == str(key)
    engine = _Engine()
    engine.gate.clear()  # the job stays held while the test reads its record
    runner = JobRunner(JobStore(settings.jobs, seaweed.settings, signer=RecordSigner.from_file(key)), engine,
                       seaweed.settings, work_dir=tmp_path)
    worker = IntakeWorker(settings, runner=runner)
    try:
        worker.submit([_spec(unique_prefix, "site-a", "case", seaweed.settings).to_dict()])
        held = PushJournal(settings.jobs, seaweed.settings, signer=RecordSigner.from_file(key)).held()
        assert [h.spec.site for h in held] == ["site-a"]
        engine.gate.set()
        _settled(worker)
    finally:
        worker.close()
    with pytest.raises(RecordKeyError, match="cannot read the record key file"):
        IntakeWorker(settings.model_copy(update={"record_key_file": str(tmp_path / "missing.key")}), runner=runner)
