"""Event intake inside the Ray cluster: the SQS consumer and pushed events, as one Serve deployment.

``EventIntake`` is a thin deployment around plain code that is tested on its own:

- :class:`serve.jobs.intake.IntakeWorker` polls SQS (with a queue configured),
  holds and runs the jobs that the ingress's ``POST /v1/events`` parsed from
  pushed S3 ``Records[]``/SNS/EventBridge bodies, each waiting its site's turn
  (:class:`serve.jobs.scheduler.SiteScheduler`, at most each site's
  ``max_concurrent_jobs`` at once);
- its settings are :class:`serve.jobs.intake_settings.IntakeSettings`;
- every job runs on the Router deployment as its site's job
  (:class:`serve.cluster.router_engine.RouterEngine`, by Ray handle, without
  API keys); the router refuses a site the tenants file no longer has.

Restart policy: Serve calls :meth:`EventIntake.check_health` every
``health_check_period_s``; a dead poll thread fails it, and Serve replaces
the replica. Messages in flight on a dead replica come back after their
visibility timeout; pushed jobs are held in S3 until they settle
(:mod:`serve.jobs.pushes`), and the next replica runs what it finds held; job
claims expire with their lease.
"""

from __future__ import annotations

from typing import Any

from ray import serve as rayserve

from serve.cluster.router_engine import RouterEngine
from serve.jobs.intake import IntakeWorker
from serve.jobs.intake_settings import IntakeSettings


@rayserve.deployment(name="EventIntake", num_replicas=1, ray_actor_options={"num_cpus": 0.1},
                     max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
class EventIntake:
    """Serve deployment: SQS consumer + pushed-event jobs (see the module docstring)."""

    def __init__(self, settings: dict[str, Any], s3: dict[str, Any] | None = None):
        # a replica's own prometheus-client registry is not exported; Ray's metrics agent exports these
        # lazy: ray takes seconds to import; only code running under Ray needs it
        from ray.util.metrics import Counter, Gauge

        dlq = Gauge("mriseg_dlq_messages", description="Messages in the S3 event dead-letter queue")
        jobs = Counter("mriseg_event_jobs_total", description="Event jobs by outcome", tag_keys=("state",))
        # the router runs each job as its site's, within the site's job limit from the tenants file
        engine = RouterEngine(rayserve.get_replica_context().app_name)
        self.worker = IntakeWorker(IntakeSettings.from_mapping(settings, s3), dlq_gauge=dlq, job_counter=jobs,
                                   site_limits=engine.site_limits, engine=engine)

    def submit(self, specs: list[dict[str, Any]]) -> int:
        return self.worker.submit(specs)

    def status(self) -> dict[str, Any]:
        w = self.worker
        return {"configured": w.settings.configured, "polling": w.polling, "pushed": w.pushed,
                "rules": len(w.settings.rules), "queued": w.scheduler.queued() if w.scheduler else {}}

    def check_health(self) -> None:
        self.worker.healthy()

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
