"""A :class:`serve.jobs.Engine` that segments through the cluster's HTTP API.

``serve.jobs.JobRunner`` stages the input in, asks the engine for the
outputs, and publishes them; with this engine the event consumer's jobs
run on the Ray Serve cluster instead of in its own process. Each
site's jobs go out with that site's API key, so tenancy limits and fair
scheduling apply to them as to interactive requests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from serve.catalogue import load_catalogue
from serve.cluster.client import ApiClient
from serve.errors import ModelUnavailableError, MrisegError, ServiceUnavailableError

#: writer file name for each API output file (serve.outputs.writers' names, which staging maps to the S3 layout)
FILES = {"statistics": "statistics.json", "preview": "preview.png"}


class ClusterEngine:
    """Segments through ``url`` with the API key of each job's site."""

    def __init__(self, url: str, site_keys: Mapping[str, str], timeout_s: float = 1800):
        self.url = url
        self.site_keys = dict(site_keys)
        self.timeout_s = timeout_s
        self.calls = 0
        self._checksums: dict[str, str] = {}

    def _client(self, site: str) -> ApiClient:
        key = self.site_keys.get(site)
        if key is None:
            raise MrisegError(f"no API key configured for site {site!r}; add it to the consumer's site keys")
        return ApiClient(self.url, key, self.timeout_s)

    def model_checksums(self, roi_subset: Sequence[str] | None, fast: bool, site: str) -> dict[str, str]:
        """Checksums of the sub-models the cluster would run (part of the idempotency key).

        Asked with the job's own site's key: another site's rate limit or revoked key must not hold up
        or fail this site's jobs.
        """
        plan = [sm.name for sm in load_catalogue().plan(list(roi_subset) if roi_subset else None, fast)]
        client = self._client(site)
        with client._session() as c:
            r = client._check(c.get("/v1/structures", params={"probe": ",".join(plan)}))
        subs = {m["name"]: m for m in r.json()["submodels"]}
        explicit = bool(roi_subset) or fast
        out, missing = {}, []
        down = [name for name in plan if subs[name]["state"] == "unreachable"]
        if down:  # a replica restarting: skipping its model would pass off a partial result as whole
            raise ServiceUnavailableError(f"sub-model(s) {', '.join(down)} cannot be reached on the cluster "
                                          f"right now; the job is retried")
        for name in plan:
            m = subs[name]
            if m["state"] == "ready" and m.get("checksum"):
                out[name] = m["checksum"]
            elif explicit:
                missing.append(f"{name} ({m['state']})")
        if missing or not out:
            raise ModelUnavailableError("the cluster cannot run " + (", ".join(missing) or "any sub-model"))
        self._checksums.update(out)
        return out

    def segment_file(self, path: Path, spec, outdir: Path) -> dict[str, Any]:
        """Upload ``path`` with the spec's options, wait, and fetch the outputs into ``outdir``."""
        if "per_structure" in spec.outputs:
            raise MrisegError("per-structure masks are not fetched through the API; request 'multilabel' "
                              "(the label table holds every structure) or give the job an output_prefix")
        client = self._client(spec.site)
        t = time.perf_counter()
        job = client.segment_upload(Path(path).read_bytes(), Path(path).name,
                                    roi_subset=list(spec.roi_subset) if spec.roi_subset else None,
                                    fast=spec.fast, outputs=tuple(spec.outputs))
        self.calls += 1
        outdir.mkdir(parents=True, exist_ok=True)
        if "multilabel" in spec.outputs:
            client.download(job["id"], outdir / "segmentations.nii.gz")
        for kind, name in FILES.items():
            if kind in spec.outputs:
                client.download(job["id"], outdir / name, name)
        timings = {**job.get("timings", {}), "cluster_roundtrip_s": time.perf_counter() - t}
        timings.update({f"submodel_{n}_s": v["compute_s"] for n, v in job.get("submodels", {}).items()})
        return {"timings": timings, "structures": job.get("structures", {}),
                "models": {n: self._checksums.get(n) for n in job.get("submodels", {})}, "unavailable": job.get("unavailable", {}),
                "demo": bool(job.get("demo_models", False)), "cluster_job_id": job["id"]}
