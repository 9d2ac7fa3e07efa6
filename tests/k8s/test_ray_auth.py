"""Ray token auth in the manifests, checked against Ray itself.

Every RayService turns it on. A Ray head started the way the operator starts
it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN from the Secret) still answers what
the pods' probes and Prometheus reach without the token, and refuses the
dashboard API, through which anyone could otherwise submit code. The Serve
proxy's ``/-/healthz`` (the worker readiness probe) is Serve's own HTTP port,
which Ray's auth does not cover, so it is not checked here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from tests.helpers.stack import free_port
from tests.k8s.rendered import pod_specs, rayservices

RAYSERVICES = rayservices()
PROBE_URL = re.compile(r"http://localhost:(\d+)(/\S*)")
# containerPort in the manifests -> the name of the port the local head is started with
PINNED = {"8265": "dashboard", "52365": "agent", "8080": "metrics"}

HEAD = r"""
import json, os, sys, time, urllib.error, urllib.request
from ray._common.utils import get_default_ray_temp_dir
from ray.cluster_utils import Cluster

ports, urls, temp_dir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "num_gpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
    "dashboard_port": ports["dashboard"], "dashboard_agent_listen_port": ports["agent"],
    "metrics_export_port": ports["metrics"], "temp_dir": temp_dir})

def get(url, token=None):
    headers = {"Authorization": "Bearer " + token} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, r.read(200).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError as e:
        return None, type(e).__name__

try:
    deadline = time.time() + 90
    while time.time() < deadline and any(get(u)[0] is None for u in urls.values()):
        time.sleep(1)  # the dashboard and its agent come up after the GCS
    dash = "http://127.0.0.1:%d" % ports["dashboard"]
    out = {"probes": {k: get(u) for k, u in urls.items()},
           "api_without_token": get(dash + "/api/version")[0],
           "api_with_token": get(dash + "/api/version", os.environ["RAY_AUTH_TOKEN"])[0]}
    print("RESULT " + json.dumps(out))
finally:
    cluster.shutdown()
"""


def test_every_rayservice_turns_ray_token_auth_on():
    assert RAYSERVICES
    for overlay, doc in RAYSERVICES:
        assert doc["spec"]["rayClusterConfig"].get("authOptions") == {"mode": "token"}, overlay


def _probe_urls() -> dict[str, tuple[str, str]]:
    """Every probe URL of every Ray container: text of the URL -> (manifest port, path), the Serve port left out."""
    urls = {}
    for _, doc in RAYSERVICES:
        serve_port = str(doc["spec"]["serveService"]["spec"]["ports"][0]["port"])
        for _, pod in pod_specs(doc):
            for c in pod["containers"]:
                for probe in (c.get("livenessProbe"), c.get("readinessProbe")):
                    for port, path in PROBE_URL.findall(" ".join((probe or {}).get("exec", {}).get("command", []))):
                        if port != serve_port:
                            urls[f"http://localhost:{port}{path}"] = (port, path)
    return urls


def test_probe_and_metrics_endpoints_answer_under_token_auth_and_the_dashboard_api_does_not():
    urls = _probe_urls()
    assert any(p == "8265" for p, _ in urls.values()) and any(p == "52365" for p, _ in urls.values())
    unmapped = sorted({p for p, _ in urls.values()} - set(PINNED))
    assert not unmapped, f"probes reach Ray ports {unmapped}: add them to PINNED so they are checked"
    ports = {name: free_port() for name in PINNED.values()}
    local = {u: f"http://127.0.0.1:{ports[PINNED[p]]}{path}" for u, (p, path) in urls.items()}
    local["prometheus /metrics"] = f"http://127.0.0.1:{ports['metrics']}/metrics"
    token = "t" * 40
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # AF_UNIX paths stay short
    try:
        proc = subprocess.run([sys.executable, "-c", HEAD, json.dumps(ports), json.dumps(local), temp_dir],
                              env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert (result["api_without_token"], result["api_with_token"]) == (401, 200), result  # auth really is on
    for url, (status, body) in result["probes"].items():
        assert status == 200, (url, status, body)
        if url != "prometheus /metrics":
            assert "success" in body, (url, body)  # what the probes grep for
    assert "# HELP" in result["probes"]["prometheus /metrics"][1]
