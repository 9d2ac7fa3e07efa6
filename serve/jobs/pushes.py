"""Pushed event jobs held in S3 until they settle, so a replica that dies loses none.

``POST /v1/events`` answers 202, and a webhook that got a 2xx does not send
again. So each pushed job is written to ``s3://{jobs prefix}/pushed/<id>.json``
*before* the answer, and removed only once the job has settled (done, or
failed for good). What a dead replica held is found by the next one
(:meth:`PushJournal.held`) and run again; the job's idempotency key makes a
second run of a finished job a lookup, not a recomputation. This is the
pushed path's counterpart of an SQS message's visibility timeout.

One record per object: ``<id>`` is a digest of (site, bucket, key), so N
pushes for one object (N made-up ETags, say) hold one job, the latest push's.
Each update of a record is conditional on the ETag this replica last saw, so
a run of an earlier push never removes or rewrites the record of a later one
(that one runs at the next sweep).

Each record's body is a ``mriseg.push/1`` (:mod:`serve.records_schema`; one
without a ``format``, written before formats, is read as before, and one of a
format this version does not know is left for the version that wrote it).
Records are signed (:mod:`serve.jobs.records`, envelope layout, bound to their
key). One that does not verify is never run: it is audited
(``record.rejected``) and set aside as ``<id>.json.unsigned`` (no MAC: a
record written before signing, or by someone else) or ``<id>.json.forged``
(a MAC that does not verify), and removed from ``pushed/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from serve.storage import staging
from serve.clock import SYSTEM_CLOCK, Clock
from serve.errors import StorageError, VolumeTooLargeError
from serve.jobs.spec import JobSpec
from serve.jobs.store import precondition_failed
from serve.jobs.records import MAX_RECORD_BYTES, ForgedRecord, RecordSigner, rejected
from serve.records_schema import PushRecord, UnsupportedRecordFormat, read_versioned, versioned_doc
from serve.storage.s3client import S3Settings, parse_s3_uri

log = logging.getLogger(__name__)

#: a job still unsettled after this many runs (a retryable failure each time) is let go; its job
#: record keeps the last failure and its reason
MAX_ATTEMPTS = 5
#: the wait before an unsettled job runs again starts at the sweep interval and doubles, up to this
MAX_RETRY_DELAY_S = 900.0


def retry_delay_s(attempts: int, first_s: float) -> float:
    """The wait after a job's ``attempts``-th unsettled run: ``first_s``, doubling, at most MAX_RETRY_DELAY_S.

    Doubling spreads the 5 runs over minutes (about 15 with the default 60 s sweep), so a site held at
    its rate limit or a cluster restarting for a while does not use them up at once.
    """
    return min(first_s * 2 ** max(0, attempts - 1), MAX_RETRY_DELAY_S)


@dataclass
class HeldPush:
    """One pushed job not yet settled."""

    id: str
    spec: JobSpec
    attempts: int = 0
    created: float = 0.0
    not_before: float = 0.0     # (epoch seconds) no run before this: the backoff after an unsettled run
    etag: str | None = None     # of the stored record as this replica last wrote or read it


def push_id(spec: JobSpec) -> str:
    """The held record's id of a pushed object: one per (site, bucket, key), whatever the ETag."""
    bucket, key = parse_s3_uri(spec.input_uri)
    return hashlib.sha256(json.dumps([spec.site, bucket, key]).encode()).hexdigest()[:32]


class PushJournal:
    """Pushed jobs under ``s3://{bucket}/{prefix}/pushed/``, one signed object per pushed object.

    ``signer`` None: :meth:`serve.jobs.records.RecordSigner.from_env`. ``clock`` stamps ``created`` and
    ``not_before`` (:mod:`serve.clock`; the real one by default).
    """

    def __init__(self, jobs_uri: str, settings: S3Settings | Mapping[str, Any] | None = None,
                 signer: RecordSigner | None = None, clock: Clock = SYSTEM_CLOCK):
        self.bucket, self.prefix = parse_s3_uri(jobs_uri.rstrip("/") + "/")
        self.settings = settings
        self.clock = clock
        self.signer = signer or RecordSigner.from_env()

    def _key(self, push_id: str) -> str:
        return f"{self.prefix}pushed/{push_id}.json"

    def _uri(self, push_id: str) -> str:
        return f"s3://{self.bucket}/{self._key(push_id)}"

    def _write(self, held: HeldPush, **cond: str) -> bool:
        """Store ``held`` (signed); False when ``cond`` did not hold (a later push replaced the record)."""
        body = versioned_doc(PushRecord, {"spec": held.spec.to_dict(), "attempts": held.attempts,
                                          "created": held.created, "not_before": held.not_before})
        doc = self.signer.seal(body, bucket=self.bucket, key=self._key(held.id), site=held.spec.site)
        try:
            held.etag = staging.put_json(doc, self._uri(held.id), self.settings, **cond)["ETag"]
        except StorageError as e:
            if cond and precondition_failed(e):
                log.info("held pushed job %s was replaced by a later push of its object; that one runs", held.id[:12])
                return False
            raise
        return True

    def _if_unchanged(self, held: HeldPush) -> dict[str, str]:
        return {"IfMatch": held.etag} if held.etag else {}

    def hold(self, spec: JobSpec) -> HeldPush:
        """Record an accepted push, in place of any held one of the same object (raises
        :class:`serve.errors.StorageError` if S3 cannot take it)."""
        held = HeldPush(push_id(spec), spec, 0, self.clock.time())
        self._write(held)
        return held

    def attempted(self, held: HeldPush, delay_s: float = 0.0) -> HeldPush:
        """Count a run that did not settle the job, to run again no sooner than ``delay_s`` from now;
        the record says so should this replica die (unless a later push replaced it: that one stays)."""
        held.attempts += 1
        held.not_before = self.clock.time() + delay_s
        self._write(held, **self._if_unchanged(held))
        return held

    def deferred(self, held: HeldPush, not_before: float) -> HeldPush:
        """Run again no sooner than ``not_before``, without counting a run: another worker holds
        the job, and whether it settles it shows only once that worker's claim would have lapsed."""
        held.not_before = not_before
        self._write(held, **self._if_unchanged(held))
        return held

    def release(self, held: HeldPush) -> None:
        """Remove a settled job's record, unless a later push of the object has replaced it."""
        self._delete(self._key(held.id), held.etag)

    def _delete(self, key: str, etag: str | None) -> None:
        c = staging.client_for(self.settings)
        cond = {"IfMatch": etag} if etag else {}
        try:
            staging.with_retries(lambda: c.delete_object(Bucket=self.bucket, Key=key, **cond), bucket=self.bucket,
                                 action="delete a held pushed job")
        except StorageError as e:
            if not (precondition_failed(e) or getattr(e, "status", None) == 404):
                raise

    def held(self) -> list[HeldPush]:
        """Every push not yet settled, oldest first. A record that does not verify is set aside, never run;
        one of a format this version does not know (a newer version's) is left where it is, not run."""
        c = staging.client_for(self.settings)

        def listing() -> list[str]:
            pages = c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}pushed/")
            return [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"].endswith(".json")]

        out = []
        for key in staging.with_retries(listing, bucket=self.bucket, action="list pushed jobs"):
            push_id = key.rsplit("/", 1)[1][: -len(".json")]
            uri = f"s3://{self.bucket}/{key}"
            try:
                raw, info = staging.download_object(uri, MAX_RECORD_BYTES, self.settings)
            except staging.S3RequestError as e:
                if e.status == 404:  # released since it was listed
                    continue
                raise
            except (VolumeTooLargeError, staging.IntegrityError) as e:  # not ours: not copied aside, removed
                head = staging.object_exists(uri, self.settings)
                rejected("push", self.bucket, key, "oversized" if isinstance(e, VolumeTooLargeError) else "checksum")
                if head is not None:
                    self._delete(key, head["ETag"])
                continue
            try:
                _, doc = self.signer.unseal(json.loads(raw), bucket=self.bucket, key=key)
            except (ValueError, RecursionError, ForgedRecord) as e:
                reason = e.reason if isinstance(e, ForgedRecord) else "unsigned"
                rejected("push", self.bucket, key, reason)
                self._set_aside(raw, key, info.etag, "unsigned" if reason == "unsigned" else "forged")
                continue
            try:
                doc = read_versioned(doc, PushRecord)  # a mriseg.push/1 body validated; a legacy one as it is
                out.append(HeldPush(push_id, JobSpec.from_dict(doc["spec"]), int(doc.get("attempts", 0)),
                                    float(doc.get("created", 0.0)), float(doc.get("not_before", 0.0)), info.etag))
            except UnsupportedRecordFormat as e:
                # a newer version's push (a mixed-version rollout): neither run nor set aside, that version runs it
                log.error("held pushed job %s is left for the version that wrote it: %s", push_id[:12], e.message)
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
                log.warning("pushed job record %s is unreadable; set aside as .unreadable", push_id)
                self._set_aside(raw, key, info.etag, "unreadable")
        return sorted(out, key=lambda h: h.created)

    def _set_aside(self, raw: bytes, key: str, etag: str, suffix: str) -> None:
        """Keep a copy of a record that is not run for a person to look at, and remove it from ``pushed/``
        (unless a push replaced it meanwhile)."""
        staging.put_bytes(raw, f"s3://{self.bucket}/{key}.{suffix}", self.settings)
        self._delete(key, etag)
