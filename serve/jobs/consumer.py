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

``submit(spec) -> JobOutcome`` is pluggable: :class:`serve.jobs.store.JobRunner`
in process, or the serving layer's call into the Ray cluster.
:func:`run_consumer` is the loop a Ray actor/deployment wraps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Mapping, Sequence

import boto3
from botocore.config import Config
from prometheus_client import REGISTRY, Gauge, start_http_server
from pydantic import StrictBool, StrictStr, model_validator

from serve.catalogue import load_catalogue
from serve.errors import MrisegError
from serve.inference.pipeline import Segmenter
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.jobs.events import EventFormatError, ObjectEvent, parse_message, volume_events
from serve.jobs.records import RecordSigner
from serve.jobs.store import (FAILED, OUTPUT_KINDS, RUNNING, SUCCEEDED, JobOutcome, JobRunner, JobSpec, JobStore,
                              SegmenterEngine)
from serve.settings_checks import STRICT, Says, check, number, setting_names, whole
from serve.storage.models import open_model_store
from serve.storage.s3client import S3Settings, has_dot_segments, parse_s3_uri

#: SQS's longest visibility timeout (12 hours)
MAX_VISIBILITY_S = 43200

log = logging.getLogger(__name__)

Submit = Callable[[JobSpec], JobOutcome]


_NAMES = Says("a list of names")


@dataclass(frozen=True)
class InboxRule:
    """Objects under ``s3://{bucket}/{prefix}`` belong to ``site``; outputs go under ``output_root``."""

    __pydantic_config__ = STRICT  # how from_mapping validates a file's mapping (pydantic)

    bucket: StrictStr
    prefix: StrictStr
    site: StrictStr
    output_root: StrictStr
    roi_subset: Annotated[tuple[StrictStr, ...], _NAMES] | None = None  # a string would have become letters
    fast: Annotated[StrictBool, Says("true or false")] = False          # "false" would have been truthy
    outputs: Annotated[tuple[StrictStr, ...], _NAMES] = ("multilabel", "statistics", "preview")
    # the input's spline order (TotalSegmentator's -ro, 0..5)
    resampling_order: Annotated[whole(0, 5), Says(
        f"a whole number from 0 to 5 (the spline order of the input's resampling, TotalSegmentator's -ro; "
        f"default {DEFAULT_RESAMPLING_ORDER})")] = DEFAULT_RESAMPLING_ORDER

    @model_validator(mode="before")
    @classmethod
    def _names_are_strings(cls, d: Any) -> Any:
        if isinstance(d, Mapping) and not all(isinstance(d.get(k), str) for k in _RULE_KEYS if k in d):
            raise ValueError("bucket, prefix, site and output_root must be strings (site not empty)")
        return d

    def matches(self, ev: ObjectEvent) -> bool:
        """The object lies under the inbox prefix, on whole path segments, with no ``.`` or ``..`` segment.

        The input is then read with the intake's own credentials, not through the API's tenancy check, and
        a server that resolves ``..`` in keys would hand over another site's object.
        """
        if ev.bucket != self.bucket or not ev.key.startswith(self.prefix):
            return False
        if self.prefix and not self.prefix.endswith("/") and not ev.key[len(self.prefix):].startswith("/"):
            return False  # prefix "site-a" must not take "site-ab/..."
        return not has_dot_segments(ev.key)

    def spec(self, ev: ObjectEvent) -> JobSpec:
        return JobSpec(ev.uri, self.output_root, self.site, ev.etag, ev.version_id, self.roi_subset, self.fast,
                       self.outputs, self.prefix, self.resampling_order)

    @classmethod
    def from_mapping(cls, d: Any) -> "InboxRule":
        """A rule from config, checked: a typo or a wrong type is an error here, not a silent default.

        Args:
            d: one rule of the ``events`` settings or the rules file.

        Returns:
            The rule, its structure names checked against the catalogue.

        Raises:
            MrisegError: naming the rule's site and the key that is wrong.
        """
        if not isinstance(d, Mapping):
            raise MrisegError(f"events: an inbox rule must be a mapping of {list(setting_names(cls))}")
        d = dict(d)
        missing = [k for k in _RULE_KEYS if k not in d]
        if missing:
            raise MrisegError(f"events: inbox rule {d.get('site', '?')}: missing {missing}; a rule has "
                              f"{list(setting_names(cls))}")
        name = f"events: inbox rule for site {d['site']!r}"
        rule = check(cls, d, name)
        if not rule.site:
            raise MrisegError(f"{name}: bucket, prefix, site and output_root must be strings (site not empty)")
        parse_s3_uri(f"s3://{rule.bucket}/")  # a clear error for an invalid bucket name
        out_bucket, out_key = parse_s3_uri(rule.output_root.rstrip("/") + "/")
        if _inbox(out_bucket, out_key).startswith(_inbox(rule.bucket, rule.prefix)):
            raise MrisegError(f"{name}: output_root lies inside the inbox, so every output would be segmented "
                              f"again; put outputs outside {rule.prefix!r}")
        changes: dict[str, Any] = {}
        if rule.roi_subset is not None:
            changes["roi_subset"] = tuple(load_catalogue().validate_structures(list(rule.roi_subset)) or ())
            if not changes["roi_subset"]:
                raise MrisegError(f"{name}: roi_subset names no structure; leave it out for all")
        bad = [o for o in rule.outputs if o not in OUTPUT_KINDS]
        if bad or not rule.outputs:
            raise MrisegError(f"{name}: outputs must name some of {list(OUTPUT_KINDS)}, not {list(rule.outputs)}")
        return dataclasses.replace(rule, **changes) if changes else rule


_RULE_KEYS = ("bucket", "prefix", "site", "output_root")


@dataclass
class ConsumerConfig:
    """The SQS poller's settings (the ``events`` app arg's queue and ``sqs_options``), within SQS's own limits."""

    __pydantic_config__ = STRICT  # how from_mapping validates a file's mapping (pydantic)

    queue_url: StrictStr
    rules: list[InboxRule]
    sqs: S3Settings = field(default_factory=S3Settings)  # endpoint/region/keys of the SQS service
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
        # here, not on the dataclass: the tests build a config whose message reappears on purpose
        if config.heartbeat_s >= config.visibility_timeout_s:  # it would reappear before its first extension
            raise MrisegError(f"events: heartbeat_s ({config.heartbeat_s:g}) must be shorter than "
                              f"visibility_timeout_s ({config.visibility_timeout_s:g})")
        return config


def _inbox(bucket: str, prefix: str) -> str:
    """``bucket/prefix/`` on whole segments ("" is the whole bucket), for nesting checks."""
    return f"{bucket}/{prefix}" if not prefix or prefix.endswith("/") else f"{bucket}/{prefix}/"


def check_rules(rules: Sequence[InboxRule]) -> list[InboxRule]:
    """Refuse rules that would hand one site's objects to another.

    Inputs are read with the intake's own credentials, so the rules are the tenancy boundary: an inbox
    of one site inside another site's would let either push (or, first rule first, be sent) the other's
    objects, and outputs written inside any inbox would be segmented again as that inbox's site's.
    """
    for i, a in enumerate(rules):
        for b in rules[i + 1:]:
            ia, ib = _inbox(a.bucket, a.prefix), _inbox(b.bucket, b.prefix)
            if a.site != b.site and (ia.startswith(ib) or ib.startswith(ia)):
                raise MrisegError(f"events: the inboxes of sites {a.site!r} ({a.prefix!r}) and {b.site!r} "
                                  f"({b.prefix!r}) in bucket {a.bucket!r} nest; give each site a prefix of its own")
    for r in rules:
        out_bucket, out_key = parse_s3_uri(r.output_root.rstrip("/") + "/")
        for other in rules:
            if _inbox(out_bucket, out_key).startswith(_inbox(other.bucket, other.prefix)):
                raise MrisegError(f"events: site {r.site!r}'s output_root lies inside site {other.site!r}'s "
                                  f"inbox ({other.prefix!r}), where every output would be segmented again; put "
                                  f"outputs outside the inboxes")
    return list(rules)


def make_sqs_client(settings: S3Settings):
    """boto3 SQS client from the same connection settings shape as S3."""
    kwargs: dict[str, Any] = {"region_name": settings.region, "config": Config(
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout_s, read_timeout=max(settings.read_timeout_s, 30.0))}
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.access_key_id:
        kwargs["aws_access_key_id"] = settings.access_key_id
        kwargs["aws_secret_access_key"] = settings.secret_access_key
    return boto3.session.Session().client("sqs", **kwargs)


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


def specs_for_events(events: Sequence[ObjectEvent], rules: Sequence[InboxRule]) -> tuple[list[JobSpec], int]:
    """Jobs for the volume events that fall in an inbox rule; also how many events were ignored.

    The HTTP push endpoint (S3 ``Records[]``, SNS, EventBridge bodies) uses this with
    :func:`serve.jobs.events.parse_message`, then submits each spec like the consumer does."""
    vols = volume_events(events)
    specs, ignored = [], len(events) - len(vols)
    for ev in vols:
        rule = next((r for r in rules if r.matches(ev)), None)
        if rule is None:
            ignored += 1  # not an inbox we serve (e.g. our own outbox in the same bucket)
            if has_dot_segments(ev.key):
                log.warning("ignored an event for a key with '.' or '..' segments in bucket %s", ev.bucket)
            continue
        spec = rule.spec(ev)
        try:
            spec.output_prefix  # the key must name a case folder; one with control characters cannot
        except MrisegError:
            ignored += 1  # a job without an output prefix could never record why it failed
            log.warning("ignored an event in bucket %s: its key cannot name an output folder (control "
                        "characters, unpaired surrogates or over 1024 bytes)", ev.bucket[:63])
            continue
        specs.append(spec)
    return specs, ignored


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


def local_submit(cfg: Mapping[str, Any]) -> Submit:
    """A :class:`serve.jobs.store.JobRunner` over an in-process Segmenter.

    ``cfg``: ``models`` (sources), ``jobs`` (s3:// prefix of job records), ``s3``
    (S3Settings mapping), optional ``cache_dir``, ``model_pins`` (the operator's pinned model
    manifest; else ``$MRISEG_MODEL_PINS``; required for s3:// model sources), ``lease_s``,
    ``threads``, ``max_bytes``, ``record_key_file`` (the key that signs job records, serve/jobs/records.py;
    else ``$MRISEG_RECORD_KEY_FILE``).
    """
    s3 = S3Settings.from_mapping(cfg.get("s3"))
    # before the models load: a missing key is a configuration error to report at once
    signer = RecordSigner.from_file(cfg["record_key_file"]) if cfg.get("record_key_file") else RecordSigner.from_env()
    store = open_model_store(list(cfg["models"]), cache_dir=cfg.get("cache_dir"), s3=s3, pins=cfg.get("model_pins"))
    seg = Segmenter(store, device=cfg.get("device", "auto"), threads=cfg.get("threads", 1))
    jobs = JobStore(cfg["jobs"], s3, lease_s=float(cfg.get("lease_s", 300.0)), signer=signer)
    return JobRunner(jobs, SegmenterEngine(seg), s3, max_bytes=cfg.get("max_bytes", 1 << 30)).run


# -- setting up the queue and the notifications (moto in tests, AWS in production) --------
def create_queue_with_dlq(sqs, name: str, max_receives: int = 5, visibility_timeout_s: int = 120) -> tuple[str, str]:
    """A queue whose messages move to ``{name}-dlq`` after ``max_receives`` receives; returns both URLs."""
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    url = sqs.create_queue(QueueName=name, Attributes={
        "VisibilityTimeout": str(visibility_timeout_s),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}),
    })["QueueUrl"]
    return url, dlq_url


def configure_notifications(s3, sqs, bucket: str, queue_url: str, prefixes: Sequence[str]) -> None:
    """Send ``s3:ObjectCreated:*`` of each inbox prefix in ``bucket`` to the queue (replaces the bucket's config)."""
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    configs = [{"Id": f"mriseg-{i}", "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
                "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": p}]}}}
               for i, p in enumerate(prefixes)]
    s3.put_bucket_notification_configuration(Bucket=bucket,
                                             NotificationConfiguration={"QueueConfigurations": configs})


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
