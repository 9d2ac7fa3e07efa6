"""Autoscaling simulation: Serve replicas and Ray worker nodes following a load ramp, on one machine.

What runs (all real, nothing mocked):
  * a Ray head started with ``ray start --autoscaling-config`` and Ray's fake
    multi-node provider, i.e. Ray's own autoscaler adding and removing *worker
    nodes* (each a real raylet declaring 1 GPU), as KubeRay's in-tree
    autoscaler does with GPU pods;
  * the real sub-model deployment (``serve.cluster.deployments.SubModelDeployment``)
    for ``organs`` (warm: min 1) and ``face`` (cold: scales from zero), with
    the autoscaling knobs of ``deployments/six-gpu.yaml`` except that the
    delays are shortened (the file's 300/600 s would make this an hour) and
    each replica asks for 0.5 CPU so that it fits the small fake nodes;
  * the committed tiny demo models, predicting on CPU (torch) while Ray
    schedules them on declared GPUs;
  * a load ramp of concurrent callers through Serve handles: organs all the
    time, face only in the middle, then silence.

It records, once a second, the running replicas per deployment and the alive
nodes / GPUs, and writes loadtest/results/autoscale.{json,csv,png}.

Why not ``ray.cluster_utils.AutoscalingCluster``: in Ray 2.60 its
``start()`` runs ``ray stop --force`` (every Ray process on the machine, other
users' too) and its fake-provider defaults file (``example.yaml``) is not in the
wheel. This script builds the same setup with its own config (the provider
loaded as ``external``) and stops only the processes of its own session.

Run: ``python loadtest/autoscale_sim.py`` (about 4-6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
SOURCE_CONFIG = ROOT / "deployments" / "six-gpu.yaml"
SUBMODELS = ("organs", "face")
# Shortened for the simulation; the production values are in deployments/six-gpu.yaml.
SIM_DELAYS = {"upscale_delay_s": 2, "downscale_delay_s": 15}
NODE_IDLE_TIMEOUT_MIN = 0.25  # 15 s; KubeRay's idleTimeoutSeconds is 300 in production
MAX_GPU_NODES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    """Ray cluster-launcher config for the fake multi-node provider: head without GPU, 1-GPU workers."""
    return {
        "cluster_name": "mriseg-autoscale-sim",
        "max_workers": MAX_GPU_NODES,
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": NODE_IDLE_TIMEOUT_MIN,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 80 * 2**20},
                           "node_config": {}, "min_workers": 0, "max_workers": MAX_GPU_NODES},
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def submodel_options(name: str) -> dict:
    """The deployment's options from six-gpu.yaml, delays shortened, CPUs scaled to the fake nodes."""
    config = yaml.safe_load(SOURCE_CONFIG.read_text())
    (dep,) = [d for app in config["applications"] for d in app["deployments"] if d["name"] == name]
    auto = {**dep["autoscaling_config"], **SIM_DELAYS}
    auto["max_replicas"] = min(auto["max_replicas"], 3)
    return {"name": name, "autoscaling_config": auto, "max_ongoing_requests": dep.get("max_ongoing_requests", 2),
            "ray_actor_options": {"num_cpus": 0.5, "num_gpus": dep["ray_actor_options"]["num_gpus"]}}


class Session:
    """A Ray head with the autoscaler, in its own temp dir; stops only its own processes."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="asim", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.session_name = ""

    def start(self) -> None:
        cfg = Path(self.tmp) / "autoscaler.yaml"
        cfg.write_text(yaml.safe_dump(autoscaling_config(self.address)))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        subprocess.check_call(["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                               f"--temp-dir={self.tmp}", "--num-cpus=1", "--num-gpus=0",
                               "--include-dashboard=false", "--disable-usage-stats",
                               f"--autoscaling-config={cfg}"], env=env, stdout=subprocess.DEVNULL)

    def own_pids(self) -> list[int]:
        """Processes of this cluster: their command lines name our temp dir, session or GCS port."""
        import psutil

        marks = [self.tmp, self.address] + ([self.session_name] if self.session_name else [])
        me = os.getpid()
        pids = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] != me and any(m in cmd for m in marks):
                pids.append(p.info["pid"])
        return pids

    def stop(self) -> None:
        import psutil

        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.own_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def running_replicas() -> dict[str, int]:
    from ray import serve as rayserve

    out = {}
    status = rayserve.status()
    for name in SUBMODELS:
        app = status.applications.get(name)
        d = app.deployments.get(name) if app else None
        out[name] = int((d.replica_states or {}).get("RUNNING", 0)) if d else 0
    return out


def gpu_nodes() -> tuple[int, float]:
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    return sum(1 for n in alive if n["Resources"].get("GPU", 0) > 0), sum(n["Resources"].get("GPU", 0) for n in alive)


def load_phases(scale: float) -> list[tuple[str, float, dict[str, int]]]:
    """(label, seconds, concurrent callers per sub-model)."""
    return [("warm", 30 * scale, {"organs": 1, "face": 0}),
            ("ramp", 40 * scale, {"organs": 3, "face": 0}),
            ("peak", 70 * scale, {"organs": 6, "face": 3}),
            ("tail", 30 * scale, {"organs": 1, "face": 0}),
            ("quiet", 110 * scale, {"organs": 0, "face": 0})]


def run(scale: float = 1.0, out: Path = RESULTS) -> dict:
    import numpy as np
    import ray
    from ray import serve as rayserve

    from serve.catalogue import load_catalogue
    from serve.cluster.deployments import SubModelDeployment
    from serve.demo import ensure_demo_models

    session = Session()
    samples: list[dict] = []
    try:
        session.start()
        ray.init(address=session.address, logging_level="ERROR", log_to_driver=False)
        session.session_name = ray._private.worker.global_worker.node.session_name
        # proxies on the head only, as the GPU pods' readiness does not need them here and a
        # proxy actor would be the only thing left on an idle node
        rayserve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
        settings = {"model_sources": [str(ensure_demo_models())], "device": "cpu", "threads": 1,
                    "warmup_shape": [16, 16, 16]}
        cat = load_catalogue()
        handles, inputs = {}, {}
        for name in SUBMODELS:
            opts = submodel_options(name)
            app = SubModelDeployment.options(**opts).bind(name, settings)
            handles[name] = rayserve.run(app, name=name, route_prefix=None, blocking=False)
            rng = np.random.default_rng(0)
            inputs[name] = (rng.standard_normal((48, 48, 48)).astype(np.float32), cat.submodel(name).spacing_mm)

        t0 = time.monotonic()
        phase = {"label": "start", "load": {n: 0 for n in SUBMODELS}}
        stop = threading.Event()
        done = {n: 0 for n in SUBMODELS}

        def caller(name: str, index: int) -> None:
            while not stop.is_set():
                if phase["load"].get(name, 0) <= index:
                    time.sleep(0.2)
                    continue
                data, spacing = inputs[name]
                try:
                    handles[name].run.remote(data, spacing).result(timeout_s=300)
                    done[name] += 1
                except Exception as e:  # noqa: BLE001 - a failed call is recorded, the ramp goes on
                    print(f"{name}: call failed: {type(e).__name__}: {e}", file=sys.stderr)

        threads = [threading.Thread(target=caller, args=(n, i), daemon=True)
                   for n in SUBMODELS for i in range(8)]
        for t in threads:
            t.start()

        def sample() -> None:
            nodes, gpus = gpu_nodes()
            row = {"t_s": round(time.monotonic() - t0, 1), "phase": phase["label"], "gpu_nodes": nodes,
                   "gpus": gpus, **{f"replicas_{n}": c for n, c in running_replicas().items()},
                   **{f"callers_{n}": phase["load"][n] for n in SUBMODELS},
                   **{f"completed_{n}": done[n] for n in SUBMODELS}}
            samples.append(row)
            print(json.dumps(row), flush=True)

        for label, seconds, load in load_phases(scale):
            phase.update(label=label, load=load)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                sample()
                time.sleep(2)
        stop.set()
        sample()
    finally:
        try:
            import ray as _ray

            if _ray.is_initialized():
                from ray import serve as _rs

                _rs.shutdown()
                _ray.shutdown()
        finally:
            session.stop()
    return save(samples, out)


def save(samples: list[dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "what": "Serve replicas and Ray GPU worker nodes under a load ramp (fake multi-node provider, "
                "declared GPUs, demo models on CPU); delays shortened: " + json.dumps(SIM_DELAYS)
                + f", node idle timeout {NODE_IDLE_TIMEOUT_MIN * 60:.0f} s",
        "peak_replicas": {n: max(s[f"replicas_{n}"] for s in samples) for n in SUBMODELS},
        "final_replicas": {n: samples[-1][f"replicas_{n}"] for n in SUBMODELS},
        "peak_gpu_nodes": max(s["gpu_nodes"] for s in samples),
        "final_gpu_nodes": samples[-1]["gpu_nodes"],
        "samples": samples,
    }
    (out / "autoscale.json").write_text(json.dumps(summary, indent=1))
    with (out / "autoscale.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(samples[0]))
        w.writeheader()
        w.writerows(samples)
    plot(samples, out / "autoscale.png")
    return summary


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] for s in samples]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for n in SUBMODELS:
        a1.step(t, [s[f"callers_{n}"] for s in samples], where="post", linestyle=":", label=f"callers {n}")
        a1.step(t, [s[f"replicas_{n}"] for s in samples], where="post", linewidth=2, label=f"replicas {n}")
    a1.set_ylabel("count")
    a1.legend(loc="upper right", fontsize=8)
    a1.set_title("Ray Serve autoscaling (per sub-model) and Ray node autoscaling")
    a2.step(t, [s["gpu_nodes"] for s in samples], where="post", color="black", label="GPU worker nodes")
    a2.set_ylabel("nodes")
    a2.set_xlabel("seconds")
    a2.legend(loc="upper right", fontsize=8)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="stretch (>1) or shrink (<1) every load phase")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    summary = run(a.scale, a.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
