"""Event intake inside the Ray cluster: the SQS consumer and pushed events, as one Serve deployment.

``EventIntake`` is a thin deployment around plain code that is tested on
its own (:mod:`serve.jobs.consumer`, :mod:`serve.jobs.store`, :class:`IntakeWorker`):

- with a queue configured, threads long-poll SQS (:class:`serve.jobs.consumer.Consumer`);
- :meth:`EventIntake.submit` takes jobs that the ingress's ``POST /v1/events``
  parsed from pushed S3 ``Records[]``/SNS/EventBridge bodies;
- every job runs through :class:`serve.jobs.store.JobRunner` (durable records in
  S3, idempotency, atomic claims) with :class:`RouterEngine`, which hands the
  input to the Router deployment by Ray handle, naming the job's site. The
  router runs it as that site's job (its job limit, fair share, admission,
  sandboxed decoding) and refuses a site the tenants file no longer has. No
  pod holds a site's API key for this.
- jobs wait in one queue per site and run round-robin over the sites with
  work, at most each site's ``max_concurrent_jobs`` at once
  (:class:`SiteScheduler`): one site's flood of events does not hold up
  another site's.

Restart policy: Serve calls :meth:`EventIntake.check_health` every
``health_check_period_s``; a dead poll thread fails it, and Serve replaces
the replica. Messages in flight on a dead replica come back after their
visibility timeout; pushed jobs are held in S3 until they settle
(:mod:`serve.jobs.pushes`), and the next replica runs what it finds held; job
claims expire with their lease.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Mapping, Sequence

import yaml
from pydantic import StrictStr
from ray import serve as rayserve

from serve.clock import SYSTEM_CLOCK, Clock
from serve.errors import MrisegError, NotFoundError, ServiceUnavailableError
from serve.jobs.consumer import Consumer, ConsumerConfig
from serve.jobs.rules import InboxRule, check_rules
from serve.jobs.pushes import MAX_ATTEMPTS, HeldPush, PushJournal, retry_delay_s
from serve.jobs.records import RecordSigner
from serve.jobs.store import FAILED, RUNNING, SUCCEEDED, JobOutcome, JobRunner, JobSpec, JobStore
from serve.outputs import layout
from serve.router.service import _is_replica_failure, sites_holding
from serve.settings_checks import STRICT, Says, check, number, setting_names, whole
from serve.storage.s3client import S3Settings, parse_s3_uri

if TYPE_CHECKING:
    from serve.router.tenancy import Tenancy

log = logging.getLogger(__name__)

#: environment fallbacks, so Kubernetes can fill them from a ConfigMap
ENV = {"queue_url": "MRISEG_EVENTS_QUEUE_URL", "dlq_url": "MRISEG_EVENTS_DLQ_URL",
       "rules_file": "MRISEG_EVENTS_RULES_FILE", "jobs": "MRISEG_EVENTS_JOBS_PREFIX"}

#: settings of earlier versions that are ignored (with a warning) rather than refused, so a config still
#: naming them starts; the intake reaches the router by Ray handle, without the sites' API keys
RETIRED_SETTINGS = ("site_keys", "site_keys_file", "api_url")


_CONCURRENCY, _LEASE_S, _MAX_BYTES = whole(1), number(1), whole(1)


@dataclass
class EventsArg:
    """The ``events`` app arg as written in a Serve config (see :meth:`IntakeSettings.from_mapping`)."""

    __pydantic_config__ = STRICT  # how from_mapping validates a file's mapping (pydantic)

    jobs: StrictStr = ""
    rules: Annotated[list, Says("a list of inbox rules")] | None = None
    rules_file: Annotated[StrictStr, Says("a file path")] | None = None
    queue_url: StrictStr | None = None
    dlq_url: StrictStr | None = None
    sqs: Annotated[dict, Says("a mapping of SQS connection settings")] | None = None
    sqs_options: Annotated[dict, Says("a mapping of SQS settings")] | None = None
    concurrency: _CONCURRENCY = 2
    lease_s: _LEASE_S = 300.0
    max_bytes: _MAX_BYTES = 1 << 30
    record_key_file: Annotated[StrictStr, Says("a file path")] | None = None


EVENTS_SETTINGS = tuple(setting_names(EventsArg))


@dataclass
class IntakeSettings:
    """The event intake's settings, resolved from the ``events`` app arg and the environment (``ENV``)."""

    __pydantic_config__ = STRICT  # how from_mapping validates a file's mapping (pydantic)

    jobs: StrictStr = ""                     # s3:// prefix of the durable job records
    rules: list[InboxRule] = field(default_factory=list)
    queue: ConsumerConfig | None = None      # None: pushed events only
    concurrency: _CONCURRENCY = 2             # event jobs in flight per replica (all sites), and as many SQS pollers
    lease_s: _LEASE_S = 300.0
    max_bytes: _MAX_BYTES = 1 << 30
    record_key_file: StrictStr | None = None  # the key that signs job records; None: $MRISEG_RECORD_KEY_FILE
    s3: S3Settings = field(default_factory=S3Settings)

    @property
    def configured(self) -> bool:
        """False when no job-record prefix is set: the deployment then idles and pushes get a 404."""
        return bool(self.jobs)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], s3: Mapping[str, Any] | None = None,
                     tenancy: "Tenancy | None" = None) -> "IntakeSettings":
        """Parse the ``events`` app arg. Without ``jobs`` (or ``MRISEG_EVENTS_JOBS_PREFIX``) intake is off
        and the rules file is not read, so one Serve config fits clusters with and without it.

        Args:
            d: the ``events`` app arg.
            s3: the app's ``s3`` settings.
            tenancy: the tenants; given, every rule is checked against them (:func:`check_rules_in_tenancy`)
                and the ``jobs`` prefix must lie outside every site's prefixes (:func:`check_jobs_prefix`).

        Returns:
            The checked settings.
        """
        d = dict(d or {})
        retired = sorted(k for k in RETIRED_SETTINGS if k in d)
        if retired:
            log.warning("events: setting(s) %s are no longer used: the intake reaches the router by Ray handle, "
                        "naming each job's site, without API keys; remove them (and any site keys file)",
                        ", ".join(retired))
            for k in retired:
                del d[k]
        for k, var in ENV.items():
            if not d.get(k) and os.environ.get(var):
                d[k] = os.environ[var]
        if not d.get("jobs"):
            return cls(s3=S3Settings.from_mapping(s3))
        for k in ("rules_file", "record_key_file"):  # "" is unset; a pathlib.Path is a path
            if d.get(k) == "":
                d[k] = None
            elif isinstance(d.get(k), os.PathLike):
                d[k] = str(d[k])
        arg = check(EventsArg, d, "events")
        rules = list(arg.rules or [])
        try:
            if arg.rules_file:
                rules += _listed(_read_json_or_yaml(arg.rules_file), "the rules file")
        except OSError as e:
            raise MrisegError(f"events: cannot read {e.filename}: {e.strerror}") from e
        except (ValueError, UnicodeDecodeError) as e:  # JSON and YAML parse errors
            raise MrisegError(f"events: the rules file is not valid JSON/YAML ({type(e).__name__})") from e
        parsed = check_rules([InboxRule.from_mapping(r) for r in rules])
        parse_s3_uri(arg.jobs.rstrip("/") + "/")  # a clear error for a jobs prefix that is not s3://
        if tenancy is not None:
            check_rules_in_tenancy(parsed, tenancy)
            check_jobs_prefix(arg.jobs, tenancy)
        for r in parsed:
            if "per_structure" in r.outputs:  # the router hands back the multilabel, statistics and preview only
                raise MrisegError(f"events: inbox rule for site {r.site!r}: outputs 'per_structure' cannot be made "
                                  f"for event jobs in the cluster; 'multilabel' holds every structure (its label "
                                  f"table names them)")
        queue = None
        if arg.queue_url:
            queue = ConsumerConfig.from_mapping({**(arg.sqs_options or {}), "queue_url": arg.queue_url,
                                                 "dlq_url": arg.dlq_url, "sqs": arg.sqs or s3 or {}, "rules": rules})
        return cls(jobs=arg.jobs, rules=parsed, queue=queue, concurrency=arg.concurrency, lease_s=arg.lease_s,
                   max_bytes=arg.max_bytes, record_key_file=arg.record_key_file, s3=S3Settings.from_mapping(s3))

    def rules_for(self, site: str) -> list[InboxRule]:
        """The inboxes a site may push events for (its own only)."""
        return [r for r in self.rules if r.site == site]


def check_jobs_prefix(jobs: str, tenancy: "Tenancy") -> None:
    """Refuse a job-record prefix that any site's prefix contains, equals or lies inside.

    The intake trusts what it finds there (held pushes, job claims); a site that can
    write there could forge them and have the intake read another site's objects or
    block its jobs.

    Args:
        jobs: the ``events.jobs`` prefix.
        tenancy: the tenants loaded from the tenants file.

    Raises:
        MrisegError: naming the site and its overlapping prefix.
    """
    holders = sites_holding(tenancy.sites.values(), jobs)
    if holders:
        site, prefix = holders[0]
        raise MrisegError(f"events: the job-record prefix {jobs} overlaps site {site!r}'s prefix {prefix} in the "
                          f"tenants file, so that site could write the records the intake trusts; put events.jobs "
                          f"(MRISEG_EVENTS_JOBS_PREFIX) where no site's prefixes reach, e.g. a bucket of its own")


def check_rules_in_tenancy(rules: Sequence[InboxRule], tenancy: "Tenancy") -> None:
    """Refuse inbox rules the tenants file does not back.

    The intake reads inboxes and writes outputs with its own credentials, not through the
    API's prefix checks, so a rule is itself a grant: an inbox or output root outside its
    site's prefixes would hand the site (or the site's outputs) data of another.

    Args:
        rules: the parsed inbox rules.
        tenancy: the tenants loaded from the tenants file.

    Raises:
        MrisegError: naming the rule's site and what lies outside: a site that is not in the
            tenants file, an inbox, or ``{output_root}/{site}/`` (where its outputs go).
    """
    for r in rules:
        name = f"events: inbox rule for site {r.site!r}"
        site = tenancy.sites.get(r.site)
        if site is None:
            raise MrisegError(f"{name}: the tenants file has no such site (its sites: {sorted(tenancy.sites)}); "
                              f"name a site of the tenants file")
        inbox = f"s3://{r.bucket}/{r.prefix}"
        if not site.owns(inbox if not r.prefix or inbox.endswith("/") else inbox + "/"):
            raise MrisegError(f"{name}: the inbox {inbox} is not inside the site's prefixes in the tenants file "
                              f"({', '.join(site.prefixes)}); give the site that prefix, or the rule one inside "
                              f"its prefixes")
        outputs = f"{r.output_root.rstrip('/')}/{r.site}/"
        if not site.owns(outputs):
            raise MrisegError(f"{name}: its outputs would go under {outputs}, which is not inside the site's "
                              f"prefixes in the tenants file ({', '.join(site.prefixes)}); choose an output_root "
                              f"whose {{output_root}}/{r.site}/ lies inside them")


def _listed(value: Any, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MrisegError(f"events: {what} must be a list of inbox rules")
    return list(value)


def _read_json_or_yaml(path: str | os.PathLike) -> Any:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError("not YAML") from e
    return json.loads(text)


#: how long one call to the router may take (a job with its queueing; the checksums, which may start a
#: sub-model scaled to zero) before the intake stops waiting
JOB_TIMEOUT_S = 1800.0
#: result-folder file names the router hands back (serve.outputs.layout maps them to the S3 layout)
ROUTER_FILES = (layout.MULTILABEL, layout.STATISTICS, layout.PREVIEW)


class RouterJobError(MrisegError):
    """An event job the router refused or that failed there, with the router's status and reason."""

    def __init__(self, error: Mapping[str, Any]):
        super().__init__(str(error.get("detail") or "the router gave no reason"))
        self.status = int(error.get("status") or 500)
        self.title = str(error.get("title") or "Router error")
        self.retryable = bool(error.get("retryable"))


class RouterEngine:
    """A :class:`serve.jobs.store.Engine` that runs each job on the Router deployment, as the job's site's.

    The input's bytes go to ``Router.run_site_job`` by Ray handle with the site's
    name; the router checks the site against the tenants file and runs the job
    under that site's tenancy, and hands back the output files. The handle is got
    lazily (the router holds this deployment's handle, so it starts after it).

    Args:
        app_name: the Serve application; None: this replica's own.
        timeout_s: how long one call may take on the router (a job, with its queueing).
    """

    def __init__(self, app_name: str | None = None, timeout_s: float = JOB_TIMEOUT_S):
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.calls = 0  # jobs the router ran (idempotency is observable)
        self._handle = None

    def _router(self):
        if self._handle is None:
            app = self.app_name or rayserve.get_replica_context().app_name
            self._handle = rayserve.get_deployment_handle("Router", app_name=app)
        return self._handle

    def _call(self, method: str, *args: Any, timeout_s: float) -> Any:
        response = getattr(self._router(), method).remote(*args)
        try:
            reply = response.result(timeout_s=timeout_s)
        except TimeoutError as e:
            response.cancel()  # the router cancels the job, freeing the site's slot
            raise ServiceUnavailableError(f"the router did not answer within {timeout_s:g} s; the job is "
                                          f"retried") from e
        except Exception as e:
            if _is_replica_failure(e):  # the router restarting or replaced: a later run can succeed
                raise ServiceUnavailableError(f"the router cannot be reached right now ({type(e).__name__}); "
                                              f"the job is retried") from e
            raise
        if isinstance(reply, Mapping) and reply.get("error"):
            raise RouterJobError(reply["error"])
        return reply

    def site_limits(self) -> dict[str, int]:
        """Each site's ``max_concurrent_jobs`` from the router's tenants file.

        Returns:
            Site name -> job limit.
        """
        return {str(k): int(v) for k, v in self._call("site_limits", timeout_s=10.0).items()}

    def model_checksums(self, roi_subset: Sequence[str] | None, fast: bool, site: str) -> dict[str, str]:
        """Checksums of the sub-models the router would run for ``site`` (part of the idempotency key).

        Args:
            roi_subset: the structures wanted, None for all.
            fast: the 3 mm model.
            site: the job's site (refused when the tenants file no longer has it).

        Returns:
            Sub-model name -> checksum.
        """
        reply = self._call("submodel_checksums", site, list(roi_subset) if roi_subset else None, bool(fast),
                           timeout_s=self.timeout_s)
        return dict(reply["checksums"])

    def segment_file(self, path: Path, spec: JobSpec, outdir: Path) -> dict[str, Any]:
        """Run ``path`` on the router as ``spec.site``'s job and write the files it hands back into ``outdir``.

        Args:
            path: the input the runner downloaded.
            spec: the job (its site, options, input and output prefix).
            outdir: where the runner publishes from.

        Returns:
            The engine's metadata: timings, structures, models, unavailable, demo, input_cast.
        """
        if "per_structure" in spec.outputs:
            raise MrisegError("per-structure masks are not made for event jobs in the cluster; request "
                              "'multilabel' (the label table holds every structure)")
        t = time.perf_counter()
        reply = self._call("run_site_job", spec.site, Path(path).read_bytes(), Path(path).name,
                           list(spec.roi_subset) if spec.roi_subset else None, spec.fast, list(spec.outputs),
                           spec.input_uri, spec.output_prefix, spec.resampling_order, timeout_s=self.timeout_s)
        self.calls += 1
        outdir.mkdir(parents=True, exist_ok=True)
        for name, content in reply["files"].items():
            if name not in ROUTER_FILES:  # a name is never a path: nothing lands outside outdir
                raise ServiceUnavailableError(f"the router handed back an unexpected file {name[:60]!r}")
            (outdir / name).write_bytes(content)
        timings = {**reply.get("timings", {}), "cluster_roundtrip_s": time.perf_counter() - t}
        timings.update({f"submodel_{n}_s": v["compute_s"] for n, v in reply.get("submodels", {}).items()})
        return {"timings": timings, "structures": reply.get("structures", {}), "models": reply.get("models", {}),
                "unavailable": reply.get("unavailable", {}), "demo": bool(reply.get("demo")),
                "input_cast": reply.get("input_cast"), "cluster_job_id": reply.get("id")}


class SiteScheduler:
    """Runs callables on ``workers`` threads: round-robin over the sites with work, each site's at most its limit.

    Each site has a FIFO queue. A free worker takes the next job of the site served
    least recently among those with a job waiting and fewer than their limit running,
    so a site that queues a thousand jobs waits behind itself, not in front of another
    site's one.

    Args:
        workers: threads (jobs running at once, all sites).
        limits: each site's limit of jobs running at once (looked at by each worker before it picks;
            a site it does not name gets ``default_limit``).
        default_limit: the limit of a site ``limits`` does not name.
        name: the threads' name prefix.
    """

    def __init__(self, workers: int, limits: Callable[[], Mapping[str, int]], default_limit: int = 1,
                 name: str = "mriseg-intake"):
        self._limits = limits
        self.default_limit = max(1, default_limit)
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[tuple[Callable[[], Any], Future]]] = OrderedDict()
        self._running: dict[str, int] = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def submit(self, site: str, fn: Callable[[], Any]) -> Future:
        """Queue ``fn`` for ``site``.

        Args:
            site: whose job it is.
            fn: the job.

        Returns:
            A future of its result (cancelled if the scheduler closes first).
        """
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the intake's scheduler is closed")
            if site not in self._queues:
                self._queues[site] = deque()
                self._queues.move_to_end(site, last=False)  # never served: first in the round
            self._queues[site].append((fn, fut))
            self._cond.notify()
        return fut

    def queued(self) -> dict[str, int]:
        """Jobs waiting, by site."""
        with self._cond:
            return {s: len(q) for s, q in self._queues.items() if q}

    def running(self) -> dict[str, int]:
        """Jobs running, by site."""
        with self._cond:
            return {s: n for s, n in self._running.items() if n}

    def _pick(self, limits: Mapping[str, int]) -> tuple[str, Callable[[], Any], Future] | None:
        for site, q in self._queues.items():
            if q and self._running.get(site, 0) < max(1, int(limits.get(site, self.default_limit))):
                self._queues.move_to_end(site)  # served: to the back of the round
                fn, fut = q.popleft()
                self._running[site] = self._running.get(site, 0) + 1
                return site, fn, fut
        return None

    def _work(self) -> None:
        while True:
            try:
                limits = self._limits()  # outside the lock: it may ask the router
            except Exception:  # noqa: BLE001 - a limit look-up must not kill a worker
                log.warning("could not look up the sites' job limits", exc_info=True)
                limits = {}
            with self._cond:
                if self._closed:
                    return
                picked = self._pick(limits)
                if picked is None:
                    # woken by a new job or a finished one; the timeout sees a limit raised meanwhile
                    self._cond.wait(1.0)
                    continue
            site, fn, fut = picked
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to whoever waits on it
                        fut.set_exception(e)
            finally:
                with self._cond:
                    self._running[site] -= 1
                    self._cond.notify_all()

    def close(self) -> None:
        """Stop taking jobs; jobs still waiting are cancelled (pushed ones stay held in S3)."""
        with self._cond:
            self._closed = True
            for q in self._queues.values():
                while q:
                    q.popleft()[1].cancel()
            self._cond.notify_all()


class SiteLimits:
    """The sites' job limits from ``fetch``, asked for at most every ``ttl_s``; the last answer while it fails.

    Args:
        fetch: returns site name -> limit (the router's tenants file).
        ttl_s: how long an answer is used.
    """

    def __init__(self, fetch: Callable[[], Mapping[str, int]], ttl_s: float = 5.0):
        self._fetch, self.ttl_s = fetch, ttl_s
        self._limits: dict[str, int] = {}
        self._next = 0.0
        self._failing = False
        self._lock = threading.Lock()

    def __call__(self) -> Mapping[str, int]:
        now = time.monotonic()
        if now >= self._next and self._lock.acquire(blocking=False):  # one thread asks; the others use the last
            try:
                self._next = now + self.ttl_s
                self._limits = dict(self._fetch())
                self._failing = False
            except Exception as e:  # noqa: BLE001 - the router starting or restarting
                if not self._failing:
                    log.warning("could not read the sites' job limits from the router (%s); using the last "
                                "known (1 for a site not known yet)", type(e).__name__)
                self._failing = True
            finally:
                self._lock.release()
        return self._limits


class IntakeWorker:
    """The plain part of the deployment: a JobRunner, the per-site scheduler, and the optional SQS pollers.

    Args:
        settings: the intake settings.
        runner: the job runner; None: a :class:`serve.jobs.store.JobRunner` with a :class:`RouterEngine`.
        dlq_gauge: the dead-letter queue gauge to set.
        job_counter: counts jobs by outcome.
        site_limits: returns each site's job limit (1 for a site it does not name); None: the router's
            (``RouterEngine.site_limits``), or, with a ``runner`` given, no limit per site.
        app_name: the Serve application whose Router runs the jobs; None: this replica's.
        clock: the time of the held jobs' backoffs and of the sweeps that run them (:mod:`serve.clock`);
            a ``runner`` given must use the same clock in its store (leases and backoffs are compared).
    """

    def __init__(self, settings: IntakeSettings, runner=None, dlq_gauge=None, job_counter=None,
                 site_limits: Callable[[], Mapping[str, int]] | None = None, app_name: str | None = None,
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
        # None: $MRISEG_RECORD_KEY_FILE; either way a missing key stops the replica, saying what to set
        signer = RecordSigner.from_file(settings.record_key_file) if settings.record_key_file else None
        self.journal = PushJournal(settings.jobs, settings.s3, signer=signer, clock=clock)
        if runner is None:
            engine = RouterEngine(app_name)
            runner = JobRunner(JobStore(settings.jobs, settings.s3, lease_s=settings.lease_s, signer=signer,
                                        clock=clock), engine,
                               settings.s3, max_bytes=settings.max_bytes)
            site_limits = site_limits or engine.site_limits
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
        self.worker = IntakeWorker(IntakeSettings.from_mapping(settings, s3), dlq_gauge=dlq, job_counter=jobs,
                                   app_name=rayserve.get_replica_context().app_name)

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
