"""The event intake's engine: each job runs on the Router deployment, by Ray handle, as its site's.

:class:`RouterEngine` is the :class:`serve.jobs.engine.Engine` the ``EventIntake``
deployment (:mod:`serve.cluster.intake`) hands its jobs to. No pod holds a
site's API key for this: the router checks the named site against its tenants
file and runs the job under that site's tenancy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ray import serve as rayserve

from serve.errors import MrisegError, ServiceUnavailableError
from serve.jobs.spec import JobSpec
from serve.outputs import layout
from serve.router.submodels import is_replica_failure

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
    """A :class:`serve.jobs.engine.Engine` that runs each job on the Router deployment, as the job's site's.

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
            if is_replica_failure(e):  # the router restarting or replaced: a later run can succeed
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
