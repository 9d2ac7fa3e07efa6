"""Real local Ray clusters with the mriseg Serve app, for the tests that need one.

One shared stack per test session (tiny random-init nnU-Net models, one
declared GPU shared by six 0.16-GPU sub-model replicas), owned by the
fixtures of tests/conftest.py. Tests that kill things take the
``isolated_ray`` fixture, which stops the shared stack first (one driver
holds one Ray connection) and lets the next shared test restart it.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SITE_KEYS = {"site-a": "key-site-a-0123456789abcdef", "site-b": "key-site-b-0123456789abcdef",
             "site-c": "key-site-c-0123456789abcdef", "site-d": "key-site-d-0123456789abcdef"}
BUCKET = "consortium"
SUBMODELS = ("organs", "muscles", "tissue_types", "thigh_shoulder_muscles", "appendicular_bones", "face")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_models(root: Path, names=SUBMODELS, description: str = "") -> Path:
    """Random-init nnU-Net v2 folders small enough for CPU tests (patch 32^3, 3 stages); a ``description``
    with "DEMO MODEL" in it makes them demo models."""
    from serve.catalogue import load_catalogue
    from serve.inference.modelfolder import UNetSpec, write_model_folder

    cat = load_catalogue()
    spec = UNetSpec(features=(4, 8, 16), patch_size=(32, 32, 32))
    for i, n in enumerate(names):
        write_model_folder(root, cat.submodel(n), spec, seed=100 + i, description=description)
    return root


def write_tenants(path: Path, limits: dict[str, int] | None = None,
                  extra_prefixes: dict[str, list[str]] | None = None) -> Path:
    """The test sites' tenants file: each site owns ``s3://{BUCKET}/{site}/`` and its ``extra_prefixes``."""
    import yaml

    limits = {"site-a": 12, "site-b": 12, "site-c": 1, "site-d": 1, **(limits or {})}
    extra = extra_prefixes or {}
    sites = {s: {"keys": [k], "prefixes": [f"s3://{BUCKET}/{s}/", *extra.get(s, ())], "max_concurrent_jobs": limits[s]}
             for s, k in SITE_KEYS.items()}
    sites["site-d"].update(requests_per_second=0.5, burst=3)  # a tight request rate limit
    path.write_text(yaml.safe_dump({"sites": sites}))
    return path


def nifti_bytes(shape=(40, 36, 44), spacing=(1.5, 1.5, 1.5), seed: int = 0) -> bytes:
    """A gzipped NIfTI with a blob-like body, as a site would upload."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (np.sum(grid ** 2, axis=0) < 0.6).astype(np.float32) * 300
    data = (body + rng.normal(0, 20, shape)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    raw = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=raw), "header": nib.FileHolder(fileobj=raw)})
    return gzip.compress(raw.getvalue(), compresslevel=1)


def auth(site: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SITE_KEYS[site]}"}


@dataclass
class Stack:
    """A running Ray cluster with the app deployed."""

    url: str
    tmp: Path
    model_dir: Path
    app_name: str = "mriseg"
    extra: dict = field(default_factory=dict)

    def client(self, timeout: float = 300):
        import httpx

        return httpx.Client(base_url=self.url, timeout=timeout)


#: The test stacks' router memory budget and decoder zip budget (serve.router.admission, serve.imaging.sandbox).
ROUTER_MEMORY_BUDGET = 512 << 20
SANDBOX_EXTRACT_BYTES = 64 << 20


def start_stack(tmp: Path, model_dir: Path, *, num_gpus: float, submodel_options: dict,
                router: dict | None = None, per_model: dict | None = None, tenant_limits=None,
                submodels=SUBMODELS, s3: dict | None = None, events: dict | None = None,
                worker_nodes: list[dict] | None = None, tenant_prefixes: dict[str, list[str]] | None = None,
                router_options: dict | None = None, ready_timeout: float = 240) -> Stack:
    """Start Ray and the app with :func:`serve.cluster.up.start_cluster` (``mriseg up``'s starter).
    ``worker_nodes`` (e.g. ``[{"num_cpus": 1, "num_gpus": 1}]``) makes it a multi-node
    ``ray.cluster_utils.Cluster`` whose head has no GPU, so GPU replicas land on the workers.
    ``router_options`` are more Serve deployment options of the Router (e.g. ``health_check_period_s``)."""
    from serve.cluster.up import start_cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}}
    cluster, ray_tmp = None, None
    if worker_nodes is not None:
        from ray._common.utils import get_default_ray_temp_dir
        from ray.cluster_utils import Cluster

        # Cluster records the head's address in Ray's default temp dir whatever temp_dir says,
        # and fails where no earlier Ray run has created that folder
        os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
        ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 6, "num_gpus": 0, "include_dashboard": False, "temp_dir": ray_tmp})
    args = {
        "model_sources": [str(model_dir)],
        "submodels": list(submodels),
        "submodel_settings": {"threads": 1, "device": "cpu"},
        "tenants_file": str(write_tenants(tmp / "tenants.yaml", tenant_limits, tenant_prefixes)),
        "router": {"results_dir": str(tmp / "results"), "slots": 2, "max_upload_bytes": 2 << 20,
                   "memory_budget_bytes": ROUTER_MEMORY_BUDGET, **(router or {})},
        # every layer required, as in the k8s overlays; a small zip budget that tests can exceed cheaply
        "sandbox": {"scratch_dir": str(tmp / "scratch"), "extract_bytes": SANDBOX_EXTRACT_BYTES,
                    "require": ["rlimits", "no_new_privs", "seccomp", "landlock"]},
        **({"s3": s3} if s3 else {}),
        # the intake hands its jobs to the Router by Ray handle, naming each job's site
        **({"events": dict(events)} if events is not None else {}),
        "deployment_options": {"submodel_defaults": submodel_options, **(per_model or {}),
                               "Router": {"ray_actor_options": {"num_cpus": 1}, **(router_options or {})}},
    }
    try:
        if cluster is not None:
            for node in worker_nodes:
                cluster.add_node(**node)
        # One HTTP proxy, on the head: simulated nodes share this machine's ports.
        handle = start_cluster(args, port=free_port(), num_cpus=8, num_gpus=num_gpus, runtime_env=runtime_env,
                               address=cluster.address if cluster is not None else None,
                               proxy_location="HeadOnly", ray_tmp_prefix="r", ready_timeout=ready_timeout)
    except BaseException:  # start_cluster stopped its own part; the simulated nodes are ours
        if cluster is not None:
            cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
        raise
    return Stack(handle.url, tmp, model_dir,
                 extra={"args": args, "ray_tmp": handle.ray_tmp or ray_tmp, "cluster": cluster, "handle": handle})


#: How long Ray's metrics agent takes to export a series a replica recorded: the workers report every
#: ``metrics_report_interval_ms`` (10 s by default; measured 10-11 s on a 2-core machine), so a few intervals.
METRICS_EXPORT_TIMEOUT_S = 60.0


def wait_for_series(url: str, wanted: list[tuple[str, dict[str, str]]],
                    timeout: float = METRICS_EXPORT_TIMEOUT_S) -> list:
    """Read the Prometheus text at ``url`` (a Ray metrics agent) until every wanted sample is there.

    Args:
        url: the node's metrics export URL (:attr:`serve.cluster.up.ClusterHandle.metrics_url`).
        wanted: (sample name, labels it must carry) pairs; Ray adds labels of its own (WorkerId, ...).
        timeout: seconds to wait before failing with what is missing.

    Returns:
        The samples of the last read (prometheus_client ``Sample`` tuples).
    """
    import time

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    deadline, missing, samples = time.monotonic() + timeout, list(wanted), []
    while True:
        try:
            text = httpx.get(url, timeout=10).text
            samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        except httpx.HTTPError:
            samples = []
        missing = [(n, want) for n, want in wanted
                   if not any(s.name == n and want.items() <= s.labels.items() for s in samples)]
        if not missing:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"Ray's metrics export at {url} lacks {missing} after {timeout:.0f}s")
        time.sleep(0.5)


def stop_stack(stack: Stack | None) -> None:
    """Stop Serve and Ray (also with no stack: whatever this process runs), and a multi-node stack's nodes."""
    from serve.cluster.up import stop_cluster

    try:
        stop_cluster(stack.extra.get("handle") if stack is not None else None)
    finally:
        if stack is not None:
            if stack.extra.get("cluster") is not None:
                stack.extra["cluster"].shutdown()
            shutil.rmtree(stack.extra.get("ray_tmp", ""), ignore_errors=True)


class _Shared:
    stack: Stack | None = None
    tmp: Path | None = None
    s3 = None  # serve.storage.embedded_s3.SeaweedServer

    def ensure(self) -> Stack:
        if self.stack is None:
            from serve.storage.embedded_s3 import SeaweedServer

            self.tmp = Path(tempfile.mkdtemp(prefix="mriseg-stack-"))
            models = tiny_models(self.tmp / "models")
            self.s3 = SeaweedServer(self.tmp / "weed", buckets=[BUCKET]).start()
            # One declared GPU packed with six 0.16-GPU replicas: the one-gpu.yaml layout.
            self.stack = start_stack(self.tmp, models, num_gpus=1,
                                     submodel_options={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.16},
                                                       "max_ongoing_requests": 4,
                                                       "user_config": {"gpu_memory_fraction": 0.16}},
                                     s3=self.s3.settings.model_dump())
            self.stack.extra["s3"] = self.s3.settings
        return self.stack

    def stop(self) -> None:
        if self.stack is not None:
            stop_stack(self.stack)
            self.stack = None
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


#: The session's shared stack (the ``serve_stack`` fixture of tests/conftest.py).
SHARED_STACK = _Shared()


def poll(client, site, job_id, timeout=300):
    """Follow a job until it settles (the loop bound is a safety net, not an assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/segmentations/{job_id}", headers=auth(site)).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not settle")


def settle_through_restarts(c, site: str, job_id: str, timeout: float = 300) -> dict:
    """Poll a job while the router may be restarting (connection errors and 503s are expected then)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = c.get(f"/v1/segmentations/{job_id}", headers=auth(site))
            if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                return r.json()
            assert r.status_code in (200, 500, 502, 503), r.text  # never a 404: the job was not forgotten
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not settle within {timeout}s")
