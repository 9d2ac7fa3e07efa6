"""Running durable jobs: :class:`JobRunner` runs one job end to end, exactly once in effect.

It looks at the input (HEAD: an event naming a version the object does not have is refused with 412 before
anything is claimed or read), claims the job's record (:mod:`serve.jobs.store`), stages the input in,
segments (an :class:`serve.jobs.engine.Engine`), then publishes (:mod:`serve.jobs.publish`): looks at the
input again (a result of a version replaced meanwhile is not published) and stages the outputs out with a
signed ``job.json`` last, each ``job.json`` write conditional on the one last seen there; and marks the record
succeeded. Errors a user caused (corrupt file, 4xx from S3) end the job ``failed`` with the reason in the
record and in an error ``job.json``; retryable errors leave it ``failed`` with ``retryable`` so a redelivery
may claim it again.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from serve.audit import audit
from serve.errors import MrisegError
from serve.jobs.engine import Engine
from serve.jobs.publish import (FolderChanged, InputChangedError, Publisher, input_changed, input_missing,
                                is_version, job_doc)
from serve.jobs.spec import VOLUME_SUFFIXES, JobSpec, idempotency_key
from serve.jobs.store import ClaimLost, JobRecord, JobStore
from serve.outputs import layout
from serve.records_schema import FAILED, RUNNING, SUCCEEDED
from serve.storage import staging
from serve.storage.s3client import S3Settings, parse_s3_uri

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """What :meth:`JobRunner.run` made of a job: the consumer acknowledges, retries or settles on it."""

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
    """The problem a failed job records and answers with.

    Args:
        exc: what the job raised.

    Returns:
        ``{status, title, detail, retryable}``: a :class:`serve.errors.MrisegError`'s own, else a retryable 500
        that names only the exception's type.
    """
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
        self.publisher = Publisher(settings, store.signer)

    def _fill_version(self, spec: JobSpec, head: Mapping[str, Any] | None = None) -> JobSpec:
        """``spec`` with the ETag and version id of the object as it is now, where it names neither."""
        if spec.etag or spec.version_id:
            return spec
        head = head or self.publisher.input_head(spec)
        if head is None:
            raise input_missing(spec)
        return JobSpec.from_dict({**spec.to_dict(), "etag": head["ETag"], "version_id": head.get("VersionId")})

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
            head = self.publisher.input_head(spec)
            if head is None:
                raise input_missing(spec)
            spec, key, models = self.key_for(self._fill_version(spec, head))
        except MrisegError as e:
            return self._fail_unclaimed(spec, e)
        if not is_version(spec, head):
            rec = self.store.get(key)
            if rec is not None and (rec.state == SUCCEEDED or (rec.state == FAILED and not rec.retryable)):
                return JobOutcome(key, rec.state, rec.output_prefix, False, rec.error, rec.outputs)
            return self._fail_unclaimed(spec, input_changed(spec, "is not the version its event names"))
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
            raise input_changed(spec, "changed since the event")
        download_s = time.perf_counter() - t
        outdir = tmp / "out"
        outdir.mkdir()
        meta = self.engine.segment_file(local, spec, outdir)
        timings = {"download_s": download_s, **meta.get("timings", {})}
        doc = job_doc(spec, rec, SUCCEEDED, info, started, timings=timings, meta=meta)
        t = time.perf_counter()
        outputs = self.publisher.publish(spec, rec, models, outdir, doc, lost)
        log.debug("uploaded outputs in %.2fs", time.perf_counter() - t)
        return outputs, meta, info

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
            doc = job_doc(spec, rec, FAILED, None, started, error=err)
            try:
                prefix, etag = self.publisher.placement(spec, rec.key, rec.models)
                rec.output_prefix = prefix
                self.publisher.put_job_json(doc, prefix + layout.JOB_RECORD, etag)
            except (MrisegError, FolderChanged):
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

        Never over a job.json already there, which may be an earlier version's result
        (:meth:`serve.jobs.publish.Publisher.publish_error`).

        Args:
            spec: the job.
            err: its problem (``{status, title, detail, retryable}``).
            prefix: the output folder.
            key: the job's idempotency key, where it has one.
        """
        self.publisher.publish_error(spec, err, prefix, key)
