"""Runs segmentation jobs across the sub-model deployments.

One job: stage the input, preprocess once per spacing, ``ray.put`` the array
once and hand the same ObjectRef to every sub-model it needs (in parallel),
merge, return to the input grid, write outputs. CPU-heavy steps run in
worker threads so the ingress event loop keeps answering health and status
calls. Jobs from different sites share the slots fairly
(:class:`~serve.router.scheduler.FairScheduler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Iterable, Iterator, Mapping

import numpy as np
from pydantic import Field, model_validator

from serve.audit import audit
from serve.catalogue import Catalogue, SubModel, load_catalogue
from serve.errors import (ConflictError, ForbiddenError, ModelUnavailableError, MrisegError, NotFoundError,
                          ServiceUnavailableError, TooManyRequestsError, UnsupportedFormatError, VolumeTooLargeError)
from serve.imaging.sandbox import SandboxedDecoder
from serve.imaging.volume import DEFAULT_MAX_VOXELS, SUPPORTED, suffix_of
from serve.inference.pipeline import SegmentationResult, input_cast, is_demo_model, merge_to_input_grid
from serve.inference.preprocess import prepare
from serve.inference.resampling import CAST_NONE, DEFAULT_RESAMPLING_ORDER, check_resampling_order
from serve.jobs import results
from serve.jobs.store import OUTPUT_KINDS, error_dict
from serve.outputs import layout
from serve.outputs.writers import write_outputs
from serve.router.admission import MemoryBudget, job_bytes, max_admissible_voxels
from serve.router.idempotency import KEEP_KEYED_S, mismatch
from serve.router.journal import JobJournal
from serve.router.metrics import JobMetrics, NoMetrics
from serve.router.scheduler import FairScheduler
from serve.router.state import Job, JobOptions
from serve.router.tenancy import Site, Tenancy, prefix_key
from serve.settings_checks import STRICT, Says, check, number, whole
from serve.storage import staging
from serve.storage.staging import ObjectInfo

log = logging.getLogger(__name__)

# Below about a megabyte the journal holds a few hundred records: finished jobs would be evicted
# before their sites have read them.
_MIN_JOURNAL_BYTES = 1 << 20


@dataclass
class RouterSettings:
    """The ``router`` app arg (plus the app's ``s3``), checked as the Serve app starts."""

    __pydantic_config__ = STRICT  # how from_mapping validates a file's mapping (pydantic)

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


# A sub-model call: (name, [ObjectRef], spacing) -> {"labels", "started", "finished", ...}
SubModelCall = Callable[[str, Any, float], Awaitable[dict]]
Describe = Callable[[str], Awaitable[dict]]


async def _in_thread(fn, *args, on_cancel: threading.Event | None = None):
    """Run ``fn`` in a worker thread. A thread cannot be stopped, so a cancelled job keeps its slot (and
    its site's count) until the thread returns: cancelling cannot start more work than the limits allow.
    ``on_cancel`` is set when the job is cancelled, for work that can stop early (the decoder child)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel.set()
        await asyncio.wait([task])
        raise


def _is_replica_failure(exc: BaseException) -> bool:
    """Ray errors meaning the replica or its actor went away (worth one retry, then 503)."""
    # lazy: ray takes seconds to import; only code running under Ray needs it
    from ray import exceptions as rex

    kinds = tuple(k for k in (getattr(rex, n, None) for n in (
        "ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError",
        "NodeDiedError", "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError",
        "TaskCancelledError")) if k)
    try:  # a request cancelled under us (a replica draining for shutdown) is not the user's cancel
        # lazy: ray takes seconds to import; only code running under Ray needs it
        from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

        kinds += (DeploymentUnavailableError, RequestCancelledError)
    except ImportError:  # pragma: no cover - older Ray
        pass
    return isinstance(exc, kinds)


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error, where there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MrisegError):
        return cause
    return exc


class JobService:
    """Jobs, their scheduling and their execution; the HTTP layer calls only this."""

    def __init__(self, tenancy: Tenancy, call: SubModelCall, describe: Describe,
                 deployed: list[str], settings: RouterSettings | None = None,
                 metrics: JobMetrics | None = None, catalogue: Catalogue | None = None,
                 put: Callable[[np.ndarray], Any] | None = None,
                 running_replicas: Callable[[], Awaitable[dict[str, int]]] | None = None,
                 decoder: SandboxedDecoder | None = None, reserved_prefixes: Iterable[str] = ()):
        self.tenancy = tenancy
        # s3:// prefixes no site may hold (the event intake's job records): event jobs stop while one does
        self.reserved_prefixes = tuple(reserved_prefixes)
        self.settings = settings or RouterSettings()
        # every input is decoded in a confined child (serve.imaging.sandbox), never in this process
        self.decoder = decoder or SandboxedDecoder()
        self.budget = MemoryBudget(self.settings.memory_budget_bytes)
        # the decoder refuses, from the header, a volume that the memory budget could never admit
        self._max_voxels = min(self.settings.max_voxels or DEFAULT_MAX_VOXELS,
                               max_admissible_voxels(self.settings.memory_budget_bytes))
        self.catalogue = catalogue or load_catalogue()
        self.metrics = metrics or NoMetrics()
        self.deployed = list(deployed)
        self._call, self._describe = call, describe
        self._put = put or _ray_put
        self._running_replicas = running_replicas
        self._descriptions: dict[str, dict] = {}
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.scheduler = FairScheduler(self.settings.slots, self._site_limit)
        self._futures: dict[str, asyncio.Future] = {}
        self._reading: dict[str, int] = {}  # site -> uploads whose bodies are being read
        self._seq = 0
        self._incoming = Path(self.settings.results_dir) / ".incoming"
        self._incoming.mkdir(parents=True, exist_ok=True)
        self.journal = JobJournal(self.settings.journal_path())
        self._interrupted: list[Job] = []
        # (site, Idempotency-Key) -> job id, for every kept job a keyed POST made; rebuilt from the journal
        self._keys: dict[tuple[str, str], str] = {}
        for job in self.journal.load():
            self.jobs[job.id] = job
            if job.idempotency_key is not None:
                self._keys[(job.site, job.idempotency_key)] = job.id
            if not job.done:
                self._interrupted.append(job)
        waiting = {j.id for j in self._interrupted}
        for f in self._incoming.iterdir():  # spooled by a router that died before it journalled the job
            if f.name.split(".", 1)[0] not in waiting:
                f.unlink(missing_ok=True)

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
        """Re-queue the jobs a previous router replica accepted but never settled (call from the event loop).

        A job resumes where its input is still at hand and its site may still
        have it run: the tenants file may have changed while the router was
        down, so a job whose site is gone (503), or whose input or
        ``output_prefix`` is no longer inside the site's prefixes (403), fails
        as a new submission would be refused. Otherwise it fails with a
        reason. Only a job that was running when the router died is charged
        the restart (``job.resumed``): a queued job had not started, so it
        cannot have brought the router down, and it resumes uncharged however
        often the router restarts. A job charged ``max_resumes`` times already
        is given up at the next restart it was running through, so that one
        job cannot keep taking the router (and every site's jobs) down.
        Returns the number resumed.
        """
        resumed = 0
        while self._interrupted:
            job = self._interrupted.pop(0)
            spooled = next(iter(self._incoming.glob(f"{job.id}*")), None)
            site = self.tenancy.sites.get(job.site)
            was_running = job.status == "running"  # as the journal had it when the router died
            try:
                if site is None:
                    raise ServiceUnavailableError(f"site {job.site} is no longer configured in the tenants file, "
                                                  f"so its job was not resumed after a router restart")
                for uri, what in ((job.input_uri, "input"), (job.options.output_prefix, "output_prefix")):
                    if uri is not None and not site.owns(uri):
                        raise ForbiddenError(f"the job was not resumed after a router restart: its {what} is no "
                                             f"longer inside site {site.name}'s prefixes in the tenants file")
                if was_running and job.resumed >= self.settings.max_resumes:
                    # nothing says this job's input is to blame (another job may have crashed the router),
                    # so the reason names what happened and asks for a resubmission only
                    raise ServiceUnavailableError(
                        f"the router restarted {job.resumed + 1} times while this job was running, so it was "
                        f"given up to protect the other jobs (router.max_resumes is "
                        f"{self.settings.max_resumes}); resubmit it")
                if job.input_uri is None and spooled is None:
                    raise ServiceUnavailableError("the router restarted and the uploaded volume was not kept; "
                                                  "upload it again")
                job.status, job.started, job.timings, job.submodels = "queued", None, {}, {}
                if was_running:
                    job.resumed += 1
                self._schedule(job, spooled, spooled.name if spooled else "upload.nii.gz")
                resumed += 1
                audit("job.resumed", job=job.id, site=job.site, resumed=job.resumed, charged=was_running)
            except Exception as e:  # noqa: BLE001 - one odd record must not stop the others
                job.fail(e if isinstance(e, MrisegError) else ServiceUnavailableError(
                    f"the job could not be resumed after a router restart ({type(e).__name__}); resubmit it"))
                self._record(job)
                audit("job.settled", job=job.id, site=job.site, status="failed", error=job.error["status"],
                      reason="router restart")
                if spooled is not None:
                    spooled.unlink(missing_ok=True)
        return resumed

    def _record(self, job: Job) -> bool:
        """Journal a settled or cancelled job; a disk that fails now is logged, not raised.

        The outcome is already on the job, which clients read from memory. Raising
        would abandon the caller half way (the other interrupted jobs of a restart,
        the spool clean-up of a settled job) over a record whose only loss is that
        a later restart would see the job unsettled and resume it. Returns whether
        the record was written.
        """
        try:
            self.journal.save(job)
            return True
        except OSError as e:
            log.error("job %s is %s but its journal record could not be written (%s); a restart would resume it",
                      job.id, job.status, type(e).__name__)
            return False

    def _forget(self, job: Job) -> None:
        """Drop the journal record of a cancelled job whose cancellation could not be recorded.

        Its record still says queued or running, and a restart would run the job
        the user cancelled. Removing a file still works on a full disk, where
        writing one does not; the cost is that after a restart the job is
        unknown (404) rather than cancelled.
        """
        try:
            self.journal.remove(job.id)
            log.error("job %s: its record was removed instead, so a restart forgets the job rather than run it",
                      job.id)
        except OSError as e:
            log.error("job %s: its record could not be removed either (%s); a restart would run it again",
                      job.id, type(e).__name__)

    def _site_limit(self, site: str) -> int:
        # a site removed from the tenants file while its accepted jobs wait drains them one at a time
        known = self.tenancy.sites.get(site)
        return known.max_concurrent_jobs if known is not None else 1

    # -- submission ---------------------------------------------------------
    def validate_options(self, site: Site, options: JobOptions) -> JobOptions:
        """400 on unknown structures/outputs, 403 on an output prefix outside the site's."""
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
        limit = self._site_limit(site.name)
        if self.scheduler.active(site.name) + self._reading.get(site.name, 0) >= limit:
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
            job = self.jobs.get(self._keys.get((site.name, key), ""))
            if job is not None and job.site == site.name:
                if job.request_hash != request_hash:
                    raise mismatch(job.id)
                return job, False
        return self.submit(site, options, idempotency=(key, request_hash) if key else None, **submit), True

    def submit(self, site: Site, options: JobOptions, *, input_uri: str | None = None,
               upload: bytes | None = None, filename: str = "upload.nii.gz", source: str | None = None,
               idempotency: tuple[str, str] | None = None) -> Job:
        """Queue a job; raises 403/400/429 before anything is queued. ``source`` names it in the audit log
        (default: "s3" or "upload"); ``idempotency`` is the ``(key, request fingerprint)`` it keeps
        (:meth:`submit_once`)."""
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
        spooled = None
        if upload is not None:
            # Queued uploads wait on disk, not in the router's memory.

            spooled = self._incoming / f"{job.id}{suffix_of(filename)}"
        try:
            if spooled is not None:
                spooled.write_bytes(upload)
            self._schedule(job, spooled, filename)
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
        if job.idempotency_key is not None:
            self._keys[(job.site, job.idempotency_key)] = job.id
        self._remember(job)
        self._update_gauges()
        return job

    def _schedule(self, job: Job, spooled: Path | None, filename: str) -> None:
        # recorded before it is queued: a job running with no record would be lost to the client and to a restart
        self.journal.save(job)
        try:
            fut = self.scheduler.submit(job.site, job.id, lambda: self._execute(job, spooled, filename))
        except BaseException:
            self.journal.remove(job.id)
            raise
        self._futures[job.id] = fut
        fut.add_done_callback(lambda f, j=job: self._settled(j, f))

    async def wait(self, job: Job) -> Job:
        """Wait until the job is settled (its own outcome is on the job, never raised here)."""
        fut = self._futures.get(job.id)
        if fut is not None:
            # asyncio.wait never cancels what it waits for: a client hanging up leaves the job running
            await asyncio.wait([fut])
            self._settled(job, fut)
        return job

    def get(self, site: Site, job_id: str) -> Job:
        """The job, if it belongs to ``site``; another site's job is indistinguishable from none (404)."""
        job = self.jobs.get(job_id)
        if job is None or job.site != site.name:
            raise NotFoundError(f"no segmentation job {job_id} for site {site.name}")
        return job

    def cancel(self, site: Site, job_id: str) -> Job:
        job = self.get(site, job_id)
        fut = self._futures.get(job_id)
        if fut is not None and fut.done():
            self._settled(job, fut)  # finished a moment ago; its callback has not run yet
        if job.done:
            raise ConflictError(f"job {job_id} already {job.status}; nothing to cancel")
        # set before the task learns of it: a write stage running in a thread checks it before uploading
        job.status, job.finished = "cancelled", time.time()
        self.scheduler.cancel(job_id)
        if not self._record(job):
            self._forget(job)
        audit("job.cancelled", job=job.id, site=job.site)
        for f in self._incoming.glob(f"{job.id}*"):
            f.unlink(missing_ok=True)
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
        """The site an event job is for, as the tenants file has it now.

        The event intake holds no site's API key: it names each job's site, and the
        router runs the job as that site's (its job limit, fair share, admission,
        sandboxed decoding). The tenants file is looked at first, so a site removed
        from it has its event jobs refused.

        Args:
            name: the site of the job's inbox rule.

        Returns:
            The site.

        Raises:
            ForbiddenError: the tenants file has no such site.
            ServiceUnavailableError: a site's prefixes now cover a reserved prefix (the intake's job
                records): event jobs wait until the operators fix the tenants file.
        """
        self.tenancy.refresh()
        for reserved in self.reserved_prefixes:
            holders = sites_holding(self.tenancy.sites.values(), reserved)
            if holders:
                log.error("the tenants file gives site(s) %s prefixes overlapping the event job records' prefix; "
                          "event jobs are refused until it does not", ", ".join(sorted({s for s, _ in holders})))
                raise ServiceUnavailableError("the cluster's tenants file overlaps a site's prefixes with the event "
                                              "job records; event jobs wait until the operators fix it")
        site = self.tenancy.sites.get(name)
        if site is None:
            raise ForbiddenError(f"site {name!r} is not in the tenants file (any more), so its event jobs are "
                                 f"refused; add the site back, or remove its inbox rules")
        return site

    async def event_checksums(self, site_name: str, roi_subset: list[str] | None, fast: bool) -> dict[str, Any]:
        """The checksums of the sub-models an event job of ``site_name`` would run (its idempotency key's).

        Args:
            site_name: the job's site.
            roi_subset: the structures wanted, None for all.
            fast: the 3 mm model.

        Returns:
            ``{"checksums": {sub-model: sha256}}``, or ``{"error": {status, title, detail, retryable}}``.
        """
        try:
            site = self.event_site(site_name)
            opts = self.validate_options(site, JobOptions(list(roi_subset) if roi_subset else None, bool(fast)))
            plan = [sm.name for sm in self.catalogue.plan(opts.roi_subset, opts.fast)]
            subs = await self.availability(plan)
            down = [n for n in plan if subs[n]["state"] == "unreachable"]
            if down:  # a replica restarting: skipping its model would pass off a partial result as whole
                raise ServiceUnavailableError(f"sub-model(s) {', '.join(down)} cannot be reached on the cluster "
                                              f"right now; the job is retried")
            explicit = opts.roi_subset is not None or opts.fast
            out, missing = {}, []
            for n in plan:
                if subs[n]["state"] == "ready" and subs[n].get("checksum"):
                    out[n] = subs[n]["checksum"]
                elif explicit:
                    missing.append(f"{n} ({subs[n]['state']})")
            if missing or not out:
                raise ModelUnavailableError("the cluster cannot run " + (", ".join(missing) or "any sub-model"))
            return {"checksums": out}
        except MrisegError as e:
            return {"error": error_dict(e)}

    async def run_event_job(self, site_name: str, data: bytes, filename: str, roi_subset: list[str] | None,
                            fast: bool, outputs: list[str], input_uri: str, output_prefix: str,
                            resampling_order: int = DEFAULT_RESAMPLING_ORDER) -> dict[str, Any]:
        """Run one event job of ``site_name`` as that site's job, and hand back its output files.

        The intake read the input from ``input_uri`` and publishes the outputs under
        ``output_prefix`` itself; both must lie inside the site's prefixes now. The
        job is an upload of that site's: the same job limit (429 at it), fair share,
        memory admission and sandboxed decoding as one sent to the API with its key.
        If the caller stops waiting (its timeout, its replica gone), the job is cancelled.

        Args:
            site_name: the job's site.
            data: the input file's bytes.
            filename: its name, with the volume's suffix.
            roi_subset: the structures wanted, None for all.
            fast: the 3 mm model.
            outputs: of ``multilabel``, ``statistics``, ``preview``.
            input_uri: where the intake read it.
            output_prefix: where the intake will publish the outputs.
            resampling_order: the input's spline order (TotalSegmentator's ``-ro``, 0..5).

        Returns:
            ``{"id", "files": {writer's file name: bytes}, "models", "timings", "submodels", "structures",
            "unavailable", "demo", "input_cast"}``, or ``{"error": {status, title, detail, retryable}}``.
        """
        try:
            site = self.event_site(site_name)
            self.tenancy.check_access(site, input_uri, "read")
            self.tenancy.check_access(site, output_prefix, "write")
            bad = [o for o in outputs if o not in EVENT_OUTPUTS]
            if bad:
                raise MrisegError(f"event jobs in the cluster make {list(EVENT_OUTPUTS)}, not {bad}")
            check_upload_name(filename)
            if len(data) > self.settings.max_upload_bytes:
                raise VolumeTooLargeError(f"the input has {len(data)} bytes, over the {self.settings.max_upload_bytes}"
                                          f"-byte limit (router.max_upload_bytes)")
            job = self.submit(site, JobOptions(list(roi_subset) if roi_subset else None, bool(fast), tuple(outputs),
                                               resampling_order=resampling_order),
                              upload=data, filename=filename, source="event")
        except MrisegError as e:
            return {"error": error_dict(e)}
        del data
        try:
            await self.wait(job)
        except asyncio.CancelledError:
            # nobody waits for its outputs any more: free the site's slot for its next job
            if not job.done:
                with contextlib.suppress(MrisegError):
                    self.cancel(site, job.id)
            raise
        return await asyncio.to_thread(_event_reply, job)

    def site_limits(self) -> dict[str, int]:
        """Each site's ``max_concurrent_jobs``, as the tenants file has it now (the intake's per-site limits).

        Returns:
            Site name -> its job limit.
        """
        self.tenancy.refresh()
        return {name: site.max_concurrent_jobs for name, site in self.tenancy.sites.items()}

    # -- availability -------------------------------------------------------
    async def describe(self, name: str) -> dict:
        """What a sub-model deployment reports about its model (cached once ready)."""
        if name not in self.deployed:
            return {"submodel": name, "state": "unavailable", "detail": "not deployed on this cluster",
                    "model": None}
        d = self._descriptions.get(name)
        if d is None:
            limit = self.settings.submodel_timeout_s
            try:
                # a deployment with no replica that can start queues this call: bounded like a sub-model call
                d = await asyncio.wait_for(self._describe(name), limit)
            except asyncio.TimeoutError as e:
                raise ServiceUnavailableError(f"sub-model {name} did not describe itself within {limit:g} s "
                                              f"(router.submodel_timeout_s): no replica could start; the job "
                                              f"can be resubmitted as is") from e
            except Exception as e:  # noqa: BLE001 - a Ray failure reaching the deployment, not the job's fault
                if isinstance(e, MrisegError):
                    raise
                if isinstance(_unwrap(e), MrisegError):
                    raise _unwrap(e) from e
                raise ServiceUnavailableError(f"sub-model {name} cannot be reached ({type(e).__name__}); the "
                                              f"job can be resubmitted as is") from e
            if d["state"] == "ready":
                self._descriptions[name] = d
        return d

    async def availability(self, probe: Iterable[str] = ()) -> dict[str, dict]:
        """Per sub-model state; a deployment scaled to zero is reported "cold", not woken up (unless probed)."""
        names = [sm.name for sm in list(self.catalogue.submodels) + list(self.catalogue.fast_variants)]
        running = await self._running_replicas() if self._running_replicas else {}
        probe = set(probe)

        async def one(n: str):
            if n in self.deployed and n not in self._descriptions and running.get(n) == 0 and n not in probe:
                return {"state": "cold", "detail": "scaled to zero; starts on its first request"}
            return await self.describe(n)

        descs = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        out = {}
        for n, d in zip(names, descs):
            if isinstance(d, BaseException):
                out[n] = {"state": "unreachable", "detail": type(d).__name__}
            else:
                out[n] = {"state": d["state"], "detail": d.get("detail", ""), "checksum": d.get("checksum")}
        return out

    async def _plan(self, job: Job) -> tuple[list[SubModel], dict[str, dict], dict[str, str]]:
        """Sub-models to call and their metadata; like Segmenter.plan, explicit requests need every model."""
        opts = job.options
        sms = self.catalogue.plan(opts.roi_subset, opts.fast)
        descs = await asyncio.gather(*(self.describe(sm.name) for sm in sms))
        down = [f"{sm.name} ({d.get('detail', '')})" for sm, d in zip(sms, descs) if d["state"] == "unreachable"]
        if down:  # skipping them would pass off a partial segmentation as a full one (as Segmenter.plan)
            raise ServiceUnavailableError("the model source of sub-model(s) " + "; ".join(down) +
                                          " cannot be read right now; the job can be resubmitted as is")
        run, skipped, problems = [], {}, []
        for sm, d in zip(sms, descs):
            if d["state"] == "ready":
                run.append(sm)
            elif opts.roi_subset is None and not opts.fast:
                skipped[sm.name] = f"{d['state']}: {d.get('detail', '')}"
            else:
                problems.append(f"sub-model {sm.name} (Dataset{sm.task_id}, {sm.licence} licence) is "
                                f"{d['state']}: {d.get('detail', '')}")
        if problems or not run:
            raise ModelUnavailableError("; ".join(problems or ["no sub-model is available"]) +
                                        ". Ask the operators to install the weights.")
        return run, {sm.name: d for sm, d in zip(sms, descs) if sm in run}, skipped

    # -- execution ----------------------------------------------------------
    async def _execute(self, job: Job, spooled: Path | None, filename: str) -> Job:
        job.status, job.started, job.start_seq = "running", time.time(), self._seq
        self._seq += 1
        self._update_gauges()
        await _in_thread(self._save_running, job)
        t0 = time.perf_counter()

        async def stage(name: str, fn, *args, on_cancel: threading.Event | None = None):
            t = time.perf_counter()
            out = await _in_thread(fn, *args, on_cancel=on_cancel)
            job.timings[name] = time.perf_counter() - t
            self.metrics.stage_seconds.labels(name.removesuffix("_s")).observe(job.timings[name])
            return out

        source = None  # the S3 object version read, for the output set's job.json
        cancel = threading.Event()  # a cancelled job's decoder child is killed, so its slot frees at once
        if spooled is None:
            upload, filename, source = await stage("stage_in_s", self._download, job.input_uri)
            self.metrics.bytes_staged.labels("in").inc(len(upload))
            volume = await stage("decode_s", functools.partial(self.decoder.decode_bytes, cancel=cancel), upload,
                                 filename, self._max_voxels, on_cancel=cancel)
            del upload
        else:
            # The spooled upload stays until the job settles, so a restarted router can resume it.
            self.metrics.bytes_staged.labels("in").inc(spooled.stat().st_size)
            volume = await stage("decode_s", functools.partial(self.decoder.decode, cancel=cancel), spooled,
                                 self._max_voxels, on_cancel=cancel)
        sms, descs, skipped = await self._plan(job)
        spacings = sorted({sm.spacing_mm for sm in sms})
        # admission by memory: wait until this job's bytes fit beside the running jobs' (413 if they never can)
        async with self.budget.reserve(job_bytes(volume.shape, volume.affine, spacings)):
            return await self._compute(job, volume, sms, descs, skipped, source, stage, t0)

    async def _compute(self, job: Job, volume, sms: list[SubModel], descs: dict[str, dict], skipped: dict[str, str],
                       source, stage, t0: float) -> Job:
        """Preprocess, run the sub-models, merge and write: everything after the decode, within the budget."""
        kw = {} if self.settings.max_voxels is None else {"max_voxels": self.settings.max_voxels}
        job.unavailable = skipped
        models = {n: d["model"] for n, d in descs.items()}

        prepared, refs = {}, {}
        order = job.options.resampling_order
        for spacing in sorted({sm.spacing_mm for sm in sms}):
            prepared[spacing] = await stage(f"prepare_{spacing:g}mm_s",
                                            lambda s=spacing: prepare(volume, s, resampling_order=order, **kw))
            # One copy into the object store, shared by every sub-model at this spacing.
            refs[spacing] = self._put(prepared[spacing].data)
        job.input_cast = input_cast(prepared.values())

        t = time.perf_counter()
        results = await asyncio.gather(*(self._call_with_retry(job, sm, refs[sm.spacing_mm]) for sm in sms),
                                       return_exceptions=True)
        job.timings["submodels_s"] = time.perf_counter() - t
        for sm, r in zip(sms, results):
            if isinstance(r, asyncio.CancelledError):  # this task was not cancelled (the await above returned)
                raise ServiceUnavailableError(f"the call to sub-model {sm.name} was cancelled by the cluster "
                                              f"(a replica shutting down?); the job can be resubmitted as is")
            if isinstance(r, BaseException):
                raise r
        local_maps = {sm.name: r["labels"] for sm, r in zip(sms, results)}
        merged = await stage("merge_restore_s", self._merge_restore, volume, sms, prepared, local_maps, models,
                             job.options.roi_subset)
        labels, per_model, structures = merged
        job.structures = structures
        outdir = Path(self.settings.results_dir) / job.site / job.id
        # a cancel during the write keeps the slot until the thread returns; it skips the upload when cancelled
        job.outputs = await stage("write_s", self._write, job, volume, labels, per_model, structures, outdir, models,
                                  source)
        job.timings["total_s"] = time.perf_counter() - t0
        self.metrics.volumes.labels(job.site).inc()
        self.metrics.voxels.labels(job.site).inc(int(np.prod(volume.data.shape)))
        return job

    async def _call_with_retry(self, job: Job, sm: SubModel, ref: Any) -> dict:
        attempts = self.settings.submodel_retries + 1
        for attempt in range(attempts):
            t = time.perf_counter()
            try:
                r = await asyncio.wait_for(self._call(sm.name, [ref], sm.spacing_mm),
                                           self.settings.submodel_timeout_s)
            except asyncio.TimeoutError as e:
                raise ServiceUnavailableError(
                    f"sub-model {sm.name} did not answer within {self.settings.submodel_timeout_s:g} s "
                    f"(router.submodel_timeout_s); the job can be resubmitted as is") from e
            except Exception as e:  # noqa: BLE001 - sorted below
                inner = _unwrap(e)
                if isinstance(inner, MrisegError):
                    raise inner from None
                if _is_replica_failure(e):
                    log.warning("sub-model %s replica failed mid-call (%s), attempt %d/%d",
                                sm.name, type(e).__name__, attempt + 1, attempts)
                    if attempt + 1 < attempts:
                        continue
                    raise ServiceUnavailableError(
                        f"sub-model {sm.name} failed during the request ({type(e).__name__}); "
                        f"the job can be resubmitted as is") from e
                raise
            seconds = time.perf_counter() - t
            self.metrics.submodel_seconds.labels(sm.name).observe(seconds)
            job.submodels[sm.name] = {"seconds": seconds, "started": r["started"], "finished": r["finished"],
                                      "compute_s": r["finished"] - r["started"], "attempts": attempt + 1,
                                      "pid": r.get("pid"), "gpu_ids": r.get("gpu_ids", [])}
            return r
        raise AssertionError("unreachable")  # pragma: no cover

    def _merge_restore(self, volume, sms, prepared, local_maps, models, roi_subset):
        """The in-process Segmenter's own merge (per spacing, back to the input grid, precedence)."""
        return merge_to_input_grid(volume.shape, sms, prepared, local_maps, models, roi_subset, self.catalogue)

    def _save_running(self, job: Job) -> None:
        try:
            self.journal.save(job)
        except OSError as e:  # the router's disk: not the job's fault, and another replica may manage
            raise ServiceUnavailableError(f"the router could not record job {job.id} on its disk "
                                          f"({e.strerror or type(e).__name__}); resubmit it") from e

    def _write(self, job: Job, volume, labels, per_model, structures, outdir: Path,
               models: dict, source: ObjectInfo | None = None) -> dict[str, str]:
        job.demo = any(is_demo_model(m) for m in models.values())
        result = SegmentationResult(labels, per_model, structures, np.array(volume.affine, copy=True),
                                    dict(job.timings), {n: m.checksum for n, m in models.items()},
                                    dict(job.unavailable), job.options.fast, demo=job.demo,
                                    resampling_order=job.options.resampling_order,
                                    input_cast=job.input_cast or CAST_NONE)
        try:
            outputs = write_result(result, volume, outdir, job.options.outputs, job.options.roi_subset)
        except OSError as e:  # a full or failing results disk
            raise ServiceUnavailableError(f"the router could not write the results of job {job.id} "
                                          f"({e.strerror or type(e).__name__}); resubmit it") from e
        if job.options.output_prefix and job.status != "cancelled":
            if source is not None and (outdir / layout.METADATA).is_file():
                # the completion marker names the object version read, so ``mriseg bulk`` reruns a
                # replaced input instead of taking these outputs for its
                (outdir / layout.JOB_RECORD).write_text(json.dumps(results.completion_doc(outdir, source), indent=1,
                                                                     sort_keys=True))
            outputs.update(self._upload(outdir, job.options.output_prefix))
        return outputs

    def _download(self, uri: str) -> tuple[bytes, str, ObjectInfo]:
        """The object's bytes, its file name and which version of it was read (ETag, version id)."""
        data, source = staging.download_object(uri, self.settings.max_upload_bytes, self.settings.s3)
        return data, uri.rsplit("/", 1)[-1], source

    def _upload(self, outdir: Path, prefix: str) -> dict[str, str]:
        uploaded = results.upload_results(outdir, prefix, settings=self.settings.s3)
        self.metrics.bytes_staged.labels("out").inc(sum(p.stat().st_size for p in outdir.rglob("*") if p.is_file()))
        return {f"s3:{k}": v for k, v in uploaded.items()}

    # -- bookkeeping --------------------------------------------------------
    def _settled(self, job: Job, fut: asyncio.Future) -> None:
        if self._futures.pop(job.id, None) is None:
            return  # already recorded
        if fut.cancelled():
            if job.status != "cancelled":
                job.status, job.finished = "cancelled", time.time()
        elif fut.exception() is not None:
            exc = fut.exception()
            job.fail(exc)
            status = job.error["status"]
            self.metrics.error(exc, job.site, status)
            if status >= 500:
                # our own errors say what failed; their chained causes (botocore's) quote
                # request URLs, i.e. object keys, which may name a patient
                log.error("job %s failed: %s", job.id, type(exc).__name__,
                          exc_info=None if isinstance(exc, MrisegError) else exc)
            else:
                log.info("job %s failed with %d %s", job.id, status, job.error["title"])
        else:
            job.status, job.finished = "succeeded", time.time()
        self._record(job)
        for f in self._incoming.glob(f"{job.id}*"):
            f.unlink(missing_ok=True)
        seconds = (job.finished or time.time()) - job.created
        self.metrics.job_seconds.labels(job.site, job.status).observe(seconds)
        audit("job.settled", job=job.id, site=job.site, source="s3" if job.input_uri else "upload",
              status=job.status, error=(job.error or {}).get("status"), seconds=round(seconds, 3))
        self._update_gauges()

    def _remember(self, job: Job) -> None:
        """Keep ``job``, evicting settled jobs while more than ``max_jobs_kept`` are kept or their journal
        records take more than ``journal_max_bytes``."""
        self.jobs[job.id] = job
        while True:
            if len(self.jobs) > self.settings.max_jobs_kept:
                old = self._evictable(lambda j: 1)
            elif self.journal.total_bytes > self.settings.journal_max_bytes:
                old = self._evictable(lambda j: self.journal.size(j.id))
            else:
                break
            if old is None:
                break
            self.jobs.pop(old.id)
            if old.idempotency_key is not None and self._keys.get((old.site, old.idempotency_key)) == old.id:
                del self._keys[(old.site, old.idempotency_key)]
            self.journal.remove(old.id)
            shutil.rmtree(Path(self.settings.results_dir) / old.site / old.id, ignore_errors=True)

    def _evictable(self, weight: Callable[[Job], int]) -> Job | None:
        """The oldest settled job of the site keeping the most (jobs, or journal bytes: ``weight`` per job):
        a site that floods the router with jobs evicts its own results, not another site's. Running jobs
        (and a cancelled job whose thread may still write) are never evicted, nor do they block later ones.
        Of that site's jobs, one an ``Idempotency-Key`` made less than 24 h ago goes only when nothing else
        of the site can: its key is promised for that long (docs/api.md), as far as the limits allow."""
        counts: dict[str, int] = {}
        for j in self.jobs.values():
            counts[j.site] = counts.get(j.site, 0) + weight(j)
        promised_after = time.time() - KEEP_KEYED_S
        for site in sorted(counts, key=counts.__getitem__, reverse=True):
            promised = None
            for j in self.jobs.values():  # oldest first
                if j.site == site and j.done and j.id not in self._futures:
                    if j.idempotency_key is None or j.created <= promised_after:
                        return j
                    promised = promised or j
            if promised is not None:
                log.warning("site %s: a job whose Idempotency-Key is less than a day old is evicted "
                            "(router.max_jobs_kept or journal_max_bytes too small for a day of its jobs)", site)
                return promised
        return None

    def _update_gauges(self) -> None:
        st = self.scheduler.stats()
        self.metrics.running.set(st.running)
        for site in self.tenancy.sites:
            self.metrics.queue_depth.labels(site).set(st.queued.get(site, 0))


#: the outputs an event job in the cluster hands back (per-structure masks stay on the router)
EVENT_OUTPUTS = ("multilabel", "statistics", "preview")


def _event_reply(job: Job) -> dict[str, Any]:
    """A settled event job as :meth:`JobService.run_event_job` answers it: its files, or its error."""
    if job.status == "cancelled":
        return {"error": {"status": 409, "title": "Job cancelled", "retryable": False,
                          "detail": f"job {job.id} was cancelled on the router before it finished"}}
    if job.status != "succeeded":
        return {"error": dict(job.error or {"status": 500, "title": "Internal error", "retryable": True,
                                            "detail": f"job {job.id} ended {job.status}"})}
    try:
        files = {Path(job.outputs[kind]).name: Path(job.outputs[kind]).read_bytes()
                 for kind in EVENT_OUTPUTS if kind in job.options.outputs}
        meta = json.loads(Path(job.outputs["metadata"]).read_text())
    except (OSError, KeyError, ValueError) as e:  # evicted meanwhile (max_jobs_kept): running it again helps
        return {"error": error_dict(ServiceUnavailableError(
            f"the outputs of job {job.id} are no longer on the router ({type(e).__name__}); the job is retried"))}
    return {"id": job.id, "files": files, "models": dict(meta.get("models") or {}), "timings": dict(job.timings),
            "submodels": dict(job.submodels), "structures": {str(k): v for k, v in job.structures.items()},
            "unavailable": dict(job.unavailable), "demo": bool(job.demo), "input_cast": meta.get("input_cast")}


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


def sites_holding(sites: Iterable[Site], uri: str) -> list[tuple[str, str]]:
    """The sites' prefixes that contain, equal or lie inside the prefix ``uri``.

    Args:
        sites: the tenants' sites.
        uri: an ``s3://bucket/prefix``.

    Returns:
        ``(site name, prefix as written)`` for each overlapping prefix.
    """
    bucket, key = prefix_key(uri)
    out = []
    for site in sites:
        for p in site.prefixes:
            pbucket, pkey = prefix_key(p)
            if pbucket == bucket and (key.startswith(pkey) or pkey.startswith(key)):
                out.append((site.name, p))
    return out


def write_result(result, volume, outdir: Path, outputs, roi_subset=None) -> dict[str, str]:
    """serve.outputs' writers, with the output kinds named as the API names them."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = write_outputs(result, volume, outdir, multilabel="multilabel" in outputs,
                            per_structure="per_structure" in outputs, statistics="statistics" in outputs,
                            preview="preview" in outputs, roi_subset=roi_subset)
    return {str(k): str(v) for k, v in written.items()}


def _ray_put(arr: np.ndarray):
    # lazy: ray takes seconds to import; only code running under Ray needs it
    import ray

    return ray.put(arr)
