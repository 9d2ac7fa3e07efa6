"""Durable job records in the object store, with atomic claims and leases.

The record ``s3://{jobs bucket}/{prefix}/jobs/{key}.json`` (``mriseg.job/1``,
:mod:`serve.records_schema`; ``key`` is the job's idempotency key, :mod:`serve.jobs.spec`) moves
queued -> running -> succeeded | failed.
Claims are atomic conditional writes:
``IfNoneMatch="*"`` creates a record only if none exists, ``IfMatch=<ETag>``
takes over a queued record, a failed-retryable one, a ``running`` claim
whose lease expired (its worker died), or a record this server did not sign.
Both SeaweedFS 4.48 and moto honour these headers (answering 412), as AWS S3
does since 2024. Records are signed (:mod:`serve.jobs.records`): one that does not
verify reads as absent, so a forged ``running`` record cannot block a job.
:mod:`serve.jobs.runner` runs the jobs these records track.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping

from botocore.exceptions import ClientError

from serve.clock import SYSTEM_CLOCK, Clock
from serve.errors import MrisegError, StorageError
from serve.jobs.records import MAX_RECORD_BYTES, ForgedRecord, RecordSigner, rejected
from serve.jobs.spec import JobSpec
from serve.records_schema import (FAILED, QUEUED, RUNNING, SUCCEEDED, MalformedRecord, job_record_doc,
                                  read_job_record)
from serve.storage import staging
from serve.storage.s3client import S3Settings, parse_s3_uri

log = logging.getLogger(__name__)


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
