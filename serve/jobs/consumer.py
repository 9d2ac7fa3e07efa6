"""Long-poll an SQS queue of S3 object-created events and run one job per new volume.

Delivery is at-least-once and every step is safe to repeat:

- each message is received with a visibility timeout that a heartbeat thread
  extends (``ChangeMessageVisibility``) while its jobs run;
- a message is deleted only once every job it names is settled: outputs and
  ``job.json`` are in S3 (succeeded), or the input is poison (a corrupt file, a 4xx
  from S3: an error ``job.json`` is written and the message acknowledged so it
  does not loop);
- other failures (S3 down, a crash) leave the message in the queue: it comes
  back after the visibility timeout, and after ``maxReceiveCount`` receives
  the queue's RedrivePolicy moves it to the dead-letter queue;
- a job another worker is running is not acknowledged either (that worker may
  die); its message comes back once that worker's lease can have expired.

``submit(spec) -> JobOutcome`` is pluggable: :class:`serve.jobs.runner.JobRunner`
in process, or the serving layer's call into the Ray cluster.
The inbox rules are :mod:`serve.jobs.rules`; the SQS client and queue set-up, :mod:`serve.jobs.sqs`.
:func:`run_consumer` is the loop a Ray actor/deployment wraps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from prometheus_client import REGISTRY, Gauge, start_http_server
from pydantic import BaseModel, Field, StrictStr

from serve.errors import MrisegError
from serve.inference.pipeline import Segmenter
from serve.jobs.engine import SegmenterEngine
from serve.jobs.events import EventFormatError, parse_message
from serve.jobs.records import RecordSigner
from serve.jobs.rules import InboxRule, check_rules, specs_for_events
from serve.jobs.runner import JobOutcome, JobRunner
from serve.jobs.spec import JobSpec
from serve.jobs.sqs import MAX_VISIBILITY_S, make_sqs_client
from serve.jobs.store import JobStore
from serve.records_schema import FAILED, RUNNING, SUCCEEDED
from serve.settings_checks import STRICT, check, number, whole
from serve.storage.models import open_model_store
from serve.storage.s3client import S3Settings

log = logging.getLogger(__name__)

Submit = Callable[[JobSpec], JobOutcome]


class ConsumerConfig(BaseModel):
    """The SQS poller's settings (the ``events`` app arg's queue and ``sqs_options``), within SQS's own limits."""

    model_config = STRICT

    queue_url: StrictStr
    rules: list[InboxRule]
    sqs: S3Settings = Field(default_factory=S3Settings)  # endpoint/region/keys of the SQS service
    dlq_url: StrictStr | None = None           # only for the mriseg_dlq_messages gauge
    # SQS's own limits: a long poll of at most 20 s, 1-10 messages, whole seconds of visibility up to 12 h
    wait_time_s: whole(0, 20) = 20                # long poll
    visibility_timeout_s: whole(1, MAX_VISIBILITY_S) = 120
    heartbeat_s: number(0.1) = 30.0            # extend visibility this often while jobs run
    max_messages: whole(1, 10) = 1                # per receive; jobs are heavy, take one at a time

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "ConsumerConfig":
        """The poller's settings from config.

        Args:
            d: ``queue_url``, ``rules`` (mappings), ``sqs`` (S3Settings fields), ``dlq_url`` and the numbers.

        Returns:
            The checked settings.

        Raises:
            MrisegError: "events: {key} must be ...", or an unknown SQS setting.
        """
        d = dict(d)
        # the nested ones first, so their errors name their own section
        d["rules"] = check_rules([InboxRule.from_mapping(r) for r in d.get("rules", [])])
        d["sqs"] = S3Settings.from_mapping(d.get("sqs"))
        config = check(cls, d, "events", unknown_what="SQS setting")
        # here, not on the model: the tests build a config whose message reappears on purpose
        if config.heartbeat_s >= config.visibility_timeout_s:  # it would reappear before its first extension
            raise MrisegError(f"events: heartbeat_s ({config.heartbeat_s:g}) must be shorter than "
                              f"visibility_timeout_s ({config.visibility_timeout_s:g})")
        return config


def _dlq_gauge():
    try:
        return Gauge("mriseg_dlq_messages", "Messages in the S3 event dead-letter queue")
    except ValueError:  # already registered in this process
        return REGISTRY._names_to_collectors["mriseg_dlq_messages"]


class _VisibilityHeartbeat:
    """Keeps messages invisible to other consumers while their jobs run (or wait their turn in a batch).

    ``receipts`` is one receipt handle or a set of them, read at each beat (a batch's handled messages
    leave it)."""

    def __init__(self, sqs, queue_url: str, receipts: str | set[str], timeout_s: int, every_s: float):
        self.sqs, self.queue_url = sqs, queue_url
        self.receipts = {receipts} if isinstance(receipts, str) else receipts
        self.timeout_s, self.every_s = timeout_s, every_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name="sqs-visibility")

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for receipt in list(self.receipts):
                try:
                    self.sqs.change_message_visibility(QueueUrl=self.queue_url, ReceiptHandle=receipt,
                                                       VisibilityTimeout=self.timeout_s)
                except Exception:  # the next beat may get through; worst case the message is redelivered
                    log.warning("could not extend a message's visibility", exc_info=True)


def _until(epoch_s: float | None) -> float:
    """Seconds from now until ``epoch_s`` (plus one, to be past it), 0 if unknown or past."""
    return max(0.0, epoch_s - time.time() + 1) if epoch_s else 0.0


@dataclass
class MessageResult:
    deleted: bool
    outcomes: list[JobOutcome]
    ignored: int = 0


class Consumer:
    """One SQS consumer; :meth:`run` until ``stop`` is set."""

    def __init__(self, config: ConsumerConfig, submit: Submit, sqs=None):
        self.config = config
        self.submit = submit
        self.sqs = sqs or make_sqs_client(config.sqs)
        self.dlq_gauge = _dlq_gauge()

    def handle(self, message: Mapping[str, Any]) -> MessageResult:
        """Run the jobs one message names; delete it when all are settled."""
        receipt = message["ReceiptHandle"]
        try:
            all_events = parse_message(message["Body"])
        except EventFormatError as e:
            # never valid later: leave it to the redrive policy, so it lands in the DLQ for a human
            log.warning("unrecognised message %s: %s", message.get("MessageId"), e.message)
            return MessageResult(False, [])
        specs, ignored = specs_for_events(all_events, self.config.rules)
        outcomes: list[JobOutcome] = []
        settled = True
        retry_after = 0.0
        with _VisibilityHeartbeat(self.sqs, self.config.queue_url, receipt, self.config.visibility_timeout_s,
                                  self.config.heartbeat_s):
            for spec in specs:
                try:
                    out = self.submit(spec)
                except Exception:
                    log.error("job submission crashed; the message will be redelivered", exc_info=True)
                    settled = False
                    continue
                outcomes.append(out)
                if out.state == RUNNING:  # claimed by another worker, or by one that died: look again
                    settled = False  # once its lease has lapsed, when a dead holder's job can be claimed
                    retry_after = max(retry_after, self.config.heartbeat_s, _until(out.lease_until))
                elif out.state == FAILED and out.retryable:
                    settled = False
                elif out.state not in (SUCCEEDED, FAILED):
                    settled = False
        if settled:
            self.sqs.delete_message(QueueUrl=self.config.queue_url, ReceiptHandle=receipt)
        elif retry_after:
            self.sqs.change_message_visibility(QueueUrl=self.config.queue_url, ReceiptHandle=receipt,
                                               VisibilityTimeout=min(MAX_VISIBILITY_S, math.ceil(retry_after)))
        return MessageResult(settled, outcomes, ignored)

    def poll_once(self, wait_time_s: int | None = None) -> int:
        """One long poll; returns the number of messages received."""
        resp = self.sqs.receive_message(
            QueueUrl=self.config.queue_url, MaxNumberOfMessages=self.config.max_messages,
            WaitTimeSeconds=self.config.wait_time_s if wait_time_s is None else wait_time_s,
            VisibilityTimeout=self.config.visibility_timeout_s, MessageSystemAttributeNames=["ApproximateReceiveCount"])
        msgs = resp.get("Messages", [])
        # the batch's later messages wait while the first run: keep them hidden too, or they would come
        # back to another consumer (and count a receive) meanwhile
        waiting = {m["ReceiptHandle"] for m in msgs[1:]}
        with _VisibilityHeartbeat(self.sqs, self.config.queue_url, waiting, self.config.visibility_timeout_s,
                                  self.config.heartbeat_s) if waiting else contextlib.nullcontext():
            for m in msgs:
                waiting.discard(m["ReceiptHandle"])
                try:
                    self.handle(m)
                except Exception:  # SQS refused a delete or visibility change: this message only comes back
                    log.error("could not settle message %s; it will be redelivered", m.get("MessageId"),
                              exc_info=True)
        return len(msgs)

    def update_dlq_gauge(self) -> None:
        if not self.config.dlq_url:
            return
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.config.dlq_url,
                                              AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
        self.dlq_gauge.set(int(attrs.get("ApproximateNumberOfMessages", 0)))

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set (checked between long polls; a poll lasts ``wait_time_s``)."""
        log.info("consumer started (%d inbox rules)", len(self.config.rules))
        while not stop.is_set():
            try:
                self.poll_once()
                self.update_dlq_gauge()
            except Exception:  # SQS down or a bug: back off, never die (the deployment restarts us only on crash)
                log.error("consumer poll failed; retrying", exc_info=True)
                stop.wait(5.0)
        log.info("consumer stopped")


def run_consumer(stop_event: threading.Event, config: ConsumerConfig | Mapping[str, Any],
                 submit: Submit | None = None, runner_config: Mapping[str, Any] | None = None) -> None:
    """The consumer loop for a Ray actor/deployment or a process. Without ``submit``,
    jobs run in this process (:func:`local_submit` from ``runner_config``)."""
    if not isinstance(config, ConsumerConfig):
        config = ConsumerConfig.from_mapping(config)
    if submit is None:
        submit = local_submit(runner_config or {})
    Consumer(config, submit).run(stop_event)


class LocalRunnerSettings(BaseModel):
    """The standalone consumer's ``runner`` section: the in-process job runner of :func:`local_submit`."""

    model_config = STRICT

    models: list[StrictStr] = Field(min_length=1)  # model sources: folders and s3:// prefixes, searched in order
    jobs: StrictStr                          # s3:// prefix of the job records
    s3: S3Settings = Field(default_factory=S3Settings)
    cache_dir: StrictStr | None = None       # where S3 model sources are copied ($MRISEG_CACHE/models)
    model_pins: StrictStr | None = None      # the operator's pinned manifest; else $MRISEG_MODEL_PINS
    device: StrictStr = "auto"
    threads: whole(1) = 1
    lease_s: number(1) = 300.0
    max_bytes: whole(1) = 1 << 30            # the largest input the runner downloads
    record_key_file: StrictStr | None = None  # the key that signs job records; else $MRISEG_RECORD_KEY_FILE

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "LocalRunnerSettings":
        """The runner's settings from the consumer's config file.

        Args:
            d: the ``runner`` mapping.

        Returns:
            The checked settings.

        Raises:
            MrisegError: "runner: {key} must be ...", or an unknown runner setting.
        """
        d = dict(d or {})
        d["s3"] = S3Settings.from_mapping(d.get("s3"))  # first, so its errors name its own section
        return check(cls, d, "runner")


def local_submit(cfg: LocalRunnerSettings | Mapping[str, Any]) -> Submit:
    """A :class:`serve.jobs.runner.JobRunner` over an in-process Segmenter.

    Args:
        cfg: the runner's settings (:class:`LocalRunnerSettings`, or its mapping).

    Returns:
        The runner's ``run``, which settles one job spec.

    Raises:
        MrisegError: a setting is wrong, or the record key is missing (reported before the models load).
    """
    if not isinstance(cfg, LocalRunnerSettings):
        cfg = LocalRunnerSettings.from_mapping(cfg)
    # before the models load: a missing key is a configuration error to report at once
    signer = RecordSigner.from_file(cfg.record_key_file) if cfg.record_key_file else RecordSigner.from_env()
    store = open_model_store(cfg.models, cache_dir=cfg.cache_dir, s3=cfg.s3, pins=cfg.model_pins)
    seg = Segmenter(store, device=cfg.device, threads=cfg.threads)
    jobs = JobStore(cfg.jobs, cfg.s3, lease_s=cfg.lease_s, signer=signer)
    return JobRunner(jobs, SegmenterEngine(seg), cfg.s3, max_bytes=cfg.max_bytes).run


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serve.jobs.consumer --config consumer.json``: a standalone consumer process."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--config", required=True, help="JSON with 'consumer' (ConsumerConfig) and 'runner' "
                                                   "(local_submit) sections")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve this process's Prometheus metrics (mriseg_dlq_messages) on this port")
    p.add_argument("--metrics-host", default="127.0.0.1")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(args.config) as f:
        cfg = json.load(f)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_host)
    stop = threading.Event()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_consumer(stop, cfg["consumer"], runner_config=cfg["runner"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
