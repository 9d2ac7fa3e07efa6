"""An accepted job's life on the router: scheduled, settled or cancelled, and resumed after a restart.

Every step is journalled before it takes effect where losing it would lose the job (a job is recorded
before it is queued), and after it where the outcome is already on the job (a settled job is recorded,
and a disk failing then is logged, not raised). A job's spooled upload goes once it settles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from serve.audit import audit
from serve.errors import ForbiddenError, MrisegError, ServiceUnavailableError
from serve.router.journal import JobJournal
from serve.router.metrics import JobMetrics
from serve.router.scheduler import FairScheduler
from serve.router.spool import Spool
from serve.router.state import Job
from serve.router.tenancy import Tenancy

if TYPE_CHECKING:  # the settings class lives with the facade that composes this part
    from serve.router.service import RouterSettings

log = logging.getLogger(__name__)

# (job, spooled upload or None, file name) -> the job, run
ExecuteStep = Callable[[Job, Path | None, str], Awaitable[Job]]


class JobLifecycle:
    """Schedules accepted jobs on the fair scheduler and records each one's outcome."""

    def __init__(self, settings: RouterSettings, tenancy: Tenancy, journal: JobJournal, spool: Spool,
                 metrics: JobMetrics, execute: ExecuteStep):
        """Args:
            settings: the router's settings (``slots``, ``max_resumes``).
            tenancy: the sites (their job limits, their prefixes on resume).
            journal: the job journal.
            spool: the upload spool.
            metrics: where job times, errors and the gauges are recorded.
            execute: runs one scheduled job (:meth:`serve.router.execution.Executor.execute`).
        """
        self.settings, self.tenancy, self.journal, self.spool, self.metrics = settings, tenancy, journal, spool, metrics
        self.execute = execute
        self.scheduler = FairScheduler(settings.slots, self.site_limit)
        self.futures: dict[str, asyncio.Future] = {}
        self.interrupted: list[Job] = []  # journalled unsettled at start: resume_interrupted's

    def site_limit(self, site: str) -> int:
        """The jobs ``site`` may have queued or running at once.

        Args:
            site: the site's name.

        Returns:
            Its ``max_concurrent_jobs``; 1 for a site removed from the tenants file while its accepted jobs
            wait, so they drain one at a time.
        """
        known = self.tenancy.sites.get(site)
        return known.max_concurrent_jobs if known is not None else 1

    def schedule(self, job: Job, spooled: Path | None, filename: str) -> None:
        """Journal ``job``, then queue it; it is settled (:meth:`settled`) as its run ends.

        Args:
            job: the accepted job.
            spooled: its spooled upload (None: an S3 input).
            filename: the upload's name.

        Raises:
            OSError: the journal could not record it (nothing was queued).
            TooManyRequestsError: the site is at its job limit (nothing was queued).
        """
        # recorded before it is queued: a job running with no record would be lost to the client and to a restart
        self.journal.save(job)
        try:
            fut = self.scheduler.submit(job.site, job.id, lambda: self.execute(job, spooled, filename))
        except BaseException:
            self.journal.remove(job.id)
            raise
        self.futures[job.id] = fut
        fut.add_done_callback(lambda f, j=job: self.settled(j, f))

    async def wait(self, job: Job) -> Job:
        """Wait until the job is settled (its own outcome is on the job, never raised here).

        Args:
            job: the job.

        Returns:
            The job, settled.
        """
        fut = self.futures.get(job.id)
        if fut is not None:
            # asyncio.wait never cancels what it waits for: a client hanging up leaves the job running
            await asyncio.wait([fut])
            self.settled(job, fut)
        return job

    def settled(self, job: Job, fut: asyncio.Future) -> None:
        """Record the outcome of a job whose run ended (once: later calls do nothing).

        Args:
            job: the job.
            fut: its scheduler future, done.
        """
        if self.futures.pop(job.id, None) is None:
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
        self.record(job)
        self.spool.remove(job.id)
        seconds = (job.finished or time.time()) - job.created
        self.metrics.job_seconds.labels(job.site, job.status).observe(seconds)
        audit("job.settled", job=job.id, site=job.site, source="s3" if job.input_uri else "upload",
              status=job.status, error=(job.error or {}).get("status"), seconds=round(seconds, 3))
        self.update_gauges()

    def cancel(self, job: Job) -> None:
        """Cancel an unsettled job: recorded, taken off the scheduler, its spooled upload removed.

        Args:
            job: the job, not yet done.
        """
        # set before the task learns of it: a write stage running in a thread checks it before uploading
        job.status, job.finished = "cancelled", time.time()
        self.scheduler.cancel(job.id)
        if not self.record(job):
            self._forget(job)
        audit("job.cancelled", job=job.id, site=job.site)
        self.spool.remove(job.id)

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

        Returns:
            The number resumed.
        """
        resumed = 0
        while self.interrupted:
            job = self.interrupted.pop(0)
            spooled = self.spool.find(job.id)
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
                self.schedule(job, spooled, spooled.name if spooled else "upload.nii.gz")
                resumed += 1
                audit("job.resumed", job=job.id, site=job.site, resumed=job.resumed, charged=was_running)
            except Exception as e:  # noqa: BLE001 - one odd record must not stop the others
                job.fail(e if isinstance(e, MrisegError) else ServiceUnavailableError(
                    f"the job could not be resumed after a router restart ({type(e).__name__}); resubmit it"))
                self.record(job)
                audit("job.settled", job=job.id, site=job.site, status="failed", error=job.error["status"],
                      reason="router restart")
                if spooled is not None:
                    spooled.unlink(missing_ok=True)
        return resumed

    def record(self, job: Job) -> bool:
        """Journal a settled or cancelled job; a disk that fails now is logged, not raised.

        The outcome is already on the job, which clients read from memory. Raising
        would abandon the caller half way (the other interrupted jobs of a restart,
        the spool clean-up of a settled job) over a record whose only loss is that
        a later restart would see the job unsettled and resume it.

        Args:
            job: the job.

        Returns:
            Whether the record was written.
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

    def update_gauges(self) -> None:
        """Set the running and per-site queue-depth gauges from the scheduler."""
        st = self.scheduler.stats()
        self.metrics.running.set(st.running)
        for site in self.tenancy.sites:
            self.metrics.queue_depth.labels(site).set(st.queued.get(site, 0))
