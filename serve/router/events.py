"""Event jobs: the event intake names a job's site (by Ray handle, holding no key), and the router runs the
job as that site's, refusing what the tenants file does not grant.

The router holds no record of an event job beyond its own kept jobs: the intake reads the input, and
publishes the outputs this module hands back, itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from serve.errors import (ForbiddenError, ModelUnavailableError, MrisegError, ServiceUnavailableError,
                          VolumeTooLargeError)
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.jobs.runner import error_dict
from serve.router.state import Job, JobOptions
from serve.router.submission import check_upload_name
from serve.router.tenancy import Site, prefix_key

if TYPE_CHECKING:  # the facade composes this part; the part calls back only through its public methods
    from serve.router.service import JobService

log = logging.getLogger(__name__)

#: the outputs an event job in the cluster hands back (per-structure masks stay on the router)
EVENT_OUTPUTS = ("multilabel", "statistics", "preview")


def event_reply(job: Job) -> dict[str, Any]:
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


class EventJobs:
    """The router's side of event jobs, run through the job service's public methods."""

    def __init__(self, service: "JobService"):
        """Args:
            service: the job service the event jobs are submitted to.
        """
        self.svc = service
    def site(self, name: str) -> Site:
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
        self.svc.tenancy.refresh()
        for reserved in self.svc.reserved_prefixes:
            holders = sites_holding(self.svc.tenancy.sites.values(), reserved)
            if holders:
                log.error("the tenants file gives site(s) %s prefixes overlapping the event job records' prefix; "
                          "event jobs are refused until it does not", ", ".join(sorted({s for s, _ in holders})))
                raise ServiceUnavailableError("the cluster's tenants file overlaps a site's prefixes with the event "
                                              "job records; event jobs wait until the operators fix it")
        site = self.svc.tenancy.sites.get(name)
        if site is None:
            raise ForbiddenError(f"site {name!r} is not in the tenants file (any more), so its event jobs are "
                                 f"refused; add the site back, or remove its inbox rules")
        return site

    async def checksums(self, site_name: str, roi_subset: list[str] | None, fast: bool) -> dict[str, Any]:
        """The checksums of the sub-models an event job of ``site_name`` would run (its idempotency key's).

        Args:
            site_name: the job's site.
            roi_subset: the structures wanted, None for all.
            fast: the 3 mm model.

        Returns:
            ``{"checksums": {sub-model: sha256}}``, or ``{"error": {status, title, detail, retryable}}``.
        """
        try:
            site = self.site(site_name)
            opts = self.svc.validate_options(site, JobOptions(list(roi_subset) if roi_subset else None, bool(fast)))
            plan = [sm.name for sm in self.svc.catalogue.plan(opts.roi_subset, opts.fast)]
            subs = await self.svc.availability(plan)
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

    async def run(self, site_name: str, data: bytes, filename: str, roi_subset: list[str] | None,
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
            site = self.site(site_name)
            self.svc.tenancy.check_access(site, input_uri, "read")
            self.svc.tenancy.check_access(site, output_prefix, "write")
            bad = [o for o in outputs if o not in EVENT_OUTPUTS]
            if bad:
                raise MrisegError(f"event jobs in the cluster make {list(EVENT_OUTPUTS)}, not {bad}")
            check_upload_name(filename)
            if len(data) > self.svc.settings.max_upload_bytes:
                limit = self.svc.settings.max_upload_bytes
                raise VolumeTooLargeError(f"the input has {len(data)} bytes, over the {limit}"
                                          f"-byte limit (router.max_upload_bytes)")
            job = self.svc.submit(site, JobOptions(list(roi_subset) if roi_subset else None, bool(fast), tuple(outputs),
                                               resampling_order=resampling_order),
                              upload=data, filename=filename, source="event")
        except MrisegError as e:
            return {"error": error_dict(e)}
        del data
        try:
            await self.svc.wait(job)
        except asyncio.CancelledError:
            # nobody waits for its outputs any more: free the site's slot for its next job
            if not job.done:
                with contextlib.suppress(MrisegError):
                    self.svc.cancel(site, job.id)
            raise
        return await asyncio.to_thread(event_reply, job)

    def site_limits(self) -> dict[str, int]:
        """Each site's ``max_concurrent_jobs``, as the tenants file has it now (the intake's per-site limits).

        Returns:
            Site name -> its job limit.
        """
        self.svc.tenancy.refresh()
        return {name: site.max_concurrent_jobs for name, site in self.svc.tenancy.sites.items()}
