"""The router's view of the sub-model deployments: what each reports, which to call, and calls that retry.

A sub-model deployment is reached by two callables the cluster passes in (its Ray handles): one that
describes the model it serves, one that segments a prepared array. This module bounds both in time,
turns Ray's failures into the user-facing errors (a replica that died mid-call is retried, then 503),
and plans which sub-models a job needs, as the in-process Segmenter does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from serve.catalogue import Catalogue, SubModel
from serve.errors import ModelUnavailableError, MrisegError, ServiceUnavailableError
from serve.router.metrics import JobMetrics
from serve.router.state import Job

if TYPE_CHECKING:  # the settings class lives with the facade that composes this part
    from serve.router.service import RouterSettings

log = logging.getLogger(__name__)

# A sub-model call: (name, [ObjectRef], spacing) -> {"labels", "started", "finished", ...}
SubModelCall = Callable[[str, Any, float], Awaitable[dict]]
Describe = Callable[[str], Awaitable[dict]]


def is_replica_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ray error meaning the replica or its actor went away (worth one retry, then 503).

    Args:
        exc: what a call through a Ray handle raised.

    Returns:
        True for a dead or unavailable actor, worker, node or object, or a request cancelled under the caller.
    """
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


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error, where there is one.

    Args:
        exc: what a call through a Ray handle raised.

    Returns:
        The :class:`MrisegError` it carries as its cause, or ``exc`` itself.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MrisegError):
        return cause
    return exc


class SubModels:
    """The deployed sub-models as the router reaches them: described (cached once ready), planned and called."""

    def __init__(self, call: SubModelCall, describe: Describe, deployed: Iterable[str], catalogue: Catalogue,
                 settings: RouterSettings, metrics: JobMetrics,
                 running_replicas: Callable[[], Awaitable[dict[str, int]]] | None = None):
        """Args:
            call: segments one prepared array on a sub-model deployment.
            describe: what a sub-model deployment reports about its model.
            deployed: the sub-models deployed on this cluster.
            catalogue: the sub-models and the structures each segments.
            settings: the router's settings (``submodel_timeout_s``, ``submodel_retries``), read at each call.
            metrics: where call times are recorded.
            running_replicas: each deployment's running replicas (None: none is reported cold).
        """
        self.call, self.describe_call = call, describe
        self.deployed = list(deployed)
        self.catalogue, self.settings, self.metrics = catalogue, settings, metrics
        self.running_replicas = running_replicas
        self.descriptions: dict[str, dict] = {}

    async def describe(self, name: str) -> dict:
        """What a sub-model deployment reports about its model (cached once ready).

        Args:
            name: the sub-model.

        Returns:
            Its description: ``state``, ``detail``, ``model`` (and ``checksum`` once ready).

        Raises:
            ServiceUnavailableError: the deployment did not answer within ``submodel_timeout_s`` or cannot be
                reached.
        """
        if name not in self.deployed:
            return {"submodel": name, "state": "unavailable", "detail": "not deployed on this cluster",
                    "model": None}
        d = self.descriptions.get(name)
        if d is None:
            limit = self.settings.submodel_timeout_s
            try:
                # a deployment with no replica that can start queues this call: bounded like a sub-model call
                d = await asyncio.wait_for(self.describe_call(name), limit)
            except asyncio.TimeoutError as e:
                raise ServiceUnavailableError(f"sub-model {name} did not describe itself within {limit:g} s "
                                              f"(router.submodel_timeout_s): no replica could start; the job "
                                              f"can be resubmitted as is") from e
            except Exception as e:  # noqa: BLE001 - a Ray failure reaching the deployment, not the job's fault
                if isinstance(e, MrisegError):
                    raise
                if isinstance(unwrap(e), MrisegError):
                    raise unwrap(e) from e
                raise ServiceUnavailableError(f"sub-model {name} cannot be reached ({type(e).__name__}); the "
                                              f"job can be resubmitted as is") from e
            if d["state"] == "ready":
                self.descriptions[name] = d
        return d

    async def availability(self, probe: Iterable[str] = ()) -> dict[str, dict]:
        """Per sub-model state; a deployment scaled to zero is reported "cold", not woken up (unless probed).

        Args:
            probe: sub-models to describe even when scaled to zero.

        Returns:
            Sub-model name -> ``{"state", "detail", "checksum"}``.
        """
        names = [sm.name for sm in list(self.catalogue.submodels) + list(self.catalogue.fast_variants)]
        running = await self.running_replicas() if self.running_replicas else {}
        probe = set(probe)

        async def one(n: str):
            if n in self.deployed and n not in self.descriptions and running.get(n) == 0 and n not in probe:
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

    async def plan(self, job: Job) -> tuple[list[SubModel], dict[str, dict], dict[str, str]]:
        """Sub-models to call and their metadata; like Segmenter.plan, explicit requests need every model.

        Args:
            job: the job (its ``roi_subset`` and ``fast`` options).

        Returns:
            ``(sub-models to run, their descriptions by name, skipped sub-model -> why)``.

        Raises:
            ServiceUnavailableError: a sub-model's model source cannot be read right now.
            ModelUnavailableError: a sub-model the request needs is not available, or none is.
        """
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

    async def call_with_retry(self, job: Job, sm: SubModel, ref: Any) -> dict:
        """Segment one prepared array on ``sm``, re-sent after a replica died mid-call (``submodel_retries``).

        Args:
            job: the job; its ``submodels`` entry for ``sm`` is filled in.
            sm: the sub-model.
            ref: the prepared array's ObjectRef (or the array, where no Ray runs).

        Returns:
            The deployment's answer: ``{"labels", "started", "finished", ...}``.

        Raises:
            ServiceUnavailableError: no answer within ``submodel_timeout_s``, or the replica kept failing.
            MrisegError: the user-facing error the deployment raised.
        """
        attempts = self.settings.submodel_retries + 1
        for attempt in range(attempts):
            t = time.perf_counter()
            try:
                r = await asyncio.wait_for(self.call(sm.name, [ref], sm.spacing_mm),
                                           self.settings.submodel_timeout_s)
            except asyncio.TimeoutError as e:
                raise ServiceUnavailableError(
                    f"sub-model {sm.name} did not answer within {self.settings.submodel_timeout_s:g} s "
                    f"(router.submodel_timeout_s); the job can be resubmitted as is") from e
            except Exception as e:  # noqa: BLE001 - sorted below
                inner = unwrap(e)
                if isinstance(inner, MrisegError):
                    raise inner from None
                if is_replica_failure(e):
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
