"""The event intake's plain part: pushed and polled S3 event jobs, run durably, each site in its turn.

:class:`IntakeWorker` is what the ``EventIntake`` deployment
(:mod:`serve.cluster.intake`) wraps, and is tested on its own:

- with a queue configured, threads long-poll SQS (:class:`serve.jobs.consumer.Consumer`);
- :meth:`IntakeWorker.submit` holds pushed jobs in S3 (:mod:`serve.jobs.pushes`)
  and queues them; a sweep thread runs what it finds held (a dead replica's, a
  retry's after its backoff);
- every job runs through :class:`serve.jobs.runner.JobRunner` (durable records in
  S3, idempotency, atomic claims), waiting its site's turn in
  :class:`serve.jobs.scheduler.SiteScheduler`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping, Sequence

from serve.clock import SYSTEM_CLOCK, Clock
from serve.errors import MrisegError, NotFoundError
from serve.jobs.consumer import Consumer
from serve.jobs.engine import Engine
from serve.jobs.intake_settings import IntakeSettings
from serve.jobs.pushes import MAX_ATTEMPTS, HeldPush, PushJournal, retry_delay_s
from serve.jobs.records import RecordSigner
from serve.jobs.runner import JobOutcome, JobRunner
from serve.jobs.scheduler import SiteLimits, SiteScheduler
from serve.jobs.spec import JobSpec
from serve.jobs.store import JobStore
from serve.records_schema import FAILED, RUNNING, SUCCEEDED

log = logging.getLogger(__name__)


class IntakeWorker:
    """The plain part of the deployment: a JobRunner, the per-site scheduler, and the optional SQS pollers.

    Args:
        settings: the intake settings.
        runner: the job runner; None: a :class:`serve.jobs.runner.JobRunner` with ``engine``.
        dlq_gauge: the dead-letter queue gauge to set.
        job_counter: counts jobs by outcome.
        site_limits: returns each site's job limit (1 for a site it does not name); None: no limit per site.
        engine: what runs the jobs when no ``runner`` is given (in the cluster,
            :class:`serve.cluster.router_engine.RouterEngine`, with its ``site_limits``).
        clock: the time of the held jobs' backoffs and of the sweeps that run them (:mod:`serve.clock`);
            a ``runner`` given must use the same clock in its store (leases and backoffs are compared).
    """

    def __init__(self, settings: IntakeSettings, runner=None, dlq_gauge=None, job_counter=None,
                 site_limits: Callable[[], Mapping[str, int]] | None = None, engine: Engine | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        self.settings = settings
        self.clock = clock
        self.stop = threading.Event()
        self.pollers: list[threading.Thread] = []
        self.sweeper: threading.Thread | None = None
        self.scheduler: SiteScheduler | None = None
        self.pushed = 0
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        if not settings.configured:
            log.info("event intake is off: no events.jobs prefix (MRISEG_EVENTS_JOBS_PREFIX)")
            self.runner = None
            return
        if runner is None and engine is None:
            raise TypeError("IntakeWorker needs a runner or an engine to run the jobs; give one of them")
        # None: $MRISEG_RECORD_KEY_FILE; either way a missing key stops the replica, saying what to set
        signer = RecordSigner.from_file(settings.record_key_file) if settings.record_key_file else None
        self.journal = PushJournal(settings.jobs, settings.s3, signer=signer, clock=clock)
        if runner is None:
            runner = JobRunner(JobStore(settings.jobs, settings.s3, lease_s=settings.lease_s, signer=signer,
                                        clock=clock), engine,
                               settings.s3, max_bytes=settings.max_bytes)
        self.runner = runner
        self.job_counter = job_counter
        # every event job, pushed or polled, waits its site's turn: one site's flood holds up only itself
        self.scheduler = SiteScheduler(settings.concurrency, SiteLimits(site_limits or dict),
                                       default_limit=1 if site_limits is not None else settings.concurrency)
        if settings.queue is not None:
            consumer = Consumer(settings.queue, self._run_polled)
            if dlq_gauge is not None:
                consumer.dlq_gauge = dlq_gauge
            # one message at a time per thread, each waiting for its jobs' turns in the scheduler
            self.pollers = [threading.Thread(target=consumer.run, args=(self.stop,), name=f"mriseg-sqs-{i}",
                                             daemon=True) for i in range(max(1, settings.concurrency))]
            for t in self.pollers:
                t.start()
        # at once (what a dead replica held), then every sweep_s (what a run left unsettled)
        self.sweeper = threading.Thread(target=self._sweep, name="mriseg-push-sweep", daemon=True)
        self.sweeper.start()

    @property
    def sweep_s(self) -> float:
        return max(1.0, min(60.0, self.settings.lease_s / 2))

    def submit(self, specs: Sequence[Mapping[str, Any]]) -> int:
        """Hold pushed jobs in S3, then queue them; each settles as succeeded or failed (``job.json``).

        Every job is held before this returns: a push that was answered 202 survives this replica.
        """
        if self.runner is None:
            raise NotFoundError("event intake is not configured on this cluster: set events.jobs "
                                          "(or MRISEG_EVENTS_JOBS_PREFIX) and the inbox rules")
        held = [self.journal.hold(JobSpec.from_dict(dict(s))) for s in specs]
        for h in held:
            self._queue(h)
        self.pushed += len(specs)
        return len(specs)

    def _queue(self, held: HeldPush) -> None:
        with self._lock:
            if held.id in self._in_flight:
                return
            self._in_flight.add(held.id)
        try:
            self.scheduler.submit(held.spec.site, lambda: self._run_held(held))
        except RuntimeError:  # closing: the record stays held for the next replica
            with self._lock:
                self._in_flight.discard(held.id)

    def _sweep(self) -> None:
        while not self.stop.is_set():
            try:
                now = self.clock.time()
                for h in self.journal.held():
                    if h.not_before <= now:  # a job waiting out its backoff is left for a later sweep
                        self._queue(h)
            except Exception:  # noqa: BLE001 - S3 down for a moment: the next sweep finds them
                log.warning("could not list the held pushed jobs; trying again in %.0fs", self.sweep_s, exc_info=True)
            self.clock.wait(self.stop, self.sweep_s)

    def _run_held(self, held: HeldPush) -> None:
        try:
            out = self._run(held.spec)
            settled = out is not None and (out.state == SUCCEEDED or (out.state == FAILED and not out.retryable))
            if settled:
                self.journal.release(held)
            elif out is not None and out.state == RUNNING:
                # another worker holds it: not a run of ours, so it uses up none of MAX_ATTEMPTS (a job
                # longer than the backoff would otherwise be let go while it runs, and lost if that
                # worker then died); look again once its claim would have lapsed
                self.journal.deferred(held, max(self.clock.time() + self.sweep_s, (out.lease_until or 0) + 1))
            elif held.attempts + 1 >= MAX_ATTEMPTS:
                log.warning("pushed job %s for site %s still unsettled after %d runs; given up",
                            out.key[:12] if out else "?", held.spec.site, MAX_ATTEMPTS)
                self._give_up(held, out)
                self.journal.release(held)
            else:
                self.journal.attempted(held, retry_delay_s(held.attempts + 1, self.sweep_s))
        except Exception:  # noqa: BLE001 - the held record stays; the next sweep runs it again
            log.warning("could not update a held pushed job for site %s", held.spec.site, exc_info=True)
        finally:
            with self._lock:
                self._in_flight.discard(held.id)

    def _give_up(self, held: HeldPush, out: JobOutcome | None) -> None:
        """No one will run it again: its error job.json tells the site why, as a poison input's does."""
        err = dict(out.error) if out is not None and out.error else {
            "status": 500, "title": "Internal error", "detail": "the job crashed on every run; see the intake log"}
        err.update(retryable=False, detail=f"{err.get('detail', '')} (given up after {MAX_ATTEMPTS} runs; "
                                           f"push the object again to retry)")
        try:
            prefix = out.output_prefix if out is not None and out.output_prefix else held.spec.output_prefix
        except MrisegError:
            return
        self.runner.publish_error(held.spec, err, prefix, key=out.key if out is not None and out.key else None)

    def _counted(self, run):
        def counted(spec: JobSpec) -> JobOutcome:
            out = run(spec)
            if self.job_counter is not None:
                self.job_counter.inc(tags={"state": out.state})
            return out
        return counted

    def _run_polled(self, spec: JobSpec) -> JobOutcome:
        """An SQS message's job, run in its site's turn (the poller waits; its message stays invisible)."""
        return self.scheduler.submit(spec.site, lambda: self._counted(self.runner.run)(spec)).result()

    def _run(self, spec: JobSpec) -> JobOutcome | None:
        try:
            out = self._counted(self.runner.run)(spec)
            log.info("pushed job %s for site %s: %s", out.key[:12], spec.site, out.state)
            return out
        except Exception:  # the record's lease expires and a redelivery (or a re-push) runs it again
            log.error("pushed job for site %s crashed", spec.site, exc_info=True)
            return None

    @property
    def polling(self) -> bool:
        return bool(self.pollers) and all(t.is_alive() for t in self.pollers)

    def healthy(self) -> None:
        if self.pollers and not self.polling:
            raise RuntimeError("an SQS poll thread has stopped")
        if self.sweeper is not None and not self.sweeper.is_alive():
            raise RuntimeError("the pushed-job sweep thread has stopped")

    def close(self) -> None:
        self.stop.set()
        if self.scheduler is not None:
            self.scheduler.close()
