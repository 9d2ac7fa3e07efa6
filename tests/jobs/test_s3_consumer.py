"""S3 -> SQS -> consumer -> outputs, against a real moto_server (S3 notifications, SQS redrive)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from serve.jobs.consumer import Consumer, ConsumerConfig
from serve.jobs.engine import SegmenterEngine
from serve.jobs.rules import InboxRule
from serve.jobs.runner import JobRunner
from serve.jobs.sqs import configure_notifications, create_queue_with_dlq
from serve.jobs.store import JobStore
from serve.records_schema import FAILED, SUCCEEDED
from tests.helpers.volumes import body_volume

pytestmark = pytest.mark.s3

ROI = ("liver",)


def volume_bytes(seed: int = 0) -> bytes:
    import nibabel as nib

    vol = body_volume("LPS", shape=(16, 16, 12), spacing=(1.5, 1.5, 1.5), seed=seed)
    img = nib.Nifti1Image(vol.data, vol.affine)
    return gzip_nifti(img)


def gzip_nifti(img) -> bytes:
    import gzip

    raw = io.BytesIO()
    raw.write(img.to_bytes())
    return gzip.compress(raw.getvalue())


@dataclasses.dataclass
class Env:
    inbox: str
    outbox: str
    jobs: str
    queue_url: str
    dlq_url: str
    config: ConsumerConfig


def make_env(moto, max_receives: int = 3, visibility: int = 30, heartbeat: float = 5.0,
             outputs: tuple[str, ...] = ("multilabel", "statistics", "preview")) -> Env:
    tag = uuid.uuid4().hex[:8]
    s3, sqs = moto.client(), moto.sqs()
    inbox, outbox, jobs = f"inbox-{tag}", f"outbox-{tag}", f"jobs-{tag}"
    for b in (inbox, outbox, jobs):
        s3.create_bucket(Bucket=b)
    queue_url, dlq_url = create_queue_with_dlq(sqs, f"mriseg-{tag}", max_receives, visibility)
    configure_notifications(s3, sqs, inbox, queue_url, ["site-a/in/"])
    # S3 announces a new notification configuration with an s3:TestEvent; the consumer must skip it
    rule = InboxRule(bucket=inbox, prefix="site-a/in/", site="site-a", output_root=f"s3://{outbox}/results",
                     roi_subset=ROI, outputs=outputs)
    cfg = ConsumerConfig(queue_url=queue_url, rules=[rule], sqs=moto.settings, dlq_url=dlq_url, wait_time_s=1,
                         visibility_timeout_s=visibility, heartbeat_s=heartbeat)
    return Env(inbox, outbox, jobs, queue_url, dlq_url, cfg)


def queue_counts(sqs, url: str) -> tuple[int, int]:
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                                               "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def drain(consumer: Consumer, polls: int = 20) -> None:
    empty = 0
    for _ in range(polls):
        n = consumer.poll_once(wait_time_s=1)
        empty = empty + 1 if n == 0 else 0
        if empty >= 2:
            return


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_upload_event_output_and_duplicate_not_recomputed(moto, segmenter, tmp_path):
    env = make_env(moto)
    s3, sqs = moto.client(), moto.sqs()
    engine = SegmenterEngine(segmenter)
    runner = JobRunner(JobStore(f"s3://{env.jobs}", moto.settings), engine, moto.settings, work_dir=tmp_path)
    consumer = Consumer(env.config, runner.run, sqs)
    data = volume_bytes()
    s3.put_object(Bucket=env.inbox, Key="site-a/in/sub 1/case+01.nii.gz", Body=data)
    s3.put_object(Bucket=env.inbox, Key="site-a/in/notes.txt", Body=b"not a volume")
    s3.put_object(Bucket=env.inbox, Key="elsewhere/x.nii.gz", Body=data)  # not a notified prefix
    drain(consumer)
    assert engine.calls == 1
    prefix = "results/site-a/sub 1/case+01/"
    assert keys(s3, env.outbox) == [prefix + n for n in ("job.json", "preview.png", "segmentation.nii.gz",
                                                         "statistics.json")]
    doc = json.loads(s3.get_object(Bucket=env.outbox, Key=prefix + "job.json")["Body"].read())
    assert doc["status"] == "succeeded" and doc["site"] == "site-a" and doc["input"]["etag"]

    # the output equals a direct in-process segmentation of the same file
    import nibabel as nib
    from serve.imaging.volume_io import read_volume

    src, out = tmp_path / "in.nii.gz", tmp_path / "seg.nii.gz"
    src.write_bytes(data)
    out.write_bytes(s3.get_object(Bucket=env.outbox, Key=prefix + "segmentation.nii.gz")["Body"].read())
    direct = segmenter.segment(read_volume(src), roi_subset=list(ROI))
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), direct.labels)
    assert direct.labels.any()

    # a duplicate delivery of the same object version: acknowledged, not recomputed
    head = s3.head_object(Bucket=env.inbox, Key="site-a/in/sub 1/case+01.nii.gz")
    dup = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": env.inbox}, "object": {
        "key": "site-a/in/sub+1/case%2B01.nii.gz", "eTag": head["ETag"].strip('"')}}}]}
    sqs.send_message(QueueUrl=env.queue_url, MessageBody=json.dumps(dup))
    drain(consumer)
    assert engine.calls == 1
    assert queue_counts(sqs, env.queue_url) == (0, 0) and queue_counts(sqs, env.dlq_url) == (0, 0)


def test_corrupt_object_gets_error_job_json_and_no_loop(moto, segmenter, tmp_path):
    env = make_env(moto, max_receives=2)
    s3, sqs = moto.client(), moto.sqs()
    engine = SegmenterEngine(segmenter)
    runner = JobRunner(JobStore(f"s3://{env.jobs}", moto.settings), engine, moto.settings, work_dir=tmp_path)
    consumer = Consumer(env.config, runner.run, sqs)
    s3.put_object(Bucket=env.inbox, Key="site-a/in/bad.nii.gz", Body=b"\x1f\x8bgarbage, not a volume")
    drain(consumer)
    doc = json.loads(s3.get_object(Bucket=env.outbox, Key="results/site-a/bad/job.json")["Body"].read())
    assert doc["status"] == "failed" and doc["error"]["status"] == 422 and not doc["error"]["retryable"]
    [rec] = JobStore(f"s3://{env.jobs}", moto.settings).list()
    assert rec.state == FAILED and rec.attempts == 1
    assert queue_counts(sqs, env.queue_url) == (0, 0) and queue_counts(sqs, env.dlq_url) == (0, 0)


def test_unprocessable_message_is_redriven_to_dlq(moto, segmenter, tmp_path):
    env = make_env(moto, max_receives=2, visibility=1)
    sqs = moto.sqs()
    consumer = Consumer(env.config, lambda spec: pytest.fail("nothing to submit"), sqs)
    drain(consumer)  # the s3:TestEvent S3 sent when notifications were configured: acknowledged
    assert queue_counts(sqs, env.queue_url) == (0, 0)
    sqs.send_message(QueueUrl=env.queue_url, MessageBody="{not json")
    received = 0
    for _ in range(15):
        received += consumer.poll_once(wait_time_s=1)
        if queue_counts(sqs, env.dlq_url)[0] == 1:
            break
        time.sleep(0.5)
    assert received == 2
    assert queue_counts(sqs, env.dlq_url)[0] == 1 and queue_counts(sqs, env.queue_url) == (0, 0)
    consumer.update_dlq_gauge()
    assert consumer.dlq_gauge._value.get() == 1


def _spawn(cfg_path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "serve.jobs.consumer", "--config", str(cfg_path)],
                            stdout=open(str(cfg_path) + ".log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def _wait_for(cond, what: str, limit_s: float = 400.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + limit_s  # a hang guard, not a performance assertion
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"consumer exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_consumer_killed_mid_batch_then_restarted_finishes_each_once(moto, tiny_models, tmp_path):
    env = make_env(moto, max_receives=10, visibility=6, heartbeat=2.0, outputs=("multilabel",))
    s3, sqs = moto.client(), moto.sqs()
    cfg = {"consumer": {**env.config.model_dump(), "sqs": moto.settings.model_dump()},
           "runner": {"models": [str(tiny_models)], "jobs": f"s3://{env.jobs}", "device": "cpu",
                      "s3": moto.settings.model_dump(), "lease_s": 6.0}}
    cfg["consumer"]["rules"] = [{**r.model_dump(), "roi_subset": list(r.roi_subset), "outputs": list(r.outputs)}
                                for r in env.config.rules]
    cfg_path = tmp_path / "consumer.json"
    cfg_path.write_text(json.dumps(cfg))
    n = 30
    for i in range(n):
        s3.put_object(Bucket=env.inbox, Key=f"site-a/in/case{i:02d}.nii.gz", Body=volume_bytes(i))

    def done_cases() -> set[str]:
        return {k.split("/")[2] for k in keys(s3, env.outbox, "results/site-a/") if k.endswith("/job.json")}

    first = _spawn(cfg_path)
    try:
        _wait_for(lambda: len(done_cases()) >= 5, "the first outputs", proc=first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # abrupt: no cleanup, a claim and a message left in flight
        first.wait()
    assert len(done_cases()) < n, "the consumer finished before it could be killed mid-batch"

    second = _spawn(cfg_path)
    try:
        _wait_for(lambda: len(done_cases()) == n and queue_counts(sqs, env.queue_url) == (0, 0),
                  "all outputs and an empty queue", proc=second)
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()

    all_keys = keys(s3, env.outbox)
    for i in range(n):
        case = f"results/site-a/case{i:02d}/"
        mine = [k[len(case):] for k in all_keys if k.startswith(case)]
        assert sorted(mine) == ["job.json", "segmentation.nii.gz"], mine
        doc = json.loads(s3.get_object(Bucket=env.outbox, Key=case + "job.json")["Body"].read())
        assert doc["status"] == "succeeded"
    records = JobStore(f"s3://{env.jobs}", moto.settings).list()
    assert len(records) == n and all(r.state == SUCCEEDED for r in records)
    assert queue_counts(sqs, env.dlq_url) == (0, 0)


def test_standalone_consumer_serves_its_dlq_gauge(moto, tiny_models, tmp_path):
    import httpx

    from tests.helpers.stack import free_port

    env = make_env(moto)
    moto.sqs().send_message(QueueUrl=env.dlq_url, MessageBody="a dead letter")
    cfg = {"consumer": {**env.config.model_dump(), "sqs": moto.settings.model_dump(), "rules": [],
                        "wait_time_s": 1},
           "runner": {"models": [str(tiny_models)], "jobs": f"s3://{env.jobs}", "device": "cpu",
                      "s3": moto.settings.model_dump()}}
    cfg_path = tmp_path / "consumer.json"
    cfg_path.write_text(json.dumps(cfg))
    port = free_port()
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "serve.jobs.consumer", "--config", str(cfg_path),
                             "--metrics-port", str(port)], stdout=open(str(cfg_path) + ".log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=env_vars)

    def gauge_is_one() -> bool:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return False
        return any(line.startswith("mriseg_dlq_messages ") and float(line.split()[1]) == 1.0
                   for line in text.splitlines())

    try:
        _wait_for(gauge_is_one, "mriseg_dlq_messages 1.0 at /metrics", limit_s=120, proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_job_whose_worker_died_is_run_once_its_claim_lapses_not_sent_to_the_dlq(moto, segmenter, tmp_path):
    """A worker took the message, claimed the job and died. Its message comes back while the dead claim still
    looks alive: it is hidden until the claim lapses, then the job is claimed again and done -- not moved to
    the DLQ by looking at a job that stays 'running' for ever."""
    from serve.jobs.rules import specs_for_events
    from serve.jobs.events import parse_message

    env = make_env(moto, max_receives=3, visibility=2, heartbeat=1.0, outputs=("multilabel",))
    s3, sqs = moto.client(), moto.sqs()
    engine = SegmenterEngine(segmenter)
    runner = JobRunner(JobStore(f"s3://{env.jobs}", moto.settings, lease_s=8.0), engine, moto.settings,
                       work_dir=tmp_path)
    consumer = Consumer(env.config, runner.run, sqs)
    drain(consumer, polls=3)  # the s3:TestEvent
    s3.put_object(Bucket=env.inbox, Key="site-a/in/case.nii.gz", Body=volume_bytes())

    # the worker that dies: receives the message (not deleted), claims the job, is gone
    deadline = time.monotonic() + 30
    msgs: list = []
    while not msgs and time.monotonic() < deadline:
        msgs = sqs.receive_message(QueueUrl=env.queue_url, WaitTimeSeconds=1, VisibilityTimeout=2).get("Messages", [])
    [spec], _ = specs_for_events(parse_message(msgs[0]["Body"]), env.config.rules)
    spec, key, models = runner.key_for(spec)
    _, mine = JobStore(f"s3://{env.jobs}", moto.settings, owner="dead-worker", lease_s=8.0).claim(key, spec, models)
    assert mine

    job_json = "results/site-a/case/job.json"
    deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
    while job_json not in keys(s3, env.outbox) and time.monotonic() < deadline:
        consumer.poll_once(wait_time_s=1)
    assert queue_counts(sqs, env.dlq_url) == (0, 0), "the message went to the DLQ while the dead claim lasted"
    assert json.loads(s3.get_object(Bucket=env.outbox, Key=job_json)["Body"].read())["status"] == "succeeded"
    assert engine.calls == 1
    drain(consumer, polls=4)
    assert queue_counts(sqs, env.queue_url) == (0, 0)


def test_a_replaced_corrupt_upload_gets_its_result_in_the_case_folder_and_a_stale_event_writes_nothing(
        moto, segmenter, tmp_path):
    """The error job.json a corrupt upload left is the reason that input failed, not a result to keep: the
    fixed upload's result replaces it where the site looks (not under runs/). An event whose object was
    overwritten before it ran leaves the folder to the new version's job."""
    from serve.jobs.spec import JobSpec

    env = make_env(moto, max_receives=2, outputs=("multilabel",))
    s3, sqs = moto.client(), moto.sqs()
    runner = JobRunner(JobStore(f"s3://{env.jobs}", moto.settings), SegmenterEngine(segmenter), moto.settings,
                       work_dir=tmp_path)
    consumer = Consumer(env.config, runner.run, sqs)
    job_json = "results/site-a/case/job.json"

    def status() -> str:
        return json.loads(s3.get_object(Bucket=env.outbox, Key=job_json)["Body"].read())["status"]

    s3.put_object(Bucket=env.inbox, Key="site-a/in/case.nii.gz", Body=b"\x1f\x8bgarbage, not a volume")
    drain(consumer)
    assert status() == "failed"
    s3.put_object(Bucket=env.inbox, Key="site-a/in/case.nii.gz", Body=volume_bytes())
    drain(consumer)
    assert status() == "succeeded"
    assert keys(s3, env.outbox) == ["results/site-a/case/job.json", "results/site-a/case/segmentation.nii.gz"]

    stale = JobSpec(f"s3://{env.inbox}/site-a/in/other.nii.gz", f"s3://{env.outbox}/results", "site-a",
                    etag="0" * 32, outputs=("multilabel",), input_prefix="site-a/in/")
    s3.put_object(Bucket=env.inbox, Key="site-a/in/other.nii.gz", Body=volume_bytes(1))
    out = runner.run(stale)
    assert out.state == "failed" and out.error["status"] == 412
    assert not [k for k in keys(s3, env.outbox) if k.startswith("results/site-a/other/")]


def _records_body(bucket: str, key: str) -> str:
    return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket},
                                                                             "object": {"key": key, "eTag": "e"}}}]})


def test_the_waiting_messages_of_a_batch_stay_hidden_from_another_poller(moto):
    """Three messages received at once run one after another: the later ones must not come back to a second
    poller meanwhile, which would run their jobs twice."""
    import collections
    import threading

    from serve.jobs.runner import JobOutcome

    env = make_env(moto, max_receives=5, visibility=2, heartbeat=0.5)
    sqs = moto.sqs()
    seen: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def slow(spec):  # a job of 1.5 s: three of them outlast the 2 s visibility timeout
        with lock:
            seen[spec.input_uri] += 1
        time.sleep(1.5)
        return JobOutcome("k", SUCCEEDED, spec.output_prefix, True)

    drain(Consumer(env.config, slow, sqs), polls=3)  # the s3:TestEvent
    for i in range(3):
        sqs.send_message(QueueUrl=env.queue_url, MessageBody=_records_body(env.inbox, f"site-a/in/c{i}.nii.gz"))
    first = Consumer(env.config.model_copy(update={"max_messages": 3}), slow, sqs)
    batch = threading.Thread(target=first.poll_once, kwargs={"wait_time_s": 1})
    batch.start()
    time.sleep(0.5)  # the batch is received; then a second poller joins
    stop = threading.Event()
    second = threading.Thread(target=Consumer(env.config, slow, sqs).run, args=(stop,))
    second.start()
    batch.join(timeout=60)
    deadline = time.monotonic() + 30  # a hang guard
    while queue_counts(sqs, env.queue_url) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()
    second.join(timeout=30)
    assert len(seen) == 3 and set(seen.values()) == {1}, seen


def test_the_intake_runs_as_many_queued_jobs_at_once_as_its_concurrency(moto, tmp_path):
    """One long job must not hold up every other event on the queue."""
    import threading

    from serve.jobs.intake import IntakeWorker
    from serve.jobs.intake_settings import IntakeSettings
    from serve.jobs.runner import JobOutcome

    env = make_env(moto, max_receives=5, visibility=30, heartbeat=5.0)
    sqs = moto.sqs()
    drain(Consumer(env.config, lambda spec: pytest.fail("no job yet"), sqs), polls=3)  # the s3:TestEvent
    spans: list[tuple[float, float]] = []

    class SlowRunner:
        def run(self, spec):
            t = time.monotonic()
            time.sleep(2.0)
            spans.append((t, time.monotonic()))
            return JobOutcome("k", SUCCEEDED, spec.output_prefix, True)

    for i in range(2):
        sqs.send_message(QueueUrl=env.queue_url, MessageBody=_records_body(env.inbox, f"site-a/in/c{i}.nii.gz"))
    settings = IntakeSettings(jobs=f"s3://{env.jobs}", rules=list(env.config.rules), queue=env.config,
                              concurrency=2, s3=moto.settings)
    worker = IntakeWorker(settings, runner=SlowRunner())
    try:
        deadline = time.monotonic() + 30  # a hang guard
        while len(spans) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert worker.polling and len(worker.pollers) == 2
    finally:
        worker.close()
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 < a1, "the second queued job waited for the first to finish"
