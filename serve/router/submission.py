"""Accepting new jobs: options and access checked, uploads bounded per site, keyed POSTs made once.

Everything a submission can be refused for (400, 403, 413, 415, 422, 429, 503) is decided here, before
anything is queued; what is accepted is journalled, spooled and handed to :mod:`serve.router.lifecycle`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from serve.audit import audit
from serve.catalogue import Catalogue
from serve.errors import MrisegError, ServiceUnavailableError, TooManyRequestsError, UnsupportedFormatError
from serve.imaging.volume import SUPPORTED, suffix_of
from serve.inference.resampling import check_resampling_order
from serve.jobs.spec import OUTPUT_KINDS
from serve.router.idempotency import mismatch
from serve.router.kept import KeptJobs
from serve.router.lifecycle import JobLifecycle
from serve.router.spool import Spool
from serve.router.state import Job, JobOptions
from serve.router.tenancy import Site, Tenancy

log = logging.getLogger(__name__)


def check_upload_name(filename: str) -> None:
    """Refuse an upload whose name does not end in a suffix the decoder takes alone.

    Args:
        filename: the upload's name.

    Raises:
        UnsupportedFormatError: 415, naming the suffixes to use.
    """
    suffix = suffix_of(filename)
    if suffix not in SUPPORTED or suffix in (".mhd", ".nhdr"):  # a header whose data file cannot come along
        raise UnsupportedFormatError(f"unsupported upload type {suffix or '(none)'!r}; name the upload "
                                     f".nii, .nii.gz, .mha, .nrrd or .zip (a DICOM series) via ?filename=")


class Submission:
    """Checks and accepts new jobs of the sites."""

    def __init__(self, tenancy: Tenancy, catalogue: Catalogue, lifecycle: JobLifecycle, kept: KeptJobs,
                 spool: Spool):
        """Args:
            tenancy: the sites (access to prefixes).
            catalogue: the structures and sub-models (options checked against it).
            lifecycle: schedules what is accepted.
            kept: the kept jobs (where a new job goes; keyed jobs looked up).
            spool: where uploads wait.
        """
        self.tenancy, self.catalogue, self.lifecycle, self.kept, self.spool = tenancy, catalogue, lifecycle, kept, spool
        self._reading: dict[str, int] = {}  # site -> uploads whose bodies are being read

    def validate_options(self, site: Site, options: JobOptions) -> JobOptions:
        """400 on unknown structures/outputs, 403 on an output prefix outside the site's.

        Args:
            site: the submitting site.
            options: the job's options.

        Returns:
            The options, structures and resampling order checked and normalised.
        """
        if options.roi_subset is not None:
            if not options.roi_subset:
                raise MrisegError("roi_subset names no structure; name at least one, or leave it out for all")
            options.roi_subset = self.catalogue.validate_structures(options.roi_subset)
        self.catalogue.plan(options.roi_subset, options.fast)
        if not options.outputs:
            raise MrisegError(f"outputs names no output; choose from {list(OUTPUT_KINDS)}, or leave it out")
        bad = [o for o in options.outputs if o not in OUTPUT_KINDS]
        if bad:
            raise MrisegError(f"unknown output(s) {bad}; choose from {list(OUTPUT_KINDS)}")
        if options.output_prefix:
            self.tenancy.check_access(site, options.output_prefix, "write")
        options.resampling_order = check_resampling_order(options.resampling_order)
        return options

    @contextlib.contextmanager
    def upload_slot(self, site: Site) -> Iterator[None]:
        """Room for one of ``site``'s uploads while its body is read (429 when there is none).

        A site's jobs queued or running plus its uploads still being read stay within its job limit,
        so no site makes the router hold more upload bodies in memory than it may run jobs, and one
        that is at its limit is answered before a byte of its body is read.
        """
        limit = self.lifecycle.site_limit(site.name)
        if self.lifecycle.scheduler.active(site.name) + self._reading.get(site.name, 0) >= limit:
            raise TooManyRequestsError(f"site {site.name} already has {limit} job(s) queued, running or "
                                       f"uploading, its limit; retry after one finishes")
        self._reading[site.name] = self._reading.get(site.name, 0) + 1
        try:
            yield
        finally:
            self._reading[site.name] -= 1

    def submit_once(self, site: Site, options: JobOptions, key: str | None, request_hash: str,
                    **submit: Any) -> tuple[Job, bool]:
        """The job an earlier POST of ``site`` with ``key`` made, or a new one (:meth:`submit`) that keeps the key.

        The lookup and the new job's registration happen with no ``await`` between them, so concurrent
        POSTs with one key make one job.

        Args:
            site: the authenticated site; keys are looked up among its own jobs only.
            options: the job's options.
            key: the request's ``Idempotency-Key`` (None: always a new job).
            request_hash: the request's fingerprint (serve.api.idempotency).
            **submit: :meth:`submit`'s keyword arguments (the input).

        Returns:
            ``(job, created)``: created is False where an earlier job was found.

        Raises:
            IdempotencyKeyReusedError: 422, the key made a job from another request.
        """
        if key is not None:
            job = self.kept.by_key(site.name, key)
            if job is not None:
                if job.request_hash != request_hash:
                    raise mismatch(job.id)
                return job, False
        return self.submit(site, options, idempotency=(key, request_hash) if key else None, **submit), True

    def submit(self, site: Site, options: JobOptions, *, input_uri: str | None = None,
               upload: bytes | None = None, filename: str = "upload.nii.gz", source: str | None = None,
               idempotency: tuple[str, str] | None = None) -> Job:
        """Queue a job; raises 403/400/429 before anything is queued.

        Args:
            site: the submitting site.
            options: the job's options.
            input_uri: the ``s3://`` input (or ``upload``).
            upload: the uploaded volume's bytes.
            filename: the upload's name (its suffix picks the reader).
            source: names the job in the audit log (default: "s3" or "upload").
            idempotency: the ``(key, request fingerprint)`` the job keeps (:meth:`submit_once`).

        Returns:
            The queued job.
        """
        options = self.validate_options(site, options)
        if input_uri is not None:
            self.tenancy.check_access(site, input_uri, "read")
            if input_uri.endswith("/"):
                raise MrisegError("the input names a folder, not an object; give the volume's key")
        elif upload is None:
            raise MrisegError("a job needs an s3:// input or an uploaded volume")
        job = Job(site=site.name, options=options, input_uri=input_uri)
        if idempotency is not None:  # in the job's first record: a restarted router still knows the key
            job.idempotency_key, job.request_hash = idempotency
        # Queued uploads wait on disk, not in the router's memory.
        spooled = self.spool.path_for(job.id, suffix_of(filename)) if upload is not None else None
        try:
            if spooled is not None:
                spooled.write_bytes(upload)
            self.lifecycle.schedule(job, spooled, filename)
        except (MrisegError, OSError) as e:
            if spooled is not None:
                spooled.unlink(missing_ok=True)
            if isinstance(e, OSError):  # a full or failing disk: nothing was queued, the client may try again
                log.error("job %s not accepted: the router cannot write its spool or journal (%s)",
                          job.id, type(e).__name__)
                raise ServiceUnavailableError("the router cannot record the job on its disk right now; nothing "
                                              "was queued, try again later") from e
            raise
        audit("job.accepted", job=job.id, site=site.name, source=source or ("s3" if input_uri else "upload"),
              structures="all" if options.roi_subset is None else len(options.roi_subset))
        self.kept.index(job)
        self.kept.remember(job)
        self.lifecycle.update_gauges()
        return job
