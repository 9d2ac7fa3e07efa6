"""What tests/security/ does with the running ``mriseg up --sites a,b`` (the fixture is in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serve.storage import staging
from serve.jobs.spec import case_name
from tests.helpers.stack import nifti_bytes

BUCKET = "mriseg"
LEASE_S = 16  # the intake sweeps its held pushes every 8 s


@dataclass
class UpStack:
    """A running ``mriseg up --sites a,b``: what its user holds, and what only its server holds."""

    stack: "object"             # serve.cluster.up.LocalStack, from the state file
    state_file: Path
    log: Path
    home: Path
    tmp: Path
    weed_ports: dict[str, int] = field(default_factory=dict)   # the embedded S3's port flags -> ports
    server_s3: dict = field(default_factory=dict)              # the server identity (no site holds it)

    def site(self, name: str):
        return next(s for s in self.stack.sites if s.name == name)

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def weed_dir(self) -> Path:
        return Path(self.stack.work_dir) / "s3"


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the stack's whole process group, as a user would; SIGKILL after a minute."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _weed_ports(pid: int) -> dict[str, int]:
    """The ``-<flag>=<port>`` arguments of the running weed (every port it opens is set explicitly)."""
    from serve.storage.embedded_s3 import SEAWEED_PORT_FLAGS

    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    ports = {}
    for a in args:
        flag, _, value = a.lstrip("-").partition("=")
        if flag in SEAWEED_PORT_FLAGS:
            ports[flag] = int(value)
    return ports


def push(up: UpStack, name: str, key: str, etag: str) -> httpx.Response:
    """``POST /v1/events`` as site ``name`` for ``s3://mriseg/{key}``."""
    body = {"Records": [{"eventName": "ObjectCreated:Put", "eventSource": "aws:s3",
                         "s3": {"bucket": {"name": BUCKET}, "object": {"key": key, "eTag": etag}}}]}
    return httpx.post(f"{up.url}/v1/events", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {up.site(name).api_key}"})


def job_json_uri(up: UpStack, name: str, key: str) -> str:
    """Where the job.json of a pushed ``key`` of site ``name``'s inbox lands."""
    return f"{up.site(name).outbox}{name}/{case_name(key, f'{name}/inbox/')}/job.json"


def wait_job_json(uri: str, settings, timeout: float = 240, etag: str | None = None) -> dict:
    """The settled job.json at ``uri`` (of the input version ``etag``, if given)."""
    deadline = time.monotonic() + timeout
    doc = None
    while time.monotonic() < deadline:
        if staging.object_exists(uri, settings):
            doc = json.loads(staging.download_bytes(uri, settings=settings))
            if doc.get("status") in ("succeeded", "failed") and \
                    (etag is None or (doc.get("input") or {}).get("etag", "").strip('"') == etag.strip('"')):
                return doc
        time.sleep(0.5)
    raise AssertionError(f"no settled job.json at {uri} after {timeout:.0f}s (last: {doc})")


def upload(up: UpStack, name: str, key: str, data: bytes) -> str:
    """Put ``data`` at ``s3://mriseg/{key}`` with site ``name``'s own S3 keys; its ETag."""
    uri = f"s3://{BUCKET}/{key}"
    staging.put_bytes(data, uri, up.site(name).s3)
    return staging.object_exists(uri, up.site(name).s3)["ETag"].strip('"')


_RUNS = iter(range(10**6))


def site_b_job_succeeds(up: UpStack) -> dict:
    """Site b uploads a small volume to its inbox and pushes it; its job.json says done."""
    n = next(_RUNS)
    key = f"b/inbox/after-{n}.nii.gz"
    etag = upload(up, "b", key, nifti_bytes(shape=(24, 20, 22), seed=n))
    r = push(up, "b", key, etag)
    assert r.status_code == 202, r.text
    doc = wait_job_json(job_json_uri(up, "b", key), up.site("b").s3, etag=etag)
    assert doc["status"] == "succeeded" and doc["site"] == "b", doc
    return doc
