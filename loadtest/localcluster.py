"""A local Ray Serve deployment of the mriseg app for the benchmark, the soak and the flood.

Same application builder as ``deployments/local.yaml`` (``serve.cluster.app:build_app``),
started by the same starter as ``mriseg up`` (:func:`serve.cluster.up.start_cluster`),
on loopback, with the given model folder, one replica per sub-model.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SITE_KEYS = {"site-a": "lt-key-site-a-0123456789abcdef", "site-b": "lt-key-site-b-0123456789abcdef",
             "site-c": "lt-key-site-c-0123456789abcdef"}
BUCKET = "consortium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    url: str
    workdir: Path
    ray_tmp: str
    session_dir: str = ""
    extra: dict = field(default_factory=dict)

    def headers(self, site: str = "site-a") -> dict[str, str]:
        return {"Authorization": f"Bearer {SITE_KEYS[site]}"}


def write_tenants(path: Path, max_concurrent_jobs: int = 64) -> Path:
    import yaml

    sites = {s: {"keys": [k], "prefixes": [f"s3://{BUCKET}/{s}/"], "max_concurrent_jobs": max_concurrent_jobs}
             for s, k in SITE_KEYS.items()}
    path.write_text(yaml.safe_dump({"sites": sites}))
    return path


def start(model_dir: str | Path, *, submodels: list[str], precision: str = "fp32", device: str = "cpu",
          threads: int = 1, num_cpus: int | None = None, num_gpus: float = 0, gpu_fraction: float | None = None,
          slots: int = 4, s3: dict | None = None, max_upload_bytes: int = 512 << 20,
          ready_timeout: float = 600) -> LocalCluster:
    """Start Ray + Serve on loopback and deploy the app with :func:`serve.cluster.up.start_cluster`
    (``mriseg up``'s starter); returns when ``/readyz`` says ready."""
    from serve.cluster.up import start_cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    workdir = Path(tempfile.mkdtemp(prefix="mriseg-lt-"))
    actor = {"num_cpus": 1}
    if num_gpus:
        actor["num_gpus"] = gpu_fraction or 1
    settings = {"threads": threads, "device": device, "precision": precision}
    if gpu_fraction:
        settings["gpu_memory_fraction"] = gpu_fraction
    args = {
        "model_sources": [str(model_dir)],
        "submodels": list(submodels),
        "submodel_settings": settings,
        "tenants_file": str(write_tenants(workdir / "tenants.yaml")),
        "router": {"results_dir": str(workdir / "results"), "slots": slots, "max_upload_bytes": max_upload_bytes},
        "deployment_options": {"submodel_defaults": {"ray_actor_options": actor, "max_ongoing_requests": 16},
                               "Router": {"ray_actor_options": {"num_cpus": 1}}},
    }
    if s3:
        args["s3"] = s3
    try:
        # Ray's CPUs are scheduling tokens: one per sub-model replica plus the router,
        # while torch threads (``threads`` per replica) decide what the cores do.
        handle = start_cluster(args, port=free_port(), num_cpus=num_cpus or len(submodels) + 2, num_gpus=num_gpus,
                               runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads),
                                                         "nnUNet_def_n_proc": str(threads)}},
                               ray_tmp_prefix="rlt", ready_timeout=ready_timeout)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return LocalCluster(handle.url, workdir, handle.ray_tmp or "", handle.session_dir,
                        {"args": args, "handle": handle})


def stop(cluster: LocalCluster | None) -> None:
    """Stop Serve and Ray (also with no cluster: whatever this process runs) and remove the cluster's files."""
    from serve.cluster.up import stop_cluster

    try:
        stop_cluster(cluster.extra.get("handle") if cluster is not None else None)
    finally:
        if cluster is not None:
            shutil.rmtree(cluster.workdir, ignore_errors=True)
            shutil.rmtree(cluster.ray_tmp, ignore_errors=True)


def cluster_pids() -> list[int]:
    """This driver's Ray processes (raylet, GCS, Serve controller, proxy, replicas)."""
    import psutil

    me = psutil.Process()
    out = set()
    # Ray workers are children of the raylet, which is a child of this driver
    # (ray.init starts a fresh local cluster).
    for child in me.children(recursive=True):
        out.add(child.pid)
    return sorted(out)
