"""Durable, idempotent segmentation jobs whose state lives in the object store.

A job is identified by its *idempotency key*: a hash of the input object
(bucket, key, ETag or version id), the options that change the output
(``roi_subset`` sorted, ``fast``, the outputs wanted, ``resampling_order``) and
the checksums of the sub-models that would run. The same input with the same options and models
is the same job: a redelivered event or a resubmission finds the finished
record and gets the existing result without recomputing. Different options
or models make a different key and never overwrite another job's outputs.

The record ``s3://{jobs bucket}/{prefix}/jobs/{key}.json`` (``mriseg.job/1``,
:mod:`serve.records_schema`) moves queued -> running -> succeeded | failed.
Claims are atomic conditional writes:
``IfNoneMatch="*"`` creates a record only if none exists, ``IfMatch=<ETag>``
takes over a queued record, a failed-retryable one, a ``running`` claim
whose lease expired (its worker died), or a record this server did not sign.
Both SeaweedFS 4.48 and moto honour these headers (answering 412), as AWS S3
does since 2024. Records are signed (:mod:`serve.jobs.records`): one that does not
verify reads as absent, so a forged ``running`` record cannot block a job.

:class:`JobRunner` runs one job end to end: look at the input (HEAD: an
event naming a version the object does not have is refused with 412 before
anything is claimed or read), claim, stage the input in, segment (an
:class:`Engine`), then publish: look at the input again (a result of a
version replaced meanwhile is not published) and stage the outputs out with
a signed ``job.json`` last, each ``job.json`` write conditional on the one
last seen there; mark the record succeeded. Errors a user caused (corrupt file,
4xx from S3) end the job ``failed`` with the reason in the record and in an
error ``job.json``; retryable errors leave it ``failed`` with ``retryable``
so a redelivery may claim it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from botocore.exceptions import ClientError

from serve import __version__
from serve.audit import audit
from serve.clock import SYSTEM_CLOCK, Clock
from serve.errors import MrisegError, StorageError, VolumeTooLargeError
from serve.imaging.sandbox import decode_untrusted
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER, check_resampling_order
from serve.jobs.records import MAX_RECORD_BYTES, ForgedRecord, RecordSigner, rejected
from serve.outputs import layout
from serve.outputs.writers import write_outputs
from serve.records_schema import (FAILED, QUEUED, RUNNING, SUCCEEDED, MalformedRecord, check_output_record,
                                  job_record_doc, output_record, read_job_record, read_output_record)
from serve.storage import staging
from serve.storage.s3client import S3Settings, parse_s3_uri

log = logging.getLogger(__name__)

OUTPUT_KINDS = ("multilabel", "per_structure", "statistics", "preview")
DEFAULT_OUTPUTS = ("multilabel", "statistics", "preview")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".zip")


def software_version() -> str:
    """This package's version (``0.0.0+source`` in a source tree that was never installed)."""
    return __version__


MAX_CASE_BYTES = 200


def case_name(key: str, input_prefix: str | None = None) -> str:
    """The output folder name of an input key: its path below the inbox prefix, volume suffix removed.

    ``input_prefix=""`` is an inbox at the bucket's root (the whole key names the
    case); ``None``, no inbox: the file name alone does.

    S3 keys are literal, but tools that sync outputs to disk are not: ``.``/``..``
    and empty segments become ``_``, and a name over ``MAX_CASE_BYTES`` bytes is
    shortened with a digest of the whole (so it stays unique and the output keys
    stay under S3's 1024-byte limit).
    """
    inside = input_prefix is not None and key.startswith(input_prefix)
    rel = key[len(input_prefix):] if inside else PurePosixPath(key).name
    low = rel.lower()
    for s in VOLUME_SUFFIXES:
        if low.endswith(s):
            rel = rel[: -len(s)]
            break
    case = "/".join("_" if p in ("", ".", "..") else p for p in rel.strip("/").split("/"))
    if len(case.encode()) > MAX_CASE_BYTES:
        digest = hashlib.sha256(case.encode()).hexdigest()[:16]
        head = case.encode()[: MAX_CASE_BYTES - 17].decode("utf-8", "ignore").rstrip("/")
        case = f"{head}~{digest}"
    return case


@dataclass(frozen=True)
class JobSpec:
    """One input object and what to make of it."""

    input_uri: str                      # s3://bucket/key
    output_root: str                    # s3://out-bucket/prefix; outputs go to {output_root}/{site}/{case}/
    site: str = "default"
    etag: str | None = None             # filled from HEAD when None
    version_id: str | None = None
    roi_subset: tuple[str, ...] | None = None
    fast: bool = False
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    input_prefix: str | None = None     # the inbox prefix (case names are relative to it; "" is the bucket root)
    resampling_order: int = DEFAULT_RESAMPLING_ORDER  # the input's spline order (TotalSegmentator's -ro, 0..5)

    def __post_init__(self) -> None:
        check_resampling_order(self.resampling_order)  # a record or rule naming another is refused, never guessed

    @property
    def case(self) -> str:
        return case_name(parse_s3_uri(self.input_uri)[1], self.input_prefix)

    @property
    def output_prefix(self) -> str:
        return f"{self.output_root.rstrip('/')}/{self.site}/{self.case}/"

    def options(self) -> dict[str, Any]:
        """The options that change the output, canonical."""
        return output_options(self.roi_subset, self.fast, self.outputs, self.resampling_order)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roi_subset"] = list(self.roi_subset) if self.roi_subset else None
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JobSpec":
        d = dict(d)
        if d.get("roi_subset") is not None:
            d["roi_subset"] = tuple(d["roi_subset"])
        d["outputs"] = tuple(d.get("outputs") or DEFAULT_OUTPUTS)
        try:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except MrisegError as e:  # a stored spec no request could have made: unreadable, as its readers expect
            raise ValueError(e.message) from None


def output_options(roi_subset: Sequence[str] | None, fast: bool, outputs: Iterable[str],
                   resampling_order: int | None) -> dict[str, Any]:
    """The options that change an output set, in the one form every job.json records (and bulk compares).

    Args:
        roi_subset: the structures asked for (None: all).
        fast: the 3 mm model.
        outputs: the output kinds.
        resampling_order: the input's spline order; None for a set that does not record one (made before
            the option existed, with another resampling), which therefore never equals a new job's options.

    Returns:
        ``{"roi_subset", "fast", "outputs", "resampling_order"}``.
    """
    return {"roi_subset": sorted(roi_subset) if roi_subset else None, "fast": bool(fast),
            "outputs": sorted(set(outputs)), "resampling_order": resampling_order}


def idempotency_key(spec: JobSpec, model_checksums: Mapping[str, str]) -> str:
    """The job's identity: input object version, output-changing options, model checksums."""
    bucket, key = parse_s3_uri(spec.input_uri)
    version = spec.version_id if spec.version_id and spec.version_id != "null" else None
    ident = {"bucket": bucket, "key": key, "version": version or (spec.etag or "").strip('"'),
             "options": spec.options(), "models": dict(sorted(model_checksums.items())),
             "output_root": spec.output_root.rstrip("/"), "site": spec.site}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


class UnreadableRecord(ValueError):
    """A stored job record that is not what this version writes (truncated, edited, another format)."""


@dataclass
class JobRecord:
    key: str
    state: str
    spec: dict
    models: dict[str, str]
    output_prefix: str
    owner: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    error: dict | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    etag: str | None = field(default=None, compare=False)   # of the stored record (not stored)

    def to_json(self) -> dict:
        """The stored form (``mriseg.job/1``), validated: a malformed record is never written."""
        d = asdict(self)
        d.pop("etag")
        return job_record_doc(d)

    @classmethod
    def from_json(cls, d: Any, etag: str | None) -> "JobRecord":
        """A stored record (legacy ``done`` read as ``succeeded``); :class:`UnreadableRecord` when it is not a
        valid job record, :class:`serve.records_schema.UnsupportedRecordFormat` when it names a newer format."""
        try:
            rec = read_job_record(d)
        except MalformedRecord as e:
            raise UnreadableRecord(str(e)) from None
        fields = rec.model_dump(mode="json", exclude={"format"}, exclude_none=True)
        return cls(**fields, etag=etag)

    @classmethod
    def unreadable(cls, key: str, why: str, etag: str | None) -> "JobRecord":
        """Stands in for a stored record that cannot be read: failed and retryable, so a claim replaces it."""
        log.warning("job record %s is unreadable (%s); the next claim replaces it", key[:16], why)
        return cls(key, FAILED, {}, {}, "", error={"status": 500, "title": "Unreadable job record", "retryable": True,
                                                  "detail": f"the stored job record was unreadable ({why})"},
                   etag=etag)

    @property
    def retryable(self) -> bool:
        return self.state == FAILED and bool((self.error or {}).get("retryable"))


class ClaimLost(MrisegError):
    """Another worker holds (or just took) this job."""

    status = 409
    title = "Job claimed elsewhere"


def precondition_failed(e: BaseException) -> bool:
    """``e`` is (or was caused by) S3's answer to a conditional request whose condition did not hold."""
    inner = e
    while inner is not None and not isinstance(inner, ClientError):
        inner = inner.__cause__ or inner.__context__
    if not isinstance(inner, ClientError):
        return False
    code = inner.response.get("Error", {}).get("Code", "")
    status = inner.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # 409 ConditionalRequestConflict: a concurrent conditional write won on AWS
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)



def conditions(etag: str | None) -> dict[str, str]:
    """The condition that replaces exactly the object last seen: ``If-Match`` its ETag, or
    ``If-None-Match: *`` where there was none."""
    return {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}


class JobStore:
    """Job records under ``s3://{bucket}/{prefix}/jobs/`` with atomic claims.

    Every record is signed (:mod:`serve.jobs.records`, the envelope layout). One that does not verify (forged,
    unsigned from before signing, copied from another key) is audited and read as absent: a claim
    replaces it with ``If-Match`` on its ETag, so it can neither block nor finish a job.

    ``clock`` stamps and compares the leases, and paces a running job's lease renewals
    (:mod:`serve.clock`; the real one by default).
    """

    def __init__(self, uri: str, settings: S3Settings | Mapping[str, Any] | None = None,
                 owner: str | None = None, lease_s: float = 300.0, signer: RecordSigner | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        self.bucket, prefix = parse_s3_uri(uri.rstrip("/") + "/")
        self.prefix = prefix
        self.settings = settings
        self.client = staging.client_for(settings)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_s = lease_s
        self.clock = clock  # leases are stamped and compared on it; tests advance a ManualClock
        self.signer = signer or RecordSigner.from_env()

    def _key(self, key: str) -> str:
        return f"{self.prefix}jobs/{key}.json"

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _read(self, key: str) -> tuple[JobRecord | None, str | None]:
        """The stored record, verified (None when there is none or it does not verify), and the ETag of
        whatever object is stored there (None when there is none)."""
        okey = self._key(key)

        def once() -> tuple[bytes | None, str | None]:
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=okey)
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None, None
                raise
            if int(r.get("ContentLength") or 0) > MAX_RECORD_BYTES:  # not ours, and not read into memory
                r["Body"].close()
                return None, r["ETag"]
            return r["Body"].read(), r["ETag"]

        body, etag = staging.with_retries(once, bucket=self.bucket, action="read a job record")
        if etag is None:
            return None, None
        if body is None:
            rejected("job", self.bucket, okey, "oversized")
            return None, etag
        try:
            _, doc = self.signer.unseal(json.loads(body), bucket=self.bucket, key=okey)
        except (ValueError, RecursionError, ForgedRecord) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
            rejected("job", self.bucket, okey, e.reason if isinstance(e, ForgedRecord) else "unsigned")
            return None, etag
        try:
            return JobRecord.from_json(doc, etag), etag
        except UnreadableRecord as e:  # signed here, but not in this version's format
            return JobRecord.unreadable(key, str(e), etag), etag

    def get(self, key: str) -> JobRecord | None:
        """The job's record; None when there is none, or none this server signed."""
        return self._read(key)[0]

    def _put(self, rec: JobRecord, **cond: str) -> JobRecord:
        rec.updated = time.time()
        okey = self._key(rec.key)
        doc = self.signer.seal(rec.to_json(), bucket=self.bucket, key=okey, site=str(rec.spec.get("site", "")))
        try:
            resp = staging.put_json(doc, self._uri(rec.key), self.settings, **cond)
        except StorageError as e:
            if precondition_failed(e):
                raise ClaimLost(f"job {rec.key} was changed by another worker") from e
            raise
        rec.etag = resp["ETag"]
        return rec

    def enqueue(self, key: str, spec: JobSpec, models: Mapping[str, str]) -> JobRecord:
        """Record an accepted job (queued) unless one exists; returns the current record."""
        rec = JobRecord(key, QUEUED, spec.to_dict(), dict(models), spec.output_prefix)
        try:
            return self._put(rec, IfNoneMatch="*")
        except ClaimLost:
            return self.get(key) or rec

    def claim(self, key: str, spec: JobSpec, models: Mapping[str, str]) -> tuple[JobRecord, bool]:
        """Try to own the job. Returns ``(record, True)`` when this worker must run it,
        ``(record, False)`` when it is done, failed for good, or running elsewhere under a live lease.

        A record that does not verify counts as none, but the write that replaces it is conditional on
        its ETag (``If-Match``), not ``If-None-Match``: that would fail for as long as the forgery stays.
        """
        for _ in range(5):
            cur, etag = self._read(key)
            now = self.clock.time()
            if cur is not None:
                if cur.state == SUCCEEDED or (cur.state == FAILED and not cur.retryable):
                    return cur, False
                # a live lease is respected whoever holds it: threads sharing this store (an intake's
                # pushed jobs and its queue) would otherwise take one job from each other and run it twice
                if cur.state == RUNNING and (cur.lease_until or 0) > now:
                    return cur, False
            rec = JobRecord(key, RUNNING, spec.to_dict(), dict(models), spec.output_prefix, owner=self.owner,
                            lease_until=now + self.lease_s, attempts=(cur.attempts if cur else 0) + 1,
                            created=cur.created if cur else now)
            try:
                return self._put(rec, **conditions(etag)), True
            except ClaimLost:
                continue  # someone else changed it in between: look again
        cur = self.get(key)
        if cur is None:  # the record kept changing, and what is there now is no claim of ours
            raise StorageError(f"the record of job {key[:16]} kept changing while this worker claimed it; "
                               f"the job is tried again later")
        return cur, False

    def renew(self, rec: JobRecord) -> JobRecord:
        """Extend the lease of a claim this worker holds (raises :class:`ClaimLost` if taken over)."""
        rec.lease_until = self.clock.time() + self.lease_s
        return self._put(rec, IfMatch=rec.etag)

    def finish(self, rec: JobRecord, state: str, *, error: dict | None = None,
               outputs: Mapping[str, str] | None = None) -> JobRecord:
        """Mark succeeded or failed. Only the claim holder can (a lost claim raises :class:`ClaimLost`)."""
        rec.state, rec.error, rec.lease_until = state, error, None
        if outputs is not None:
            rec.outputs = dict(outputs)
        return self._put(rec, IfMatch=rec.etag)

    def list(self) -> list[JobRecord]:
        """Every job record this server signed (for reports and the bulk CLI); others are audited and left out."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=f"{self.prefix}jobs/")
        out = []
        for page in pages:
            for o in page.get("Contents", []):
                k = PurePosixPath(o["Key"]).stem
                rec = self.get(k)
                if rec is not None:
                    out.append(rec)
        return out


# -- running jobs ------------------------------------------------------------------
class Engine(Protocol):
    """What segments: in process (:class:`SegmenterEngine`) or through the Ray cluster."""

    def model_checksums(self, roi_subset: Sequence[str] | None, fast: bool, site: str) -> dict[str, str]:
        """Checksums of the sub-models a job with these options would run, asked for as ``site``."""
        ...

    def segment_file(self, path: Path, spec: JobSpec, outdir: Path) -> dict[str, Any]:
        """Write the outputs of ``path`` into ``outdir`` (serve.outputs' writers' names), its input resampled
        with ``spec.resampling_order``; return ``{"timings": ..., "structures": ..., "models": ..., "demo": ...,
        "input_cast": ...}``."""
        ...


class SegmenterEngine:
    """:class:`serve.inference.pipeline.Segmenter` in this process."""

    def __init__(self, segmenter, max_voxels: int | None = None, sandbox=None):
        self.segmenter = segmenter
        self.max_voxels = max_voxels
        self.sandbox = sandbox  # a serve.imaging.sandbox.SandboxPolicy; None: its defaults
        self.calls = 0  # segmentations actually computed (idempotency is observable)

    def model_checksums(self, roi_subset, fast, site: str = "default") -> dict[str, str]:
        sms, _ = self.segmenter.plan(list(roi_subset) if roi_subset else None, fast)
        return {sm.name: self.segmenter.model(sm.name).checksum for sm in sms}

    def segment_file(self, path: Path, spec: JobSpec, outdir: Path) -> dict[str, Any]:
        volume = decode_untrusted(path, self.max_voxels, self.sandbox)
        self.calls += 1
        result = self.segmenter.segment(volume, list(spec.roi_subset) if spec.roi_subset else None, spec.fast,
                                        resampling_order=spec.resampling_order)
        write_outputs(result, volume, outdir, multilabel="multilabel" in spec.outputs,
                      per_structure="per_structure" in spec.outputs, statistics="statistics" in spec.outputs,
                      preview="preview" in spec.outputs, roi_subset=spec.roi_subset)
        return {"timings": result.timings, "structures": {str(k): v for k, v in result.structures.items()},
                "models": result.models, "unavailable": result.unavailable, "demo": result.demo,
                "input_cast": result.input_cast}


class InputChangedError(staging.S3RequestError):
    """The input was overwritten between its event and its download: this event's job has nothing to do."""


@dataclass
class JobOutcome:
    key: str
    state: str                 # succeeded | failed | running (elsewhere)
    output_prefix: str
    computed: bool             # False: an existing result (or a running duplicate) was returned
    error: dict | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    #: (epoch seconds) for ``running``: when the other worker's claim lapses unless it renews it;
    #: from then on the job can be claimed again (the holder may have died)
    lease_until: float | None = None

    @property
    def retryable(self) -> bool:
        return bool((self.error or {}).get("retryable"))


def error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, MrisegError):
        return {"status": exc.status, "title": exc.title, "detail": exc.message, "retryable": exc.retryable}
    return {"status": 500, "title": "Internal error", "retryable": True,
            "detail": f"unexpected {type(exc).__name__}; see the worker log"}


class _Heartbeat:
    """Renews a claim's lease in the background while the job runs."""

    def __init__(self, store: JobStore, rec: JobRecord, every_s: float):
        self.store, self.rec, self.every_s = store, rec, every_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.lost = False
        self._t = threading.Thread(target=self._run, daemon=True, name="job-lease")

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        while not self.store.clock.wait(self._stop, self.every_s):
            try:
                with self._lock:
                    self.rec = self.store.renew(self.rec)
            except ClaimLost:
                self.lost = True
                return
            except Exception:  # a transient failure: the lease still has time, try next beat
                log.warning("could not renew a job lease", exc_info=True)


class _FolderChanged(Exception):
    """The output folder's job.json is no longer the one this job last saw (another job publishes there)."""


class JobRunner:
    """Runs :class:`JobSpec` s exactly once in effect: ``runner.run(spec)`` is the consumer's ``submit``.

    The job.json it publishes is signed (:mod:`serve.jobs.records`, inline layout, with the store's signer): it
    lies in a folder the site may write to, so one that does not verify is someone else's, never replaced
    or trusted on its word.
    """

    def __init__(self, store: JobStore, engine: Engine, settings: S3Settings | Mapping[str, Any] | None = None,
                 max_bytes: int | None = 1 << 30, work_dir: str | os.PathLike | None = None):
        self.store = store
        self.engine = engine
        self.settings = settings
        self.max_bytes = max_bytes
        self.work_dir = Path(work_dir or tempfile.gettempdir())
        self.signer = store.signer

    def _fill_version(self, spec: JobSpec, head: Mapping[str, Any] | None = None) -> JobSpec:
        """``spec`` with the ETag and version id of the object as it is now, where it names neither."""
        if spec.etag or spec.version_id:
            return spec
        head = head or self._input_head(spec)
        if head is None:
            raise self._missing(spec)
        return JobSpec.from_dict({**spec.to_dict(), "etag": head["ETag"], "version_id": head.get("VersionId")})

    def _input_head(self, spec: JobSpec) -> dict | None:
        return staging.object_exists(spec.input_uri, self.settings)

    @staticmethod
    def _is_version(spec: JobSpec, head: Mapping[str, Any] | None) -> bool:
        """``head`` (the object as it is now) is the version ``spec`` names."""
        if head is None:
            return False
        if spec.version_id and spec.version_id != "null":
            return head.get("VersionId") == spec.version_id
        return bool(spec.etag) and head["ETag"].strip('"') == spec.etag.strip('"')

    @staticmethod
    def _missing(spec: JobSpec) -> staging.S3RequestError:
        bucket, _ = parse_s3_uri(spec.input_uri)
        return staging.S3RequestError(f"the input object does not exist in bucket '{bucket}'", 404, "NoSuchKey")

    @staticmethod
    def _changed(spec: JobSpec, what: str) -> InputChangedError:
        bucket, _ = parse_s3_uri(spec.input_uri)
        return InputChangedError(f"the input object in bucket '{bucket}' {what}; the version there now gets its "
                                 f"own event", 412, "PreconditionFailed")

    def key_for(self, spec: JobSpec) -> tuple[JobSpec, str, dict[str, str]]:
        spec = self._fill_version(spec)
        models = self.engine.model_checksums(spec.roi_subset, spec.fast, spec.site)
        return spec, idempotency_key(spec, models), models

    def run(self, spec: JobSpec) -> JobOutcome:
        """Claim, compute and publish; or return the existing result.

        The input is looked at (HEAD) first: an event naming a version the object does not have now
        (replaced since, or a made-up ETag) gets that version's finished result if there is one, and
        otherwise fails with 412 before anything is claimed or downloaded.
        """
        try:
            head = self._input_head(spec)
            if head is None:
                raise self._missing(spec)
            spec, key, models = self.key_for(self._fill_version(spec, head))
        except MrisegError as e:
            return self._fail_unclaimed(spec, e)
        if not self._is_version(spec, head):
            rec = self.store.get(key)
            if rec is not None and (rec.state == SUCCEEDED or (rec.state == FAILED and not rec.retryable)):
                return JobOutcome(key, rec.state, rec.output_prefix, False, rec.error, rec.outputs)
            return self._fail_unclaimed(spec, self._changed(spec, "is not the version its event names"))
        rec, mine = self.store.claim(key, spec, models)
        if not mine:
            return JobOutcome(key, rec.state, rec.output_prefix, False, rec.error, rec.outputs,
                              rec.lease_until if rec.state == RUNNING else None)
        audit("job.claimed", job=key[:16], site=spec.site, source="s3-event", attempt=rec.attempts)
        started = time.time()
        tmp = Path(tempfile.mkdtemp(prefix="mriseg-job-", dir=self.work_dir))
        try:
            error: Exception | None = None
            with _Heartbeat(self.store, rec, max(1.0, self.store.lease_s / 3)) as hb:
                try:
                    outputs, _, _ = self._compute(spec, rec, models, tmp, started, lambda: hb.lost)
                except Exception as e:  # settled below, once the heartbeat no longer writes the record
                    error = e
            rec = hb.rec
            if hb.lost or isinstance(error, ClaimLost):
                return self._taken_over(spec, rec)
            if error is not None:
                return self._failed(spec, rec, error, started)
            try:
                rec = self.store.finish(rec, SUCCEEDED, outputs=outputs)
            except ClaimLost:
                return self._taken_over(spec, rec)
            audit("job.settled", job=key[:16], site=spec.site, source="s3-event", status="succeeded",
                  seconds=round(time.time() - started, 3), attempt=rec.attempts)
            return JobOutcome(key, SUCCEEDED, rec.output_prefix, True, None, outputs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _read_job_json(self, uri: str) -> tuple[dict | None, str | None]:
        """The job.json at ``uri`` if this server signed it for that place (else None, audited), in this
        version's vocabulary (:func:`serve.records_schema.read_output_record`; one of a newer format raises
        :class:`serve.records_schema.UnsupportedRecordFormat`), and the ETag of whatever is there (None: nothing)."""
        bucket, key = parse_s3_uri(uri)
        try:
            raw, info = staging.download_object(uri, MAX_RECORD_BYTES, self.settings)
        except staging.S3RequestError as e:
            if e.status == 404:
                return None, None
            raise
        except (VolumeTooLargeError, staging.IntegrityError) as e:  # not ours: too large, or its checksum lies
            head = staging.object_exists(uri, self.settings)
            rejected(layout.JOB_RECORD, bucket, key, "oversized" if isinstance(e, VolumeTooLargeError) else "checksum")
            return None, (head["ETag"] if head else None)
        try:
            body = self.signer.check(json.loads(raw), bucket=bucket, key=key)
        except (ValueError, RecursionError, ForgedRecord) as e:
            rejected(layout.JOB_RECORD, bucket, key, e.reason if isinstance(e, ForgedRecord) else "unsigned")
            return None, info.etag
        try:
            return read_output_record(body), info.etag
        except MalformedRecord:  # signed here, yet not a job.json: kept, never replaced on its word
            rejected(layout.JOB_RECORD, bucket, key, "malformed")
            return None, info.etag

    def _placement(self, spec: JobSpec, key: str, models: Mapping[str, str]) -> tuple[str, str | None]:
        """Where the job publishes, and the ETag of the job.json there now (None: none).

        ``{site}/{case}/`` unless another job (other options or models) published there, or what is there
        was not signed by this server for that folder (a site may write in its output folders, and what it
        wrote is never replaced on its word): then ``runs/<key16>/``. Its own earlier attempt, the reason
        its input failed before, and the set (or the ``running`` marker) of an earlier version of the
        same input made the same way are replaced: the case folder shows the input as it is now.
        """
        base = spec.output_prefix
        existing, etag = self._read_job_json(base + layout.JOB_RECORD)
        if etag is None:
            return base, None
        if existing is not None:
            if existing.get("job_key") == key:
                return base, etag
            if existing.get("status") == FAILED and (existing.get("input") or {}).get("uri") == spec.input_uri:
                # only the reason this input failed before (a corrupt upload since replaced, say): the result
                # of the input as it is now belongs in the case folder, where the site looks for it
                return base, etag
            if existing.get("status") in (SUCCEEDED, RUNNING) and self._supersedes(existing, spec, models):
                return base, etag
        runs = f"{base}runs/{key[:16]}/"
        head = staging.object_exists(runs + layout.JOB_RECORD, self.settings)
        return runs, (head["ETag"] if head else None)

    def _supersedes(self, existing: dict, spec: JobSpec, models: Mapping[str, str]) -> bool:
        """``existing`` was made from an earlier version of this job's input, with the same options and
        models, and this job reads the version the object has now (a corrected re-upload): its result
        belongs in the case folder. A late event for a version already replaced does not qualify."""
        if (existing.get("input") or {}).get("uri") != spec.input_uri or existing.get("options") != spec.options() \
                or existing.get("models") != dict(models):
            return False
        return self._is_version(spec, self._input_head(spec))

    def _taken_over(self, spec: JobSpec, rec: JobRecord) -> JobOutcome:
        """Our lease lapsed (a stalled worker) and another worker took the job: it is that worker's now."""
        log.warning("job %s of site %s was taken over by another worker; left to it", rec.key[:12], spec.site)
        return JobOutcome(rec.key, RUNNING, rec.output_prefix, False)

    def _compute(self, spec: JobSpec, rec: JobRecord, models: Mapping[str, str], tmp: Path, started: float,
                 lost: Callable[[], bool] = lambda: False):
        bucket, key = parse_s3_uri(spec.input_uri)
        local = tmp / ("input" + next((s for s in VOLUME_SUFFIXES if key.lower().endswith(s)), ""))
        t = time.perf_counter()
        info = staging.download_file(spec.input_uri, local, self.max_bytes, self.settings,
                                     version_id=spec.version_id)
        if spec.etag and info.etag.strip('"') != spec.etag.strip('"') and not spec.version_id:
            raise self._changed(spec, "changed since the event")
        download_s = time.perf_counter() - t
        outdir = tmp / "out"
        outdir.mkdir()
        meta = self.engine.segment_file(local, spec, outdir)
        timings = {"download_s": download_s, **meta.get("timings", {})}
        doc = self._job_doc(spec, rec, SUCCEEDED, info, started, timings=timings, meta=meta)
        t = time.perf_counter()
        outputs = self._publish(spec, rec, models, outdir, doc, lost)
        log.debug("uploaded outputs in %.2fs", time.perf_counter() - t)
        return outputs, meta, info

    def _publish(self, spec: JobSpec, rec: JobRecord, models: Mapping[str, str], outdir: Path, doc: dict,
                 lost: Callable[[], bool]) -> dict[str, str]:
        """Upload the outputs, then the signed job.json, where :meth:`_placement` says; returns the URIs.

        Just before, the input is looked at again: a job whose input was replaced (or deleted) while it ran
        publishes nothing (:class:`InputChangedError`, 412), so an older version's result never replaces a
        newer one's; the version there now has its own job. The folder's job.json is first replaced by a
        signed ``running`` marker (no reader takes the files for a whole set; it names the job, so the
        folder's next job can tell whose it is), conditionally on the one the placement read (``If-Match``, or
        ``If-None-Match`` where there was none); the uploads stop once the marker is replaced, and the
        succeeded job.json is written ``If-Match`` the marker. Of two jobs publishing into one folder at once,
        the later marker wins and the other decides again.
        """
        for _ in range(3):
            prefix, etag = self._placement(spec, rec.key, models)
            if not self._is_version(spec, self._input_head(spec)):
                raise self._changed(spec, "was replaced or deleted while its job ran")
            if lost():  # the new holder publishes there: replacing its job.json with ours would mix two runs
                raise ClaimLost("the job was taken over while it ran")
            rec.output_prefix = prefix
            try:
                return self._publish_at(prefix, etag, outdir, doc, lost)
            except _FolderChanged:
                log.info("the output folder of job %s changed while it published; deciding again", rec.key[:12])
        raise StorageError(f"the output folder of job {rec.key[:16]} kept changing while it published; "
                           f"the job is tried again later")

    def _publish_at(self, prefix: str, etag: str | None, outdir: Path, doc: dict,
                    lost: Callable[[], bool]) -> dict[str, str]:
        uri = prefix + layout.JOB_RECORD
        marker = self._put_job_json({**doc, "status": RUNNING}, uri, etag)

        def still_ours(_name: str) -> None:
            if lost():
                raise ClaimLost("the job was taken over while it published")
            head = staging.object_exists(uri, self.settings)
            if head is None or head["ETag"].strip('"') != marker.strip('"'):
                raise _FolderChanged()

        outputs = staging.upload_dir(outdir, prefix, self.settings, on_uploaded=still_ours, last=())
        self._put_job_json(doc, uri, marker)
        outputs[layout.JOB_RECORD] = uri
        return outputs

    def _put_job_json(self, doc: dict, uri: str, etag: str | None) -> str:
        """Write ``doc`` signed at ``uri`` in place of exactly the job.json last seen there (``etag``; None:
        none); returns the new ETag, or raises :class:`_FolderChanged` when another has landed since. The
        signed document is validated first (``mriseg.output/1``): nothing malformed is published."""
        bucket, key = parse_s3_uri(uri)
        signed = check_output_record(self.signer.stamp(doc, bucket=bucket, key=key))
        try:
            resp = staging.put_json(signed, uri, self.settings, **conditions(etag))
        except StorageError as e:
            if precondition_failed(e):
                raise _FolderChanged() from e
            raise
        return resp["ETag"]

    def _job_doc(self, spec: JobSpec, rec: JobRecord | None, state: str, info: staging.ObjectInfo | None,
                 started: float, *, timings: dict | None = None, meta: dict | None = None,
                 error: dict | None = None) -> dict:
        """The job.json; ``rec`` is None for a job that failed before it could be claimed."""
        return output_record(
            state, options=spec.options(), meta=meta or {}, software_version=software_version(),
            input=staging.input_record(info) if info else {"uri": spec.input_uri, "etag": spec.etag,
                                                           "version_id": spec.version_id, "size": None,
                                                           "sha256": None},
            site=spec.site, case=spec.case, job_key=rec.key if rec else None, models=rec.models if rec else {},
            timings=timings or {}, started=started, attempt=rec.attempts if rec else 0, error=error)

    def _failed(self, spec: JobSpec, rec: JobRecord, exc: BaseException, started: float) -> JobOutcome:
        err = error_dict(exc)
        if err["status"] >= 500 and not isinstance(exc, MrisegError):
            log.error("job %s failed unexpectedly", rec.key[:12], exc_info=exc)
        audit("job.settled", job=rec.key[:16], site=spec.site, source="s3-event", status="failed",
              error=err["status"], retryable=err["retryable"], seconds=round(time.time() - started, 3),
              attempt=rec.attempts)
        if not err["retryable"] and not isinstance(exc, InputChangedError):
            # a poison input: publish the reason where the outputs would be, so a human sees it (not for a
            # version overwritten since its event: the new one's job publishes there, and must not be put off)
            doc = self._job_doc(spec, rec, FAILED, None, started, error=err)
            try:
                prefix, etag = self._placement(spec, rec.key, rec.models)
                rec.output_prefix = prefix
                self._put_job_json(doc, prefix + layout.JOB_RECORD, etag)
            except (MrisegError, _FolderChanged):
                log.warning("could not write the error job.json of job %s", rec.key[:12])
        try:
            rec = self.store.finish(rec, FAILED, error=err)
        except ClaimLost:
            pass
        return JobOutcome(rec.key, FAILED, rec.output_prefix, True, err)

    def _fail_unclaimed(self, spec: JobSpec, exc: MrisegError) -> JobOutcome:
        """The job could not even be identified (input gone, models missing), or its event names a version
        the object does not have: nothing to claim."""
        err = error_dict(exc)
        log.info("job not started: %d %s", err["status"], err["title"])
        try:
            prefix = spec.output_prefix
        except MrisegError:  # the input key itself is what is wrong: there is no folder to name
            prefix = ""
        if prefix and not err["retryable"] and not isinstance(exc, InputChangedError):
            # the message is acknowledged: the reason must outlive this log line (but a made-up or replaced
            # version's event leaves the folder to the version there now)
            self.publish_error(spec, err, prefix)
        return JobOutcome("", FAILED, prefix, False, err)

    def publish_error(self, spec: JobSpec, err: dict, prefix: str, key: str | None = None) -> None:
        """An error job.json (signed) where the outputs would have been, for a job nobody will run again.

        Never over a job.json already there, which may be an earlier version's result.
        """
        doc = {**self._job_doc(spec, None, FAILED, None, time.time(), error=err), "job_key": key}
        try:
            self._put_job_json(doc, prefix + layout.JOB_RECORD, None)
        except (StorageError, _FolderChanged):
            log.info("kept the job.json already in the output folder of a failed job")
