"""Durable jobs on a real SeaweedFS: idempotency, atomic claims, leases, error job.json, 4xx errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time

import pytest

from serve.storage import staging
from serve.clock import ManualClock
from serve.jobs.engine import SegmenterEngine
from serve.jobs.runner import JobRunner
from serve.jobs.spec import JobSpec, case_name, idempotency_key
from serve.jobs.store import ClaimLost, JobRecord, JobStore
from serve.jobs.pushes import PushJournal
from serve.jobs.records import RecordSigner
from serve.records_schema import FAILED, PUSH_FORMAT, SUCCEEDED, OutputRecord, PushRecord
from tests.helpers.volumes import body_volume

pytestmark = pytest.mark.s3

ROI = ("liver", "spleen")


def put_volume(settings, uri: str, tmp_path, seed: int = 0) -> staging.ObjectInfo:
    import nibabel as nib

    vol = body_volume("RAS", shape=(20, 18, 12), spacing=(1.5, 1.5, 1.5), seed=seed)
    path = tmp_path / f"v{seed}.nii.gz"
    nib.save(nib.Nifti1Image(vol.data, vol.affine), str(path))
    return staging.upload_file(path, uri, settings)


@pytest.fixture
def runner(seaweed, segmenter, unique_prefix, tmp_path):
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    return JobRunner(store, SegmenterEngine(segmenter), seaweed.settings, work_dir=tmp_path)


def spec_for(prefix: str, name: str, **kw) -> JobSpec:
    return JobSpec(f"s3://inbox/{prefix}/in/{name}", f"s3://outbox/{prefix}", site="site-a",
                   input_prefix=f"{prefix}/in/", roi_subset=kw.pop("roi_subset", ROI), **kw)


def keys_under(seaweed, bucket, prefix):
    resp = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_case_name_is_the_key_below_the_prefix_made_safe_and_bounded():
    assert case_name("p/in/sub/case7.nii.gz", "p/in/") == "sub/case7"
    assert case_name("elsewhere/x.MHA") == "x"
    # an inbox at the bucket root keeps the folders: p1/scan and p2/scan are two cases, not one
    assert case_name("p1/scan.nii.gz", "") == "p1/scan" and case_name("p2/scan.nii.gz", "") == "p2/scan"
    # S3 keys are literal; output folders must not climb or collapse when synced to disk
    assert case_name("p/in/../../site-b/x.nii.gz", "p/in/") == "_/_/site-b/x"
    assert case_name("p/in//./a.nii.gz", "p/in/") == "_/a"
    assert case_name("p/in/ünï cødé 名前.nii.gz", "p/in/") == "ünï cødé 名前"
    long = case_name("p/in/" + "x" * 900 + ".nii.gz", "p/in/")
    assert len(long.encode()) <= 200 and long != case_name("p/in/" + "x" * 901 + ".nii.gz", "p/in/")


def test_done_job_is_not_recomputed(seaweed, runner, unique_prefix, tmp_path):
    spec = spec_for(unique_prefix, "case1.nii.gz")
    put_volume(seaweed.settings, spec.input_uri, tmp_path)
    first = runner.run(spec)
    assert first.state == SUCCEEDED and first.computed and runner.engine.calls == 1
    assert first.output_prefix == f"s3://outbox/{unique_prefix}/site-a/case1/"
    keys = keys_under(seaweed, "outbox", f"{unique_prefix}/site-a/case1/")
    assert [k.rsplit("/", 1)[1] for k in keys] == ["job.json", "preview.png", "segmentation.nii.gz",
                                                  "statistics.json"]
    doc = json.loads(staging.download_bytes(first.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "succeeded" and doc["job_key"] == first.key
    assert OutputRecord.model_validate(doc).format == "mriseg.output/1" and len(doc["mac"]) == 64
    assert doc["input"]["etag"] and doc["input"]["sha256"] and doc["software"]["version"]
    assert set(doc["models"]) == {"organs"} and doc["options"]["roi_subset"] == sorted(ROI)
    assert doc["timings"]["total_s"] > 0
    # a redelivered event, and a fresh runner (as after a restart): the stored result comes back
    again = runner.run(spec)
    restarted = JobRunner(JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings), runner.engine,
                          seaweed.settings).run(spec)
    assert again.state == restarted.state == SUCCEEDED and not again.computed and not restarted.computed
    assert again.key == first.key and runner.engine.calls == 1


def test_different_options_never_overwrite(seaweed, runner, unique_prefix, tmp_path):
    spec = spec_for(unique_prefix, "case2.nii.gz")
    put_volume(seaweed.settings, spec.input_uri, tmp_path)
    a = runner.run(spec)
    before = staging.download_bytes(a.output_prefix + "segmentation.nii.gz", settings=seaweed.settings)
    b = runner.run(dataclasses.replace(spec, roi_subset=("liver",)))
    assert b.state == SUCCEEDED and b.computed and b.key != a.key and b.output_prefix != a.output_prefix
    assert b.output_prefix.startswith(a.output_prefix + "runs/")
    assert staging.download_bytes(a.output_prefix + "segmentation.nii.gz", settings=seaweed.settings) == before
    # a new version of the input object (a corrected re-upload) is a new job too, and its result replaces
    # the earlier version's in the case folder, where the site looks: the set made with other options stays
    put_volume(seaweed.settings, spec.input_uri, tmp_path, seed=3)
    c = runner.run(spec)
    assert c.computed and c.key not in (a.key, b.key) and c.output_prefix == a.output_prefix
    doc = json.loads(staging.download_bytes(a.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["job_key"] == c.key
    assert staging.object_exists(b.output_prefix + "job.json", seaweed.settings) is not None
    # a late (redelivered) event for the replaced version is the finished job a: nothing runs or is published
    late = runner.run(dataclasses.replace(spec, etag=json.loads(staging.download_bytes(
        b.output_prefix + "job.json", settings=seaweed.settings))["input"]["etag"]))
    assert late.key == a.key and late.state == SUCCEEDED and not late.computed
    assert json.loads(staging.download_bytes(a.output_prefix + "job.json", settings=seaweed.settings))["job_key"] == c.key


def test_idempotency_key_covers_models_and_options():
    spec = JobSpec("s3://b/k.nii", "s3://o", etag='"e1"', roi_subset=("spleen", "liver"))
    base = idempotency_key(spec, {"organs": "abc"})
    assert base == idempotency_key(dataclasses.replace(spec, roi_subset=("liver", "spleen")), {"organs": "abc"})
    assert base != idempotency_key(spec, {"organs": "abd"})
    assert base != idempotency_key(dataclasses.replace(spec, fast=True), {"organs": "abc"})
    assert base != idempotency_key(dataclasses.replace(spec, etag='"e2"'), {"organs": "abc"})
    assert base != idempotency_key(dataclasses.replace(spec, outputs=("multilabel",)), {"organs": "abc"})


def test_idempotency_key_differs_by_resampling_order_and_from_keys_before_it():
    """Outputs resampled another way are another job: never returned for this one, never overwritten by it."""
    import hashlib

    spec = JobSpec("s3://b/k.nii", "s3://o", etag='"e1"')
    assert spec.resampling_order == 1 and spec.options()["resampling_order"] == 1
    keys = {o: idempotency_key(dataclasses.replace(spec, resampling_order=o), {"organs": "abc"}) for o in range(6)}
    assert len(set(keys.values())) == 6 and keys[1] == idempotency_key(spec, {"organs": "abc"})
    # the key a job had before the option existed (order 3, scipy's "constant" mode, no cast) is none of them
    before = {"bucket": "b", "key": "k.nii", "version": "e1", "options": {"roi_subset": None, "fast": False,
              "outputs": sorted(spec.outputs)}, "models": {"organs": "abc"}, "output_root": "s3://o", "site": "default"}
    assert hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:32] not in keys.values()


@pytest.mark.parametrize("order", [-1, 6, 1.0, "1", True, None])
def test_a_job_spec_with_another_resampling_order_is_refused(order):
    from serve.errors import MrisegError

    with pytest.raises(MrisegError, match="0 to 5"):
        JobSpec("s3://b/k.nii", "s3://o", resampling_order=order)
    with pytest.raises(ValueError, match="0 to 5"):  # a stored spec (a held push): unreadable, set aside
        JobSpec.from_dict({**JobSpec("s3://b/k.nii", "s3://o").to_dict(), "resampling_order": order})
    assert JobSpec.from_dict({"input_uri": "s3://b/k.nii", "output_root": "s3://o"}).resampling_order == 1


def test_job_json_records_the_resampling_order_and_the_input_cast(seaweed, runner, unique_prefix,
                                                                  tmp_path):
    import nibabel as nib

    vol = body_volume("LPS", shape=(20, 18, 12), spacing=(1.2, 1.2, 2.0))
    path = tmp_path / "int16.nii.gz"
    nib.save(nib.Nifti1Image(vol.data.round().astype("int16"), vol.affine), str(path))
    spec = spec_for(unique_prefix, "int16.nii.gz", resampling_order=3)
    staging.upload_file(path, spec.input_uri, seaweed.settings)
    out = runner.run(spec)
    assert out.state == SUCCEEDED
    doc = json.loads(staging.download_bytes(out.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["options"]["resampling_order"] == 3 and doc["input_cast"] == "int32"
    spec1 = spec_for(unique_prefix, "int16.nii.gz")  # the default order is another job, in its own folder
    again = runner.run(spec1)
    assert again.computed and again.key != out.key and again.output_prefix != out.output_prefix
    doc = json.loads(staging.download_bytes(again.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["options"]["resampling_order"] == 1 and doc["input_cast"] == "int32"


@pytest.mark.parametrize("shared", [False, True], ids=["8 workers", "8 threads of one worker"])
def test_concurrent_duplicate_claims_have_one_winner(seaweed, unique_prefix, shared):
    """Also within one process: an intake's pushed jobs and its queue share one store."""
    spec = JobSpec(f"s3://inbox/{unique_prefix}/x.nii", "s3://outbox/o", etag='"1"')
    key = idempotency_key(spec, {"organs": "c"})
    one = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    stores = [one if shared else JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    wins: list[bool] = []

    def go(store):
        barrier.wait()
        wins.append(store.claim(key, spec, {"organs": "c"})[1])

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_stale_claim_is_taken_over(seaweed, unique_prefix):
    spec = JobSpec(f"s3://inbox/{unique_prefix}/y.nii", "s3://outbox/o", etag='"1"')
    key = idempotency_key(spec, {})
    clock = ManualClock()  # both workers' leases are on it: the test moves it on instead of sleeping
    dead = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings, lease_s=1.0, clock=clock)
    live = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings, lease_s=60.0, clock=clock)
    rec_dead, won = dead.claim(key, spec, {})
    assert won
    clock.advance(0.9)
    assert live.claim(key, spec, {})[1] is False  # lease still valid
    clock.advance(0.2)  # the dead worker's lease runs out
    rec_live, won = live.claim(key, spec, {})
    assert won and rec_live.attempts == 2
    with pytest.raises(ClaimLost):
        dead.finish(rec_dead, SUCCEEDED)
    assert live.finish(rec_live, SUCCEEDED).state == SUCCEEDED


def test_a_stalled_worker_whose_job_was_taken_over_publishes_nothing(seaweed, segmenter, unique_prefix,
                                                                     tmp_path):
    """Its lease lapsed while it computed and another worker took the job: it must not replace the new
    holder's outputs and job.json with its own, and it reports the job as running elsewhere."""
    from serve.records_schema import RUNNING

    class StallingEngine(SegmenterEngine):
        def segment_file(self, path, spec, outdir):
            time.sleep(0.7)  # past the 0.5 s lease, before the first renewal (every 1 s at the least)
            other = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings, owner="other", lease_s=60.0)
            assert other.claim(*taken)[1]
            time.sleep(1.5)  # the stalled worker's renewal meets the new holder's claim
            return super().segment_file(path, spec, outdir)

    spec = spec_for(unique_prefix, "stall.nii.gz")
    put_volume(seaweed.settings, spec.input_uri, tmp_path)
    runner = JobRunner(JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings, lease_s=0.5),
                       StallingEngine(segmenter), seaweed.settings, work_dir=tmp_path)
    full, key, models = runner.key_for(spec)
    taken = (key, full, models)
    out = runner.run(spec)
    assert out.state == RUNNING and not out.computed
    assert keys_under(seaweed, "outbox", f"{unique_prefix}/site-a/stall/") == []
    [rec] = [r for r in JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings).list() if r.key == key]
    assert rec.owner == "other" and rec.state == "running"


@pytest.mark.parametrize("body", [b'{"key": "k", "sta', b"[]", b"", b'{"key": "k", "state": "running", "spec": {}, '
                                  b'"models": {}, "output_prefix": "s3://o/", "lease_until": "2030-01-01"}'])
def test_unreadable_record_is_taken_over_not_fatal(seaweed, unique_prefix, body):
    """A truncated, edited or foreign job record must not crash every claim: it reads as absent (it carries
    no MAC of this server), and a claim replaces it."""
    spec = JobSpec(f"s3://inbox/{unique_prefix}/z.nii", "s3://outbox/o", etag='"1"')
    key = idempotency_key(spec, {})
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    store.client.put_object(Bucket="jobs", Key=f"{unique_prefix}/jobs/{key}.json", Body=body)
    assert store.get(key) is None and store.list() == []
    rec, won = store.claim(key, spec, {})
    assert won and rec.attempts == 1 and store.finish(rec, SUCCEEDED).state == SUCCEEDED
    assert store.get(key).state == SUCCEEDED


def test_a_signed_record_of_another_format_is_taken_over_not_fatal(seaweed, unique_prefix):
    """Signed here but not in this version's format (a field of the wrong type): failed and retryable."""
    spec = JobSpec(f"s3://inbox/{unique_prefix}/z.nii", "s3://outbox/o", etag='"1"')
    key = idempotency_key(spec, {})
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    okey = f"{unique_prefix}/jobs/{key}.json"
    body = {"key": key, "state": "running", "spec": {}, "models": {}, "output_prefix": "s3://o/",
            "lease_until": "2030-01-01"}
    staging.put_json(store.signer.seal(body, bucket="jobs", key=okey, site=""), f"s3://jobs/{okey}", seaweed.settings)
    seen = store.get(key)
    assert seen.state == FAILED and seen.retryable and "unreadable" in seen.error["detail"]
    assert [r.state for r in store.list()] == [FAILED]
    rec, won = store.claim(key, spec, {})
    assert won and rec.attempts == 1 and store.finish(rec, SUCCEEDED).state == SUCCEEDED


def audited(caplog, event: str) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records
            if r.name == "mriseg.audit" and json.loads(r.getMessage())["event"] == event]


@pytest.mark.parametrize("forgery", ["unsigned", "other key", "replayed"])
def test_a_forged_running_record_does_not_block_the_job(seaweed, unique_prefix, forgery, caplog):
    """Issue #34: job keys are predictable, and a site that can write in the jobs prefix planted a
    ``running`` record with a day-long lease at another site's job key. Unsigned (as records were before),
    signed with another key, or a genuine record of another job copied there: it reads as absent, is
    audited, and the claim replaces it (If-Match on its ETag)."""
    spec = JobSpec(f"s3://inbox/{unique_prefix}/victim.nii", "s3://outbox/o", "site-b", etag='"1"')
    key = idempotency_key(spec, {})
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    okey = f"{unique_prefix}/jobs/{key}.json"
    body = JobRecord(key, "running", spec.to_dict(), {}, spec.output_prefix, owner="site-a",
                     lease_until=time.time() + 86400).to_json()
    if forgery == "unsigned":
        doc = body
    elif forgery == "other key":
        doc = RecordSigner(os.urandom(32)).seal(body, bucket="jobs", key=okey, site="site-b")
    else:  # a live claim of the forger's own job, its bytes copied to the victim's key
        own = dataclasses.replace(spec, input_uri=f"s3://inbox/{unique_prefix}/own.nii", site="site-a")
        own_key = idempotency_key(own, {})
        assert store.claim(own_key, own, {})[1]
        doc = json.loads(store.client.get_object(Bucket="jobs", Key=f"{unique_prefix}/jobs/{own_key}.json")["Body"]
                         .read())
    staging.put_json(doc, f"s3://jobs/{okey}", seaweed.settings)
    with caplog.at_level(logging.INFO, logger="mriseg.audit"):
        rec, won = store.claim(key, spec, {})
    assert won and rec.owner == store.owner and rec.attempts == 1
    assert store.get(key).owner == store.owner  # what is stored now is the real, signed claim
    [line] = audited(caplog, "record.rejected")[:1]
    assert line["kind"] == "job" and line["bucket"] == "jobs" and unique_prefix not in json.dumps(line)


def test_corrupt_input_fails_once_with_error_job_json(seaweed, runner, unique_prefix):
    spec = spec_for(unique_prefix, "broken.nii.gz")
    staging.put_bytes(b"\x1f\x8b this is not a gzip stream", spec.input_uri, seaweed.settings)
    out = runner.run(spec)
    assert out.state == FAILED and not out.retryable and out.error["status"] == 422
    doc = json.loads(staging.download_bytes(out.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "failed" and doc["error"]["status"] == 422
    OutputRecord.model_validate(doc)
    again = runner.run(spec)
    assert again.state == FAILED and not again.computed and runner.engine.calls == 0


def test_a_job_that_cannot_start_leaves_its_reason_but_never_over_a_result(seaweed, runner, unique_prefix,
                                                                          tmp_path):
    """The input is gone before its event is handled: the message is acknowledged, so job.json keeps the why."""
    gone = spec_for(unique_prefix, "deleted.nii.gz")
    out = runner.run(gone)
    assert out.state == FAILED and not out.retryable and out.error["status"] == 404
    doc = json.loads(staging.download_bytes(out.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "failed" and doc["error"]["status"] == 404 and doc["job_key"] is None
    OutputRecord.model_validate(doc)
    assert doc["input"]["uri"] == gone.input_uri and doc["case"] == "deleted"
    # a case already done keeps its job.json when a later event for it cannot start
    done = spec_for(unique_prefix, "case9.nii.gz")
    put_volume(seaweed.settings, done.input_uri, tmp_path, seed=9)
    assert runner.run(done).state == SUCCEEDED
    seaweed.client().delete_object(Bucket="inbox", Key=f"{unique_prefix}/in/case9.nii.gz")
    again = runner.run(dataclasses.replace(done, etag=None))
    assert again.state == FAILED and again.error["status"] == 404
    doc = json.loads(staging.download_bytes(again.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "succeeded"


def test_wrong_credentials_is_a_clear_job_error(seaweed, segmenter, unique_prefix, tmp_path):
    spec = spec_for(unique_prefix, "case3.nii.gz")
    put_volume(seaweed.settings, spec.input_uri, tmp_path)
    bad = seaweed.settings.model_copy(update={"secret_access_key": "wrong"})
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    out = JobRunner(store, SegmenterEngine(segmenter), bad).run(spec)
    assert out.state == FAILED and out.error["status"] == 403 and not out.retryable
    assert "inbox" in out.error["detail"] and "case3" not in out.error["detail"]


def test_moto_honours_the_conditional_writes_too(moto, unique_prefix):
    """The event tests keep job records in moto: its S3 must answer 412 to both conditions."""
    moto.client().create_bucket(Bucket="jobs-cond")
    spec = JobSpec(f"s3://inbox/{unique_prefix}/z.nii", "s3://outbox/o", etag='"1"')
    key = idempotency_key(spec, {})
    a = JobStore(f"s3://jobs-cond/{unique_prefix}", moto.settings, lease_s=60)
    b = JobStore(f"s3://jobs-cond/{unique_prefix}", moto.settings, lease_s=60)
    rec, won = a.claim(key, spec, {})
    assert won and b.claim(key, spec, {})[1] is False
    stale = dataclasses.replace(rec)
    a.renew(rec)  # changes the record's ETag
    with pytest.raises(ClaimLost):
        a.finish(stale, SUCCEEDED)


def test_pushed_jobs_outlive_the_replica_that_accepted_them(seaweed, segmenter, unique_prefix, tmp_path):
    """A push answered 202 is held in S3 first: a replica that dies with it queued loses nothing."""
    from serve.jobs.intake import IntakeWorker
    from serve.jobs.intake_settings import IntakeSettings

    settings = IntakeSettings(jobs=f"s3://jobs/{unique_prefix}", lease_s=4.0, concurrency=1, s3=seaweed.settings)

    def worker() -> IntakeWorker:
        store = JobStore(settings.jobs, seaweed.settings, lease_s=settings.lease_s)
        return IntakeWorker(settings, runner=JobRunner(store, SegmenterEngine(segmenter), seaweed.settings,
                                                       work_dir=tmp_path))

    specs = [spec_for(unique_prefix, f"pushed{i}.nii.gz") for i in range(3)]
    for i, s in enumerate(specs):
        put_volume(seaweed.settings, s.input_uri, tmp_path, seed=20 + i)
    dying = worker()
    dying.stop.set()  # no sweeps: what it held must be found by the next replica
    assert dying.submit([s.to_dict() for s in specs]) == 3
    dying.scheduler.close()  # the replica dies with the rest still queued
    deadline = time.monotonic() + 120  # hang guard only: the job it was running finishes (or not) first
    while dying.scheduler.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    held = dying.journal.held()
    assert 2 <= len(held) <= 3
    seaweed.client().put_object(Bucket="jobs", Key=f"{unique_prefix}/pushed/garbage.json", Body=b"{trunc")

    fresh = worker()
    try:
        deadline = time.monotonic() + 300  # hang guard only
        while fresh.journal.held() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fresh.journal.held() == []
    finally:
        fresh.close()
    for s in specs:
        doc = json.loads(staging.download_bytes(s.output_prefix + "job.json", settings=seaweed.settings))
        assert doc["status"] == "succeeded", s.case
    assert f"{unique_prefix}/pushed/garbage.json.unsigned" in keys_under(seaweed, "jobs", f"{unique_prefix}/pushed/")


# -- issue #34: held pushes, made-up ETags, stale results ------------------------------------------------
@pytest.mark.parametrize("forgery", ["unsigned", "forged"])
def test_a_forged_held_push_is_set_aside_never_run(seaweed, unique_prefix, forgery, caplog):
    """Issue #34: a held push written by a site (naming another site's object) was run by the intake.
    Unsigned (as held pushes were before), signed with another key, or a genuine one of another object
    copied to another id: set aside, audited, never returned to run."""
    journal = PushJournal(f"s3://jobs/{unique_prefix}", seaweed.settings)
    mine = journal.hold(spec_for(unique_prefix, "mine.nii.gz"))
    theirs = JobSpec("s3://inbox/site-b/in/secret.nii.gz", f"s3://outbox/{unique_prefix}", "site-a")
    body = {"spec": theirs.to_dict(), "attempts": 0, "created": 0.0, "not_before": 0.0}
    pushed = f"{unique_prefix}/pushed/"
    if forgery == "unsigned":
        staging.put_json(body, f"s3://jobs/{pushed}planted.json", seaweed.settings)
    else:
        staging.put_json(RecordSigner(os.urandom(32)).seal(body, bucket="jobs", key=f"{pushed}planted.json",
                                                           site="site-a"), f"s3://jobs/{pushed}planted.json",
                         seaweed.settings)
        genuine = seaweed.client().get_object(Bucket="jobs", Key=f"{pushed}{mine.id}.json")["Body"].read()
        seaweed.client().put_object(Bucket="jobs", Key=f"{pushed}replayed.json", Body=genuine)
    with caplog.at_level(logging.INFO, logger="mriseg.audit"):
        assert [(h.id, h.spec.input_uri) for h in journal.held()] == [(mine.id, mine.spec.input_uri)]
    left = keys_under(seaweed, "jobs", pushed)
    aside = ["planted"] if forgery == "unsigned" else ["planted", "replayed"]
    assert left == sorted([f"{pushed}{mine.id}.json"] + [f"{pushed}{n}.json.{forgery}" for n in aside])
    reasons = sorted(line["reason"] for line in audited(caplog, "record.rejected"))
    assert reasons == (["unsigned"] if forgery == "unsigned" else ["bad mac", "bad mac"])


def test_an_oversized_record_or_one_whose_checksum_lies_is_a_forgery_not_fatal(seaweed, unique_prefix,
                                                                             caplog):
    """Whoever can write in the jobs prefix must not stop every sweep (a held record whose checksum
    metadata lies failed the verified download of each listing) nor make a worker read gigabytes into
    memory: both are audited and treated as forgeries."""
    journal = PushJournal(f"s3://jobs/{unique_prefix}", seaweed.settings)
    mine = journal.hold(spec_for(unique_prefix, "mine.nii.gz"))
    pushed = f"{unique_prefix}/pushed/"
    c = seaweed.client()
    c.put_object(Bucket="jobs", Key=f"{pushed}lying.json", Body=b"{}", Metadata={"sha256": "0" * 64})
    c.put_object(Bucket="jobs", Key=f"{pushed}huge.json", Body=b" " * ((1 << 20) + 1))
    spec = JobSpec(f"s3://inbox/{unique_prefix}/big.nii", "s3://outbox/o", etag='"1"')
    key = idempotency_key(spec, {})
    c.put_object(Bucket="jobs", Key=f"{unique_prefix}/jobs/{key}.json", Body=b" " * ((1 << 20) + 1))
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    with caplog.at_level(logging.INFO, logger="mriseg.audit"):
        assert [h.id for h in journal.held()] == [mine.id]
        assert store.claim(key, spec, {})[1]
    assert keys_under(seaweed, "jobs", pushed) == [f"{pushed}{mine.id}.json"]
    assert sorted((line["kind"], line["reason"]) for line in audited(caplog, "record.rejected")) == [
        ("job", "oversized"), ("push", "checksum"), ("push", "oversized")]


def test_a_held_push_is_a_mriseg_push_1_and_one_without_a_format_still_runs(seaweed, unique_prefix):
    """Held pushes name their format; one held before formats (its body has no ``format``) is run as before."""
    journal = PushJournal(f"s3://jobs/{unique_prefix}", seaweed.settings)
    mine = journal.hold(spec_for(unique_prefix, "mine.nii.gz"))
    key = f"{unique_prefix}/pushed/{mine.id}.json"
    body = json.loads(seaweed.client().get_object(Bucket="jobs", Key=key)["Body"].read())["body"]
    assert body["format"] == PUSH_FORMAT and PushRecord.model_validate(body).spec == mine.spec.to_dict()
    old = journal.hold(spec_for(unique_prefix, "old.nii.gz"))
    old_key = f"{unique_prefix}/pushed/{old.id}.json"
    legacy = {"spec": old.spec.to_dict(), "attempts": 2, "created": 1.0, "not_before": 0.0}
    staging.put_json(journal.signer.seal(legacy, bucket="jobs", key=old_key, site="site-a"), f"s3://jobs/{old_key}",
                     seaweed.settings)
    assert [(h.id, h.spec, h.attempts) for h in journal.held()] == [(old.id, old.spec, 2), (mine.id, mine.spec, 0)]


def test_a_held_push_of_a_newer_format_is_neither_run_nor_set_aside(seaweed, unique_prefix, caplog):
    """A ``mriseg.push/2`` (a newer replica's, in a mixed-version rollout) is left for that version: not run
    here, not removed from ``pushed/``, and the log says why."""
    journal = PushJournal(f"s3://jobs/{unique_prefix}", seaweed.settings)
    mine = journal.hold(spec_for(unique_prefix, "mine.nii.gz"))
    theirs = journal.hold(spec_for(unique_prefix, "theirs.nii.gz"))
    key = f"{unique_prefix}/pushed/{theirs.id}.json"
    newer = {"format": "mriseg.push/2", "spec": theirs.spec.to_dict(), "lease": "a newer version's member"}
    staging.put_json(journal.signer.seal(newer, bucket="jobs", key=key, site="site-a"), f"s3://jobs/{key}",
                     seaweed.settings)
    with caplog.at_level(logging.ERROR, logger="serve.jobs.pushes"):
        assert [h.id for h in journal.held()] == [mine.id]
    assert keys_under(seaweed, "jobs", f"{unique_prefix}/pushed/") == sorted(
        [f"{unique_prefix}/pushed/{mine.id}.json", key])
    assert "mriseg.push/2" in caplog.text and "newer mriseg-serve" in caplog.text


def test_pushes_of_one_object_hold_one_job_the_latest(seaweed, unique_prefix):
    """Issue #34: N pushes with N made-up ETags for one object made N held jobs (each then claimed and each
    downloading the object). Now they hold one, the latest push's; a run of an earlier push that settles
    (or not) neither removes nor rewrites it, so it runs at the next sweep."""
    spec = spec_for(unique_prefix, "flood.nii.gz")
    journal = PushJournal(f"s3://jobs/{unique_prefix}", seaweed.settings)
    pushes = [journal.hold(dataclasses.replace(spec, etag=f'"{i:032x}"')) for i in range(12)]
    [held] = journal.held()
    assert held.spec.etag == pushes[-1].spec.etag and held.id == pushes[0].id
    assert journal.hold(dataclasses.replace(spec, site="site-b")).id != held.id  # per site, bucket and key
    journal.attempted(pushes[0], 60.0)
    journal.deferred(pushes[0], time.time() + 60.0)
    journal.release(pushes[0])
    [again] = [h for h in journal.held() if h.id == held.id]
    assert (again.spec.etag, again.attempts, again.not_before) == (pushes[-1].spec.etag, 0, 0.0)
    journal.attempted(again, 60.0)  # the latest push's own run: counted
    journal.release(again)
    assert [h.spec.site for h in journal.held()] == ["site-b"]


def _counting_gets(settings, key: str) -> tuple[object, list[str]]:
    """Settings of a client of their own whose GetObject calls of ``key`` are counted (real requests to the
    real server, observed through botocore's event hooks)."""
    own = settings.model_copy(update={"read_timeout_s": settings.read_timeout_s + 0.5})
    gets: list[str] = []
    staging.client_for(own).meta.events.register(
        "provide-client-params.s3.GetObject",
        lambda params, **_: gets.append(params["Key"]) if params.get("Key") == key else None)
    return own, gets


def test_a_made_up_etag_is_never_claimed_or_read(seaweed, segmenter, unique_prefix, tmp_path):
    """Issue #34: each push with a made-up ETag was claimed and downloaded the object (up to 1 GiB) before
    the ETag check. Now the run HEADs the object first, finds another ETag and fails 412: no claim, no GET,
    nothing published."""
    spec = spec_for(unique_prefix, "fake.nii.gz")
    put_volume(seaweed.settings, spec.input_uri, tmp_path)
    settings, gets = _counting_gets(seaweed.settings, f"{unique_prefix}/in/fake.nii.gz")
    store = JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings)
    engine = SegmenterEngine(segmenter)
    runner = JobRunner(store, engine, settings, work_dir=tmp_path)
    out = runner.run(dataclasses.replace(spec, etag=f'"{1:032x}"'))
    assert out.state == FAILED and out.error["status"] == 412 and not out.retryable and not out.computed
    assert gets == [] and engine.calls == 0
    assert keys_under(seaweed, "jobs", f"{unique_prefix}/jobs/") == []  # nothing was claimed
    assert keys_under(seaweed, "outbox", f"{unique_prefix}/") == []      # nor published
    # the object's real version runs (and is read once)
    assert runner.run(spec).state == SUCCEEDED and len(gets) == 1


def test_an_older_versions_result_never_replaces_a_newer_ones(seaweed, segmenter, unique_prefix, tmp_path):
    """Issue #34: version 1's job was slow; the object was re-uploaded and version 2's job published; then
    version 1's job finished and published over it. Now it publishes nothing (412) and the case folder
    shows version 2."""
    spec = spec_for(unique_prefix, "race.nii.gz")
    v1 = put_volume(seaweed.settings, spec.input_uri, tmp_path, seed=1)
    entered, go = threading.Event(), threading.Event()

    class Gated(SegmenterEngine):
        def segment_file(self, path, job, outdir):
            if job.etag == v1.etag:  # version 1's job waits here, its input already read
                entered.set()
                assert go.wait(120)
            return super().segment_file(path, job, outdir)

    runner = JobRunner(JobStore(f"s3://jobs/{unique_prefix}", seaweed.settings), Gated(segmenter),
                       seaweed.settings, work_dir=tmp_path)
    first: list = []
    t = threading.Thread(target=lambda: first.append(runner.run(dataclasses.replace(spec, etag=v1.etag))))
    t.start()
    try:
        assert entered.wait(120)
        v2 = put_volume(seaweed.settings, spec.input_uri, tmp_path, seed=2)
        second = runner.run(dataclasses.replace(spec, etag=v2.etag))
        assert second.state == SUCCEEDED and second.output_prefix == spec.output_prefix
        seg = staging.download_bytes(spec.output_prefix + "segmentation.nii.gz", settings=seaweed.settings)
    finally:
        go.set()
        t.join()
    [late] = first
    assert late.state == FAILED and late.error["status"] == 412 and not late.retryable
    doc = json.loads(staging.download_bytes(spec.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "succeeded" and doc["input"]["etag"] == v2.etag and doc["job_key"] == second.key
    assert staging.download_bytes(spec.output_prefix + "segmentation.nii.gz", settings=seaweed.settings) == seg
    assert not [k for k in keys_under(seaweed, "outbox", f"{unique_prefix}/") if "/runs/" in k]


def test_a_job_json_this_server_did_not_sign_is_never_replaced(seaweed, runner, unique_prefix, tmp_path,
                                                               caplog):
    """The case folder lies where the site may write: a job.json there without a valid MAC (written before
    records were signed, or by the site) is someone else's, whatever it says; the job publishes beside it."""
    spec = spec_for(unique_prefix, "planted.nii.gz")
    put_volume(seaweed.settings, spec.input_uri, tmp_path)
    full, key, _ = runner.key_for(spec)
    planted = {"status": "failed", "job_key": key, "site": "site-a", "input": {"uri": spec.input_uri}}
    staging.put_json(planted, spec.output_prefix + "job.json", seaweed.settings)
    with caplog.at_level(logging.INFO, logger="mriseg.audit"):
        out = runner.run(spec)
    assert out.state == SUCCEEDED and out.output_prefix == f"{spec.output_prefix}runs/{key[:16]}/"
    assert json.loads(staging.download_bytes(spec.output_prefix + "job.json", settings=seaweed.settings)) == planted
    assert [line["kind"] for line in audited(caplog, "record.rejected")] == ["job.json"]
    doc = json.loads(staging.download_bytes(out.output_prefix + "job.json", settings=seaweed.settings))
    assert doc["status"] == "succeeded" and doc["job_key"] == key and len(doc["mac"]) == 64
