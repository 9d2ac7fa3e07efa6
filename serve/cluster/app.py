"""The Serve application: six sub-model deployments behind one ingress.

``serve.cluster.app:build_app`` is a Ray Serve application builder: the
``args`` of a Serve config file (deployments/*.yaml) arrive here, and the
per-deployment settings (replicas, autoscaling, CPUs/GPUs) come from the
same file's ``deployments:`` list, keyed by the stable deployment names
(``organs``, ``muscles``, ..., ``Router``).
"""

import asyncio
import logging
import time
from typing import Any, Mapping

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, field_validator, model_validator
from ray import serve as rayserve
from ray.serve.handle import DeploymentHandle

from serve.api.app import create_app
from serve.catalogue import load_catalogue
from serve.cluster.deployments import SubModelDeployment, SubModelSettings
from serve.cluster.intake import EventIntake
from serve.cluster.metrics import IngressMetrics
from serve.demo import ensure_demo_models
from serve.errors import MrisegError, NotFoundError, ServiceUnavailableError
from serve.imaging.sandbox import SandboxedDecoder, SandboxPolicy
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.jobs.intake_settings import EventsArg, IntakeSettings, without_retired
from serve.router.service import JobService, RouterSettings
from serve.router.tenancy import Tenancy
from serve.settings_checks import check, error_line
from serve.storage.s3client import S3Settings

log = logging.getLogger(__name__)

DEMO_SOURCE = "demo"


def default_submodels() -> list[str]:
    cat = load_catalogue()
    return [sm.name for sm in cat.submodels] + [sm.name for sm in cat.fast_variants]


@rayserve.deployment(
    name="Router",
    ray_actor_options={"num_cpus": 1},
    num_replicas=1,  # one job table; it survives a replica restart through serve.router.journal
    max_ongoing_requests=256,
    health_check_period_s=10,
)
@rayserve.ingress()  # the app comes from __serve_build_asgi_app__: one per replica, over its own job service
class Ingress:
    """HTTP ingress and job router; holds a handle to every sub-model deployment."""

    async def __init__(self, submodels: dict[str, DeploymentHandle], settings: dict[str, Any],
                 intake: DeploymentHandle | None = None):
        self.handles = submodels
        self.settings = settings
        tenancy = Tenancy.load(settings.get("tenants_file"))
        metrics = IngressMetrics()
        decoder = SandboxedDecoder(SandboxPolicy.from_mapping(settings.get("sandbox")))
        self.sandbox_layers = decoder.probe()
        self.sandbox_missing = decoder.missing_layers(self.sandbox_layers)
        log.info("decoder sandbox layers: %s", ", ".join(f"{k}={'on' if v else 'OFF'}"
                                                        for k, v in self.sandbox_layers.items()))
        if self.sandbox_missing:
            log.error("the decoder sandbox lacks required layer(s) %s: not ready, nothing is decoded",
                      ", ".join(self.sandbox_missing))
        events = None
        if intake is not None:
            # the rules and the job-record prefix are checked against the tenants here, where both are at
            # hand: a bad rule, or a site able to write job records, stops the start
            events = _IntakeSink(intake, IntakeSettings.from_mapping(settings.get("events") or {}, settings.get("s3"),
                                                                     tenancy=tenancy))
        self.service = JobService(tenancy, self._call, self._describe, list(submodels),
                                  RouterSettings.from_mapping({**(settings.get("router") or {}),
                                                               "s3": settings.get("s3")}),
                                  metrics, running_replicas=self._running_replicas, decoder=decoder,
                                  reserved_prefixes=[events.settings.jobs] if events and events.settings.jobs else [])
        self._ready_cache: tuple[float, dict] | None = None
        # startup work, here on the replica's event loop rather than at a first request: jobs a previous
        # replica accepted and never settled are queued again before anything new is taken
        self.service.resume_interrupted()
        self.api = create_app(self.service, self.readiness, events)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's HTTP app (Ray Serve calls this once, after the constructor)."""
        return self.api

    async def _call(self, name: str, data: Any, spacing_mm: float) -> dict:
        return await self.handles[name].run.remote(data, spacing_mm)

    async def _describe(self, name: str) -> dict:
        return await self.handles[name].describe.remote()

    async def _running_replicas(self) -> dict[str, int]:
        return (await self.readiness())["running"]

    async def readiness(self) -> dict:
        """Every sub-model deployment healthy (a min_replicas 0 deployment at zero replicas counts as healthy)."""
        now = time.monotonic()
        if self._ready_cache and now - self._ready_cache[0] < 1.0:
            return self._ready_cache[1]
        try:
            report = await asyncio.to_thread(_deployment_report, list(self.handles))
        except Exception as e:  # Ray's controller restarting or unreachable: not ready, and not a bug (500)
            log.warning("cannot read the deployments' status: %s", type(e).__name__)
            raise ServiceUnavailableError("the cluster cannot report its deployments' status right now; "
                                          "try again shortly") from e
        report = with_sandbox(report, self.sandbox_layers, self.sandbox_missing)
        self._ready_cache = (now, report)
        return report

    async def check_health(self) -> None:
        """Serve's periodic health check: raising marks this replica unhealthy, and Serve replaces it.

        Async, so it runs on the event loop the jobs run on: a blocked loop times the check out.

        Raises:
            SchedulerStalledError: queued jobs can no longer start.
            JournalUnhealthyError: the journal's folder is gone, read-only or nearly full.
        """
        await self.service.check_health()

    # -- the event intake's calls (by Ray handle: the intake holds no site's API key) --------------------
    async def run_site_job(self, site: str, data: bytes, filename: str, roi_subset: list[str] | None, fast: bool,
                           outputs: list[str], input_uri: str, output_prefix: str,
                           resampling_order: int = DEFAULT_RESAMPLING_ORDER) -> dict:
        """One event job of ``site``, run as that site's job: :meth:`JobService.run_event_job`."""
        return await self.service.run_event_job(site, data, filename, roi_subset, fast, outputs, input_uri,
                                                output_prefix, resampling_order)

    async def submodel_checksums(self, site: str, roi_subset: list[str] | None, fast: bool) -> dict:
        """The sub-model checksums of an event job of ``site``: :meth:`JobService.event_checksums`."""
        return await self.service.event_checksums(site, roi_subset, fast)

    def site_limits(self) -> dict[str, int]:
        """Each site's job limit from the tenants file, for the intake's per-site scheduling."""
        return self.service.site_limits()


def with_sandbox(report: dict, layers: dict[str, bool], missing: list[str]) -> dict:
    """The readiness report with the decoder sandbox's layers; not ready while a required one is missing.

    Args:
        report: the deployments' readiness report.
        layers: the layers the router's probe found active.
        missing: the required layers among those not active.

    Returns:
        A new report.
    """
    report = {**report, "sandbox": dict(layers)}
    if missing:
        report["ready"] = False
        report["detail"] = (f"the decoder sandbox lacks the required layer(s) {', '.join(missing)} on this host "
                            f"(see the router's log and docs/reliability.md); nothing is decoded until it has them")
    return report


class _IntakeSink:
    """``POST /v1/events`` -> the EventIntake deployment, limited to the caller's own inboxes."""

    def __init__(self, handle: DeploymentHandle, settings: IntakeSettings):
        self.handle, self.settings = handle, settings

    def rules_for(self, site: str) -> list:
        if not self.settings.configured:
            raise NotFoundError("event intake is not configured on this cluster: set events.jobs "
                                          "(or MRISEG_EVENTS_JOBS_PREFIX) and the inbox rules")
        return self.settings.rules_for(site)

    async def submit(self, specs: list[dict]) -> int:
        try:
            return await self.handle.submit.remote(specs)
        except MrisegError:
            raise
        except Exception as e:  # Ray's errors: the intake replica died, is restarting or is being replaced
            log.warning("event intake unreachable: %s", type(e).__name__)
            raise ServiceUnavailableError("the event intake is restarting; push the events again shortly (a "
                                          "job already held is not run twice)") from e


# A deployment that is resizing still serves; one at zero replicas with min_replicas 0 is HEALTHY
# and scales up on its first request. UPDATING (first deploy), UNHEALTHY, DEPLOY_FAILED are not ready.
SERVING_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")


def _deployment_report(names: list[str]) -> dict:
    app_name = rayserve.get_replica_context().app_name
    status = rayserve.status().applications.get(app_name)
    deployments = status.deployments if status else {}
    out, running = {}, {}
    for n in names:
        d = deployments.get(n)
        out[n] = str(d.status.value if hasattr(d.status, "value") else d.status) if d else "MISSING"
        states = {str(getattr(k, "value", k)): v for k, v in (d.replica_states if d else {}).items()}
        running[n] = int(states.get("RUNNING", 0))
    bad = {k: v for k, v in out.items() if v not in SERVING_STATES}
    return {"ready": not bad, "submodels": out, "running": running,
            "detail": "sub-model deployments not serving: " + ", ".join(f"{k}={v}" for k, v in bad.items())
            if bad else ""}


def _resolve_sources(sources: list[str]) -> list[str]:
    out = []
    for s in sources:
        if s == DEMO_SOURCE:
            out.append(str(ensure_demo_models()))
        else:
            out.append(str(s))
    return out


#: the fields :func:`AppArgs._submodel_settings` fills for the check, which the section itself never holds
_PER_SUBMODEL = {"submodel", "model_sources"}

#: app args of earlier versions, refused with what to do instead (the ingress served its own /metrics)
RETIRED_ARGS = ("metrics_port", "metrics_host")


class AppArgs(BaseModel):
    """The ``args`` of the Serve app (a Serve config's ``args:``), checked by Ray Serve's typed app builder.

    Each section is the settings model that later reads it, read by that model's ``from_mapping`` (so a
    bad key stops ``serve deploy`` with its section and name); :meth:`as_written` hands the sections on
    with only the keys written, so a replica fills the rest where it runs (its environment, its scratch
    folder).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model_sources: list[StrictStr] | None = None   # dirs, s3:// URIs or "demo"; None: the demo models
    model_pins: StrictStr | None = None            # the operator's pinned model manifest; required for s3:// sources
    model_cache_dir: StrictStr | None = None
    s3: S3Settings | None = None
    submodels: list[StrictStr] | None = None       # None: the six and total_fast
    # every sub-model's settings; the sub-model's name and the model sources are the app's, filled per replica
    submodel_settings: SubModelSettings | None = None
    tenants_file: StrictStr | None = None
    router: RouterSettings | None = None
    deployment_options: dict[str, dict[str, Any]] | None = None  # deployment name (or "submodel_defaults") -> options
    events: EventsArg | None = None                # present: the EventIntake runs
    sandbox: SandboxPolicy | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: Any) -> "AppArgs":
        # Ray calls model_validate itself: its error must still name the arg, in one line
        retired = sorted(k for k in RETIRED_ARGS if isinstance(data, Mapping) and k in data)
        if retired:
            raise MrisegError(f"app args: {', '.join(retired)}: the Router no longer serves its own /metrics; "
                              f"Ray's metrics agent on each node exports its metrics (the node's metrics export "
                              f"port, 8080 in the k8s manifests; names prefixed ray_, e.g. ray_mriseg_volumes_total). "
                              f"Remove {', '.join(retired)} from the config and scrape that port instead")
        try:
            return handler(data)
        except ValidationError as e:
            raise MrisegError(f"app args: {error_line(cls, e, 'app arg')}") from None

    @field_validator("submodels")
    @classmethod
    def _known_submodels(cls, names: list[str] | None) -> list[str] | None:
        valid = default_submodels()
        bad = [n for n in names or [] if n not in valid]
        if bad:
            raise MrisegError(f"unknown sub-model(s) {bad} in args.submodels; valid: {valid}")
        return names

    # Each section written as a mapping goes through its reader's from_mapping, whose MrisegError names the
    # section ("router: slots must be ..."); a model already built (a Python caller's) is taken as it is.
    @field_validator("s3", mode="before")
    @classmethod
    def _s3(cls, v: Any) -> Any:
        return S3Settings.from_mapping(v) if isinstance(v, Mapping) else v

    @field_validator("submodel_settings", mode="before")
    @classmethod
    def _submodel_settings(cls, v: Any) -> Any:
        return SubModelSettings.from_mapping("*", {**v, "model_sources": []}) if isinstance(v, Mapping) else v

    @field_validator("router", mode="before")
    @classmethod
    def _router(cls, v: Any) -> Any:
        return RouterSettings.from_mapping(v) if isinstance(v, Mapping) else v

    @field_validator("sandbox", mode="before")
    @classmethod
    def _sandbox(cls, v: Any) -> Any:
        return SandboxPolicy.from_mapping(v) if isinstance(v, Mapping) else v

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, v: Any) -> Any:
        return check(EventsArg, without_retired(v), "events") if isinstance(v, Mapping) else v

    def as_written(self) -> dict[str, Any]:
        """The args that were set, each section with only the keys written.

        Returns:
            A mapping as a Serve config's ``args`` (the sections as mappings, without the retired
            ``events`` settings).
        """
        out = self.model_dump(exclude_unset=True)
        if out.get("submodel_settings") is not None:
            out["submodel_settings"] = {k: v for k, v in out["submodel_settings"].items() if k not in _PER_SUBMODEL}
        return out


def validate_args(args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The app args checked as :func:`build_app` checks them.

    Args:
        args: the ``args`` of a Serve config.

    Returns:
        The args that were set, as a mapping.

    Raises:
        MrisegError: an unknown arg or sub-model name, or a section's bad key.
    """
    return AppArgs.model_validate(dict(args or {})).as_written()


def build_app(args: AppArgs) -> rayserve.Application:
    """Application builder for ``serve run serve.cluster.app:build_app`` and Serve config files.

    Ray Serve validates the config's ``args`` into :class:`AppArgs` (the annotation tells it to).

    Args:
        args: ``model_sources`` (dirs, s3:// URIs or "demo"), ``model_pins`` (the operator's pinned
            model manifest, a path; required for s3:// sources), ``model_cache_dir``, ``s3``,
            ``submodels`` (names to deploy; default all six + total_fast), ``submodel_settings``
            (device, threads, precision, gpu_memory_fraction, tile_step_size), ``tenants_file``,
            ``router`` (results_dir, slots, max_upload_bytes, ...),
            ``deployment_options`` (deployment name or "submodel_defaults" -> Serve deployment options),
            ``events`` (S3 event intake: :class:`serve.jobs.intake_settings.IntakeSettings`; adds the
            ``EventIntake`` deployment and ``POST /v1/events``), ``sandbox`` (the decoder sandbox:
            :class:`serve.imaging.sandbox.SandboxPolicy`; its ``require`` list decides readiness).

    Returns:
        The application: the ingress bound to every sub-model deployment (and the intake).
    """
    if not isinstance(args, AppArgs):  # Python callers may hand the mapping of a config file
        args = AppArgs.model_validate(dict(args or {}))
    args = {k: v for k, v in args.as_written().items() if v is not None}
    sources = _resolve_sources(list(args.get("model_sources") or [DEMO_SOURCE]))
    names = list(args.get("submodels") or default_submodels())
    common = {**(args.get("submodel_settings") or {}), "model_sources": sources, "model_pins": args.get("model_pins"),
              "model_cache_dir": args.get("model_cache_dir"), "s3": args.get("s3")}
    # Serve config files set these per deployment in their `deployments:` list (which wins);
    # `deployment_options` does the same for Python callers (`mriseg up`, tests).
    opts = args.get("deployment_options") or {}
    bound = {n: SubModelDeployment.options(name=n, **{**opts.get("submodel_defaults", {}), **opts.get(n, {})})
             .bind(n, common) for n in names}
    ingress_settings = {k: args.get(k) for k in ("tenants_file", "router", "s3", "events", "sandbox")
                        if args.get(k) is not None}
    intake = None
    if args.get("events") is not None:  # an empty mapping deploys the intake, idle until a job prefix is set
        intake = EventIntake.options(**opts.get("EventIntake", {})).bind(args["events"], args.get("s3"))
    return Ingress.options(**opts.get("Router", {})).bind(bound, ingress_settings, intake)
