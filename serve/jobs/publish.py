"""Publishing a durable job's outputs: the ``job.json`` it writes, where, and on what condition.

An output set in ``{output_root}/{site}/{case}/`` ends with a signed ``job.json`` (``mriseg.output/1``,
:mod:`serve.records_schema`; inline layout, :mod:`serve.jobs.records`). That folder is one the site may write
to, so a ``job.json`` there that does not verify is someone else's: never replaced or trusted on its word.
Each ``job.json`` write is conditional on the one last seen there, and the input is looked at again just
before publishing: a result of a version replaced meanwhile is not published.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from serve.errors import StorageError, VolumeTooLargeError
from serve.jobs.records import MAX_RECORD_BYTES, ForgedRecord, RecordSigner, rejected
from serve.jobs.spec import JobSpec, software_version
from serve.jobs.store import ClaimLost, JobRecord, conditions, precondition_failed
from serve.outputs import layout
from serve.records_schema import (FAILED, RUNNING, SUCCEEDED, MalformedRecord, check_output_record, output_record,
                                  read_output_record)
from serve.storage import staging
from serve.storage.s3client import S3Settings, parse_s3_uri

log = logging.getLogger(__name__)


class InputChangedError(staging.S3RequestError):
    """The input was overwritten between its event and its download: this event's job has nothing to do."""


class FolderChanged(Exception):
    """The output folder's job.json is no longer the one this job last saw (another job publishes there)."""


def is_version(spec: JobSpec, head: Mapping[str, Any] | None) -> bool:
    """Whether the input object as it is now is the version a job names.

    Args:
        spec: the job (its ``version_id``, else its ``etag``).
        head: the input object's HEAD now (None: there is none).

    Returns:
        True when ``head`` is that version.
    """
    if head is None:
        return False
    if spec.version_id and spec.version_id != "null":
        return head.get("VersionId") == spec.version_id
    return bool(spec.etag) and head["ETag"].strip('"') == spec.etag.strip('"')


def input_missing(spec: JobSpec) -> staging.S3RequestError:
    """The 404 of a job whose input object does not exist.

    Args:
        spec: the job.

    Returns:
        The error to raise or record.
    """
    bucket, _ = parse_s3_uri(spec.input_uri)
    return staging.S3RequestError(f"the input object does not exist in bucket '{bucket}'", 404, "NoSuchKey")


def input_changed(spec: JobSpec, what: str) -> InputChangedError:
    """The 412 of a job whose input is not (or no longer) the version it names.

    Args:
        spec: the job.
        what: what happened to the input, completing "the input object in bucket 'B' ...".

    Returns:
        The error to raise or record.
    """
    bucket, _ = parse_s3_uri(spec.input_uri)
    return InputChangedError(f"the input object in bucket '{bucket}' {what}; the version there now gets its "
                             f"own event", 412, "PreconditionFailed")


def job_doc(spec: JobSpec, rec: JobRecord | None, state: str, info: staging.ObjectInfo | None,
            started: float, *, timings: dict | None = None, meta: dict | None = None,
            error: dict | None = None) -> dict:
    """The job.json of a job (unsigned; :meth:`Publisher.put_job_json` signs and validates it).

    Args:
        spec: the job.
        rec: its record; None for a job that failed before it could be claimed.
        state: ``succeeded``, ``failed`` or ``running``.
        info: the input as downloaded; None: only what ``spec`` names of it.
        started: when the job started (epoch seconds).
        timings: the job's timings.
        meta: what the engine returned of the segmentation.
        error: the problem of a failed job.

    Returns:
        The ``mriseg.output/1`` document.
    """
    return output_record(
        state, options=spec.options(), meta=meta or {}, software_version=software_version(),
        input=staging.input_record(info) if info else {"uri": spec.input_uri, "etag": spec.etag,
                                                       "version_id": spec.version_id, "size": None,
                                                       "sha256": None},
        site=spec.site, case=spec.case, job_key=rec.key if rec else None, models=rec.models if rec else {},
        timings=timings or {}, started=started, attempt=rec.attempts if rec else 0, error=error)


class Publisher:
    """Publishes jobs' output sets and their signed job.json (with ``signer``, the job store's)."""

    def __init__(self, settings: S3Settings | Mapping[str, Any] | None, signer: RecordSigner):
        self.settings = settings
        self.signer = signer

    def input_head(self, spec: JobSpec) -> dict | None:
        """The HEAD of the job's input object as it is now (None: there is none)."""
        return staging.object_exists(spec.input_uri, self.settings)

    def read_job_json(self, uri: str) -> tuple[dict | None, str | None]:
        """The job.json at ``uri`` if this server signed it for that place (else None, audited), in this
        version's vocabulary (:func:`serve.records_schema.read_output_record`; one of a newer format raises
        :class:`serve.records_schema.UnsupportedRecordFormat`), and the ETag of whatever is there (None: nothing).

        Args:
            uri: ``s3://`` URI of a job.json.

        Returns:
            ``(document or None, ETag or None)``.
        """
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

    def placement(self, spec: JobSpec, key: str, models: Mapping[str, str]) -> tuple[str, str | None]:
        """Where the job publishes, and the ETag of the job.json there now (None: none).

        ``{site}/{case}/`` unless another job (other options or models) published there, or what is there
        was not signed by this server for that folder (a site may write in its output folders, and what it
        wrote is never replaced on its word): then ``runs/<key16>/``. Its own earlier attempt, the reason
        its input failed before, and the set (or the ``running`` marker) of an earlier version of the
        same input made the same way are replaced: the case folder shows the input as it is now.

        Args:
            spec: the job.
            key: its idempotency key.
            models: the checksums of its sub-models.

        Returns:
            ``(output prefix, ETag of the job.json there or None)``.
        """
        base = spec.output_prefix
        existing, etag = self.read_job_json(base + layout.JOB_RECORD)
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
        return is_version(spec, self.input_head(spec))

    def publish(self, spec: JobSpec, rec: JobRecord, models: Mapping[str, str], outdir: Path, doc: dict,
                 lost: Callable[[], bool]) -> dict[str, str]:
        """Upload the outputs, then the signed job.json, where :meth:`placement` says; returns the URIs.

        Just before, the input is looked at again: a job whose input was replaced (or deleted) while it ran
        publishes nothing (:class:`InputChangedError`, 412), so an older version's result never replaces a
        newer one's; the version there now has its own job. The folder's job.json is first replaced by a
        signed ``running`` marker (no reader takes the files for a whole set; it names the job, so the
        folder's next job can tell whose it is), conditionally on the one the placement read (``If-Match``, or
        ``If-None-Match`` where there was none); the uploads stop once the marker is replaced, and the
        succeeded job.json is written ``If-Match`` the marker. Of two jobs publishing into one folder at once,
        the later marker wins and the other decides again.

        Args:
            spec: the job.
            rec: its record (its ``output_prefix`` is set to where the set goes).
            models: the checksums of its sub-models.
            outdir: the folder of output files.
            doc: the succeeded job.json (:func:`job_doc`).
            lost: says whether the job's claim was lost (the uploads then stop with :class:`ClaimLost`).

        Returns:
            The ``s3://`` URI of each published file, by name.
        """
        for _ in range(3):
            prefix, etag = self.placement(spec, rec.key, models)
            if not is_version(spec, self.input_head(spec)):
                raise input_changed(spec, "was replaced or deleted while its job ran")
            if lost():  # the new holder publishes there: replacing its job.json with ours would mix two runs
                raise ClaimLost("the job was taken over while it ran")
            rec.output_prefix = prefix
            try:
                return self._publish_at(prefix, etag, outdir, doc, lost)
            except FolderChanged:
                log.info("the output folder of job %s changed while it published; deciding again", rec.key[:12])
        raise StorageError(f"the output folder of job {rec.key[:16]} kept changing while it published; "
                           f"the job is tried again later")

    def _publish_at(self, prefix: str, etag: str | None, outdir: Path, doc: dict,
                    lost: Callable[[], bool]) -> dict[str, str]:
        uri = prefix + layout.JOB_RECORD
        marker = self.put_job_json({**doc, "status": RUNNING}, uri, etag)

        def still_ours(_name: str) -> None:
            if lost():
                raise ClaimLost("the job was taken over while it published")
            head = staging.object_exists(uri, self.settings)
            if head is None or head["ETag"].strip('"') != marker.strip('"'):
                raise FolderChanged()

        outputs = staging.upload_dir(outdir, prefix, self.settings, on_uploaded=still_ours, last=())
        self.put_job_json(doc, uri, marker)
        outputs[layout.JOB_RECORD] = uri
        return outputs

    def put_job_json(self, doc: dict, uri: str, etag: str | None) -> str:
        """Write ``doc`` signed at ``uri`` in place of exactly the job.json last seen there (``etag``; None:
        none); returns the new ETag, or raises :class:`FolderChanged` when another has landed since. The
        signed document is validated first (``mriseg.output/1``): nothing malformed is published.

        Args:
            doc: the job.json, unsigned.
            uri: where it goes.
            etag: the ETag of the job.json last seen there (None: none was).

        Returns:
            The ETag of the written job.json.
        """
        bucket, key = parse_s3_uri(uri)
        signed = check_output_record(self.signer.stamp(doc, bucket=bucket, key=key))
        try:
            resp = staging.put_json(signed, uri, self.settings, **conditions(etag))
        except StorageError as e:
            if precondition_failed(e):
                raise FolderChanged() from e
            raise
        return resp["ETag"]

    def publish_error(self, spec: JobSpec, err: dict, prefix: str, key: str | None = None) -> None:
        """An error job.json (signed) where the outputs would have been, for a job nobody will run again.

        Never over a job.json already there, which may be an earlier version's result.

        Args:
            spec: the job.
            err: its problem (``{status, title, detail, retryable}``).
            prefix: the output folder.
            key: the job's idempotency key, where it has one.
        """
        doc = {**job_doc(spec, None, FAILED, None, time.time(), error=err), "job_key": key}
        try:
            self.put_job_json(doc, prefix + layout.JOB_RECORD, None)
        except (StorageError, FolderChanged):
            log.info("kept the job.json already in the output folder of a failed job")
