"""Soak: mixed Locust load for a long time while the RSS of every cluster process is sampled.

    python -m loadtest.soak --minutes 30          # local cluster, demo models, embedded S3

starts a local Ray Serve cluster with the committed demo models and an embedded
SeaweedFS holding a few volumes, drives it with ``loadtest/locustfile.py``
(interactive uploads and S3 bulk jobs from two sites, varied ``roi_subset``),
samples every process's RSS, and writes ``loadtest/results/soak-<label>.{json,md}``.

A process "grows" when, after the warm-up (the first quarter), its RSS rises
by more than ``max(32 MB, 5 %)`` from the second quarter's median to the last
quarter's and its least-squares slope over that span is above 1 MB/min.
The CI smoke test (``tests/loadtest/test_smoke.py``) runs :func:`soak` for
under a minute and asserts an RSS bound per process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
MB = 2 ** 20


def role(pid: int) -> str:
    """A readable name for a Ray process: ``replica organs``, ``router``, ``raylet``, ..."""
    import psutil

    try:
        p = psutil.Process(pid)
        cmd = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "gone"
    if "ServeReplica:" in cmd:
        # the title is ray::ServeReplica:<app>:<deployment>, with ".<method>" while a call runs
        name = cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
        return "router" if name == "Router" else f"replica {name}"
    for marker, label in (("ServeController", "serve controller"), ("ProxyActor", "http proxy"),
                          ("raylet", "raylet"), ("gcs_server", "gcs"), ("dashboard", "dashboard"),
                          ("log_monitor", "log monitor"), ("monitor.py", "autoscaler monitor"),
                          ("runtime_env", "runtime env agent"), ("ray::IDLE", "idle worker"), ("weed", "seaweedfs")):
        if marker in cmd:
            return label
    return p.name()


class RssRecorder:
    """Samples the RSS of every process ``pids_fn`` returns, every ``interval_s``, in a thread."""

    def __init__(self, pids_fn: Callable[[], list[int]], interval_s: float = 5.0):
        self.pids_fn, self.interval_s = pids_fn, interval_s
        self.series: dict[int, dict] = {}
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        t = round(time.monotonic() - self.t0, 2)
        for pid in self.pids_fn():
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            s = self.series.setdefault(pid, {"role": role(pid), "t": [], "rss_mb": []})
            s["t"].append(t)
            s["rss_mb"].append(round(rss / MB, 1))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "RssRecorder":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def trend(t: list[float], rss: list[float]) -> dict:
    """Growth of one process after the warm-up quarter: quarter medians and least-squares slope."""
    n = len(rss)
    out = {"samples": n, "start_mb": rss[0], "end_mb": rss[-1], "peak_mb": max(rss)}
    if n < 8:
        return {**out, "growth_mb": None, "slope_mb_per_min": None, "grows": None}
    q = n // 4
    early, late = statistics.median(rss[q:2 * q]), statistics.median(rss[3 * q:])
    ts, ys = t[q:], rss[q:]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((x - mt) ** 2 for x in ts) or 1.0
    slope = sum((x - mt) * (y - my) for x, y in zip(ts, ys)) / var * 60
    growth = late - early
    grows = growth > max(32.0, 0.05 * early) and slope > 1.0
    return {**out, "growth_mb": round(growth, 1), "slope_mb_per_min": round(slope, 2), "grows": grows}


def run_locust(url: str, keys: dict[str, str], seconds: int, users: int, csv_prefix: Path,
               uploads: list[Path], s3_inputs: dict[str, list[str]] | None = None) -> dict:
    """Headless Locust with loadtest/locustfile.py; returns the aggregated row of its stats CSV."""
    env = {**os.environ, "MRISEG_LT_KEYS": ",".join(f"{s}={k}" for s, k in keys.items()),
           "MRISEG_LT_UPLOAD": ",".join(str(p) for p in uploads)}
    if s3_inputs:
        env["MRISEG_LT_S3_INPUTS"] = ",".join(f"{s}={u}" for s, us in s3_inputs.items() for u in us)
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "120", "--host", url,
           "--csv", str(csv_prefix), "--only-summary", "--skip-log-setup"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 300)
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    agg = rows["Aggregated"]
    failures = Path(f"{csv_prefix}_failures.csv")
    return {"returncode": proc.returncode, "requests": int(agg["Request Count"]),
            "failures": int(agg["Failure Count"]), "p50_ms": agg["50%"], "p95_ms": agg["95%"],
            "p99_ms": agg["99%"], "requests_per_s": agg["Requests/s"],
            "by_name": {n: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                            "p50_ms": r["50%"], "p95_ms": r["95%"]} for n, r in rows.items() if n != "Aggregated"},
            "failure_log": failures.read_text()[-4000:] if failures.exists() else "",
            "stderr_tail": proc.stderr[-2000:]}


def put_s3_inputs(client, bucket: str, body: bytes, sites: tuple[str, ...] = ("site-a", "site-b")) -> dict[str, list[str]]:
    """Put ``body`` under each site's ``soak/`` prefix; the bulk inputs :func:`run_locust` takes."""
    inputs = {}
    for site in sites:
        key = f"{site}/soak/volume.nii.gz"
        client.put_object(Bucket=bucket, Key=key, Body=body)
        inputs[site] = [f"s3://{bucket}/{key}"]
    return inputs


def soak(url: str, keys: dict[str, str], pids_fn: Callable[[], list[int]], seconds: int, uploads: list[Path],
         workdir: Path, users: int = 4, interval_s: float = 5.0, s3_inputs: dict[str, list[str]] | None = None) -> dict:
    """Load for ``seconds`` while sampling RSS; per-process series, trends and the Locust summary."""
    with RssRecorder(pids_fn, interval_s) as rec:
        load = run_locust(url, keys, seconds, users, workdir / "soak", uploads, s3_inputs)
    processes = []
    for pid, s in sorted(rec.series.items(), key=lambda kv: kv[1]["role"]):
        processes.append({"pid": pid, "role": s["role"], **trend(s["t"], s["rss_mb"]),
                          "t": s["t"], "rss_mb": s["rss_mb"]})
    totals = {}
    for p in processes:
        for t, v in zip(p["t"], p["rss_mb"]):
            totals[t] = totals.get(t, 0.0) + v
    return {"seconds": seconds, "users": users, "interval_s": interval_s, "load": load,
            "processes": processes, "peak_total_mb": round(max(totals.values()), 1) if totals else None,
            "growing": [p["role"] for p in processes if p["grows"]]}


def markdown(res: dict, label: str) -> str:
    load = res["load"]
    lines = [f"# Soak: {label}", "",
             f"{res['seconds'] / 60:.0f} min of mixed load ({res['users']} Locust users: interactive uploads "
             f"and S3 bulk jobs, two sites, varied roi_subset); RSS sampled every {res['interval_s']:g} s.", "",
             f"Requests: {load['requests']}, failures: {load['failures']}, p50 {load['p50_ms']} ms, "
             f"p95 {load['p95_ms']} ms, {float(load['requests_per_s']):.2f} req/s. "
             f"Peak total RSS {res['peak_total_mb']} MB.", "",
             "| process | samples | start MB | end MB | peak MB | growth MB (q2->q4 median) | slope MB/min | grows |",
             "|---|---|---|---|---|---|---|---|"]
    for p in res["processes"]:
        lines.append(f"| {p['role']} | {p['samples']} | {p['start_mb']} | {p['end_mb']} | {p['peak_mb']} | "
                     f"{p['growth_mb']} | {p['slope_mb_per_min']} | {p['grows']} |")
    lines += ["", "Growing processes: " + (", ".join(res["growing"]) or "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--label", default="cpu-2core")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import tempfile

    from loadtest import localcluster
    from loadtest.inputs import TINY, write_volume
    from serve.catalogue import load_catalogue
    from serve.demo import ensure_demo_models
    from serve.storage.embedded_s3 import SeaweedServer

    work = Path(tempfile.mkdtemp(prefix="mriseg-soak-"))
    uploads = [write_volume(TINY, work / f"up{i}.nii.gz", seed=i) for i in range(2)]
    s3 = SeaweedServer(work / "weed", buckets=[localcluster.BUCKET]).start()
    cluster = None
    try:
        s3_inputs = put_s3_inputs(s3.client(), localcluster.BUCKET, uploads[0].read_bytes())
        cluster = localcluster.start(ensure_demo_models(), submodels=[sm.name for sm in load_catalogue().submodels],
                                     threads=1, slots=2, s3=s3.settings.model_dump())
        keys = {s: k for s, k in localcluster.SITE_KEYS.items() if s in s3_inputs}
        res = soak(cluster.url, keys, localcluster.cluster_pids, int(args.minutes * 60), uploads, work,
                   users=args.users, interval_s=args.interval, s3_inputs=s3_inputs)
    finally:
        localcluster.stop(cluster)
        s3.stop()
        s3.cleanup()
    res["label"] = args.label
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"soak-{args.label}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"soak-{args.label}.md").write_text(markdown(res, args.label))
    print(markdown(res, args.label))
    return 0 if res["load"]["failures"] == 0 and not res["growing"] else 1


if __name__ == "__main__":
    sys.exit(main())
