"""The router's job service: the one object the HTTP layer and the cluster call.

:class:`JobService` is a thin facade composing the parts, each in a module of its own:
:mod:`~serve.router.submission` (checks and accepts new jobs), :mod:`~serve.router.lifecycle`
(schedules, settles, cancels and resumes them, journalled), :mod:`~serve.router.execution` (stage in,
decode, plan, compute against the sub-models), :mod:`~serve.router.submodels` (describe, plan and call
the sub-model deployments), :mod:`~serve.router.writing` (outputs and their upload),
:mod:`~serve.router.kept` (the kept jobs and their eviction), :mod:`~serve.router.spool` (queued uploads
on disk) and :mod:`~serve.router.events` (event jobs). Jobs from different sites share the slots fairly
(:class:`~serve.router.scheduler.FairScheduler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Iterable, Mapping

import numpy as np
from pydantic import BaseModel, Field, model_validator

from serve.catalogue import Catalogue, load_catalogue
from serve.errors import ConflictError, MrisegError, NotFoundError
from serve.imaging.sandbox import SandboxedDecoder
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.router.admission import MemoryBudget
from serve.router.events import EventJobs
from serve.router.execution import Executor, MergeStep, PrepareStep
from serve.router.journal import JobJournal
from serve.router.kept import KeptJobs
from serve.router.lifecycle import ExecuteStep, JobLifecycle
from serve.router.metrics import JobMetrics, NoMetrics
from serve.router.scheduler import FairScheduler
from serve.router.spool import Spool
from serve.router.state import Job, JobOptions
from serve.router.submission import Submission
from serve.router.submodels import Describe, SubModelCall, SubModels
from serve.router.tenancy import Site, Tenancy
from serve.router.writing import ResultWriter, UploadStep, WriteStep
from serve.settings_checks import STRICT, Says, check, number, whole

# Below about a megabyte the journal holds a few hundred records: finished jobs would be evicted
# before their sites have read them.
_MIN_JOURNAL_BYTES = 1 << 20


class RouterSettings(BaseModel):
    """The ``router`` app arg (plus the app's ``s3``), checked as the Serve app starts."""

    model_config = STRICT

    results_dir: Annotated[str, Field(min_length=1), Says("a folder path")] = "/tmp/mriseg-results"
    # 0 would accept jobs that never run
    slots: whole(1) = 4                       # jobs holding sub-model calls at once (all sites)
    max_upload_bytes: whole(1) = 256 << 20
    max_voxels: whole(1, note="(or null for the default)") | None = None  # None: serve.imaging.volume_io's default
    submodel_retries: whole(0) = 1            # re-sends after a replica died mid-call
    # "1800" would fail every job at its first sub-model call
    submodel_timeout_s: number(1) = 1800.0   # one sub-model call, queueing included; then 503 (resubmit)
    max_jobs_kept: whole(1) = 10_000
    max_resumes: whole(0) = 2                 # a job running through more router restarts than this is given up
    # the job journal's folder; None: {results_dir}/.jobs
    journal_dir: Annotated[str, Field(min_length=1),
                           Says("a folder path (or null for {results_dir}/.jobs)")] | None = None
    # settled jobs' records beyond this are evicted too (as max_jobs_kept)
    journal_max_bytes: whole(_MIN_JOURNAL_BYTES, note="(1 MiB)") = 64 << 20
    memory_budget_bytes: whole(64 << 20) = 8 << 30   # router memory for running jobs' volumes (serve.router.admission)
    # below this much free space on the journal's volume the replica reports itself unhealthy
    journal_min_free_bytes: whole(0) = 16 << 20
    s3: Annotated[dict, Says("a mapping of S3 settings")] | None = None

    @model_validator(mode="after")
    def _journal_outside_the_spool(self) -> "RouterSettings":
        # the router removes every spooled file no unsettled job owns at start: that would be the records
        if self.journal_dir is not None:
            spool = Path(os.path.abspath(Path(self.results_dir) / ".incoming"))
            if Path(os.path.abspath(self.journal_dir)).is_relative_to(spool):
                raise ValueError(f"journal_dir {self.journal_dir} lies in the upload spool {spool}, whose unowned "
                                 f"files are removed at start; give the journal a folder of its own")
        return self

    def journal_path(self) -> Path:
        """The job journal's folder: ``journal_dir``, or ``{results_dir}/.jobs`` where it is not set.

        Returns:
            The folder (on a volume of its own in the k8s overlays, apart from the spool and results).
        """
        return Path(self.journal_dir) if self.journal_dir else Path(self.results_dir) / ".jobs"

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "RouterSettings":
        """The settings from the ``router`` app arg.

        Args:
            d: the mapping; None: every default.

        Returns:
            The checked settings.

        Raises:
            MrisegError: "router: {key} must be ...", naming the key.
        """
        d = dict(d or {})
        if d.get("s3") is not None and not isinstance(d["s3"], Mapping):
            raise MrisegError("s3: expected a mapping of S3 settings")
        return check(cls, d, "router")



class JobService:
    """Jobs, their scheduling and their execution; the HTTP layer calls only this.

    Every step a caller may want to replace (the sub-model calls, preprocessing, the merge, writing,
    uploading, the whole execution of a job) is a constructor argument whose default is the real one.
    """

    def __init__(self, tenancy: Tenancy, call: SubModelCall, describe: Describe,
                 deployed: list[str], settings: RouterSettings | None = None,
                 metrics: JobMetrics | None = None, catalogue: Catalogue | None = None,
                 put: Callable[[np.ndarray], Any] | None = None,
                 running_replicas: Callable[[], Awaitable[dict[str, int]]] | None = None,
                 decoder: SandboxedDecoder | None = None, reserved_prefixes: Iterable[str] = (), *,
                 prepare: PrepareStep | None = None, merge: MergeStep | None = None,
                 write: WriteStep | None = None, upload: UploadStep | None = None,
                 execute: ExecuteStep | None = None):
        """Args:
            tenancy: the sites, their keys, prefixes and job limits.
            call: segments a prepared array on a sub-model deployment.
            describe: what a sub-model deployment reports about its model.
            deployed: the sub-models deployed on this cluster.
            settings: the router's settings (default: every default).
            metrics: where the service's measurements go (default: nowhere).
            catalogue: the sub-models and structures (default: the packaged catalogue).
            put: stores a prepared array for the sub-models (default: ``ray.put``).
            running_replicas: each deployment's running replicas, for "cold" in :meth:`availability`.
            decoder: decodes inputs in a confined child (default: a :class:`SandboxedDecoder`).
            reserved_prefixes: s3:// prefixes no site may hold (the event intake's job records): event jobs
                stop while one does.
            prepare: preprocesses a volume at one spacing (default: serve.inference.preprocess's).
            merge: merges the sub-models' label maps onto the input grid (default: the Segmenter's).
            write: writes the output files (default: :func:`serve.router.writing.write_result`).
            upload: uploads a job's output folder to its ``output_prefix`` (default: to S3).
            execute: runs one scheduled job (default: :meth:`Executor.execute` with the parts above).
        """
        self.tenancy = tenancy
        self.reserved_prefixes = tuple(reserved_prefixes)
        self.settings = settings or RouterSettings()
        # every input is decoded in a confined child (serve.imaging.sandbox), never in this process
        self.decoder = decoder or SandboxedDecoder()
        self.catalogue = catalogue or load_catalogue()
        self.metrics = metrics or NoMetrics()
        self.submodels = SubModels(call, describe, deployed, self.catalogue, self.settings, self.metrics,
                                   running_replicas)
        self.journal = JobJournal(self.settings.journal_path())
        self.spool = Spool(Path(self.settings.results_dir) / ".incoming")
        self.writer = ResultWriter(self.settings, self.metrics, write, upload)
        self.executor = Executor(self.settings, self.metrics, self.catalogue, self.journal, self.submodels,
                                 self.writer, self.decoder, lambda: self.lifecycle.update_gauges(), put, prepare,
                                 merge)
        self.lifecycle = JobLifecycle(self.settings, tenancy, self.journal, self.spool, self.metrics,
                                      execute or self.executor.execute)
        self.kept = KeptJobs(self.journal, self.settings, busy=self.lifecycle.futures.__contains__)
        self.submission = Submission(tenancy, self.catalogue, self.lifecycle, self.kept, self.spool)
        self.events = EventJobs(self)
        for job in self.journal.load():
            self.kept.load(job)
            if not job.done:
                self.lifecycle.interrupted.append(job)
        self.spool.keep_only({j.id for j in self.lifecycle.interrupted})

    # -- the parts' state, as callers read it ------------------------------------------------------
    @property
    def jobs(self) -> OrderedDict[str, Job]:
        """The kept jobs by id, oldest first."""
        return self.kept.jobs

    @property
    def scheduler(self) -> FairScheduler:
        """The fair scheduler the jobs run on."""
        return self.lifecycle.scheduler

    @property
    def budget(self) -> MemoryBudget:
        """The memory budget running jobs are admitted within."""
        return self.executor.budget

    @property
    def deployed(self) -> list[str]:
        """The sub-models deployed on this cluster."""
        return self.submodels.deployed

    @deployed.setter
    def deployed(self, names: Iterable[str]) -> None:
        self.submodels.deployed = list(names)

    def future(self, job_id: str) -> asyncio.Future | None:
        """The scheduler's future of an accepted job not yet settled.

        Args:
            job_id: the job's id.

        Returns:
            The future (done once the job's run ended, maybe before it is settled), or None.
        """
        return self.lifecycle.futures.get(job_id)

    def site_limit(self, site: str) -> int:
        """The jobs ``site`` may have queued or running at once (1 for a site no longer in the tenants file).

        Args:
            site: the site's name.

        Returns:
            Its job limit.
        """
        return self.lifecycle.site_limit(site)

    async def check_health(self) -> None:
        """Raise when this service cannot take jobs safely: its scheduler stalled, or its journal cannot record.

        Runs the scheduler check on the event loop (a blocked loop never answers: Serve's health check times
        out) and the disk probe in a worker thread.

        Raises:
            SchedulerStalledError: queued jobs can no longer start.
            JournalUnhealthyError: the journal's folder is gone, read-only or nearly full.
        """
        self.scheduler.check()
        await asyncio.to_thread(self.journal.probe, self.settings.journal_min_free_bytes)

    def resume_interrupted(self) -> int:
        """Re-queue the jobs a previous router replica accepted but never settled
        (:meth:`JobLifecycle.resume_interrupted`, which says which resume and which fail).

        Returns:
            The number resumed.
        """
        return self.lifecycle.resume_interrupted()

    # -- submission --------------------------------------------------------------------------------
    def validate_options(self, site: Site, options: JobOptions) -> JobOptions:
        """400 on unknown structures/outputs, 403 on an output prefix outside the site's
        (:meth:`Submission.validate_options`)."""
        return self.submission.validate_options(site, options)

    def upload_slot(self, site: Site) -> contextlib.AbstractContextManager[None]:
        """Room for one of ``site``'s uploads while its body is read (429 when there is none)
        (:meth:`Submission.upload_slot`)."""
        return self.submission.upload_slot(site)

    def submit_once(self, site: Site, options: JobOptions, key: str | None, request_hash: str,
                    **submit: Any) -> tuple[Job, bool]:
        """The job an earlier POST of ``site`` with ``key`` made, or a new one (:meth:`Submission.submit_once`)."""
        return self.submission.submit_once(site, options, key, request_hash, **submit)

    def submit(self, site: Site, options: JobOptions, *, input_uri: str | None = None,
               upload: bytes | None = None, filename: str = "upload.nii.gz", source: str | None = None,
               idempotency: tuple[str, str] | None = None) -> Job:
        """Queue a job; raises 403/400/429 before anything is queued (:meth:`Submission.submit`)."""
        return self.submission.submit(site, options, input_uri=input_uri, upload=upload, filename=filename,
                                      source=source, idempotency=idempotency)

    # -- a job's life --------------------------------------------------------------------------------
    async def wait(self, job: Job) -> Job:
        """Wait until the job is settled (its own outcome is on the job, never raised here)."""
        return await self.lifecycle.wait(job)

    def get(self, site: Site, job_id: str) -> Job:
        """The job, if it belongs to ``site``; another site's job is indistinguishable from none (404)."""
        job = self.jobs.get(job_id)
        if job is None or job.site != site.name:
            raise NotFoundError(f"no segmentation job {job_id} for site {site.name}")
        return job

    def cancel(self, site: Site, job_id: str) -> Job:
        """Cancel ``site``'s job ``job_id``; 409 once it has settled.

        Args:
            site: the site.
            job_id: the job's id.

        Returns:
            The job, cancelled.
        """
        job = self.get(site, job_id)
        fut = self.future(job_id)
        if fut is not None and fut.done():
            self.lifecycle.settled(job, fut)  # finished a moment ago; its callback has not run yet
        if job.done:
            raise ConflictError(f"job {job_id} already {job.status}; nothing to cancel")
        self.lifecycle.cancel(job)
        return job

    def result_path(self, site: Site, job_id: str, kind: str = "multilabel") -> Path:
        """A local output file of a succeeded job: multilabel, statistics, preview or metadata."""
        job = self.get(site, job_id)
        if job.status != "succeeded":
            raise ConflictError(f"job {job_id} is {job.status}; the result exists once it has succeeded")
        path = job.outputs.get(kind)
        if not path or (kind == "per_structure"):
            raise NotFoundError(f"job {job_id} has no {kind} output (ask for it in 'outputs')")
        return Path(path)

    # -- event jobs: the intake names the site (by Ray handle, holding no key) ---------------------------
    def event_site(self, name: str) -> Site:
        """The site an event job is for, as the tenants file has it now (:meth:`EventJobs.site`)."""
        return self.events.site(name)

    async def event_checksums(self, site_name: str, roi_subset: list[str] | None, fast: bool) -> dict[str, Any]:
        """The checksums of the sub-models an event job of ``site_name`` would run (:meth:`EventJobs.checksums`)."""
        return await self.events.checksums(site_name, roi_subset, fast)

    async def run_event_job(self, site_name: str, data: bytes, filename: str, roi_subset: list[str] | None,
                            fast: bool, outputs: list[str], input_uri: str, output_prefix: str,
                            resampling_order: int = DEFAULT_RESAMPLING_ORDER) -> dict[str, Any]:
        """Run one event job of ``site_name`` as that site's job, and hand back its output files
        (:meth:`EventJobs.run`)."""
        return await self.events.run(site_name, data, filename, roi_subset, fast, outputs, input_uri,
                                     output_prefix, resampling_order)

    def site_limits(self) -> dict[str, int]:
        """Each site's ``max_concurrent_jobs``, as the tenants file has it now (:meth:`EventJobs.site_limits`)."""
        return self.events.site_limits()

    # -- availability -------------------------------------------------------------------------------
    async def describe(self, name: str) -> dict:
        """What a sub-model deployment reports about its model, cached once ready (:meth:`SubModels.describe`)."""
        return await self.submodels.describe(name)

    async def availability(self, probe: Iterable[str] = ()) -> dict[str, dict]:
        """Per sub-model state; scaled to zero is "cold", not woken up unless probed
        (:meth:`SubModels.availability`)."""
        return await self.submodels.availability(probe)
