"""The embedded default: a whole mriseg-serve stack on this machine.

:func:`start_local_stack` starts a local Ray, a tenants file with one site
("local") and a fresh API key, and the Serve app from
``deployments/local.yaml`` (the same file ``serve run`` takes). It records
the URL and key in a state file readable only by the user, so
``mriseg demo`` (and :func:`find_running_stack`) can reach it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from serve.cachedir import cache_root
from serve.errors import MrisegError, ServiceUnavailableError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "deployments" / "local.yaml"
LOCAL_SITE = "local"
LOCAL_BUCKET = "mriseg"


def state_dir() -> Path:
    return cache_root() / "up"


@dataclass
class LocalStack:
    """How to reach a running local stack."""

    url: str
    api_key: str
    site: str
    pid: int
    metrics_url: str | None = None
    ray_tmp: str | None = None
    work_dir: str | None = None
    s3: dict | None = None          # embedded S3 server settings (endpoint, static keys), if started
    s3_pid: int | None = None

    def s3_curl_line(self, key: str = "in/scan.nii.gz") -> str | None:
        """Segment a volume already in the embedded S3 server (``aws s3 cp`` it there first)."""
        if not self.s3:
            return None
        body = json.dumps({"input": f"s3://{LOCAL_BUCKET}/{LOCAL_SITE}/{key}",
                           "output_prefix": f"s3://{LOCAL_BUCKET}/{LOCAL_SITE}/out/{Path(key).name.split('.')[0]}/"})
        return (f"curl -sS -H 'Authorization: Bearer {self.api_key}' -H 'Content-Type: application/json' "
                f"-d '{body}' '{self.url}/v1/segmentations?wait=true'")

    def curl_line(self, volume: str = "scan.nii.gz") -> str:
        return (f"curl -sS -H 'Authorization: Bearer {self.api_key}' -H 'Content-Type: application/octet-stream' "
                f"--data-binary @{shlex.quote(volume)} '{self.url}/v1/segmentations/upload?wait=true"
                f"&filename={shlex.quote(Path(volume).name)}'")


def load_serve_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(application entry, http_options) of a one-application Serve config file."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    ServeDeploySchema.parse_obj(raw)  # Ray's own check, as `serve run` does
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise MrisegError(f"{path}: expected exactly one application, found {len(apps)}")
    return apps[0], dict(raw.get("http_options") or {})


def app_args_from_config(app_cfg: dict[str, Any]) -> dict[str, Any]:
    """The app's args with the file's per-deployment settings folded into ``deployment_options``."""
    args = dict(app_cfg.get("args") or {})
    opts = dict(args.get("deployment_options") or {})
    for d in app_cfg.get("deployments") or []:
        d = dict(d)
        opts[d.pop("name")] = d
    args["deployment_options"] = opts
    return args


def write_tenants(path: Path, api_key: str) -> Path:
    """A tenants file holding only the key's digest."""
    doc = {"sites": {LOCAL_SITE: {"key_sha256": [hashlib.sha256(api_key.encode()).hexdigest()],
                                  "prefixes": [f"s3://{LOCAL_BUCKET}/{LOCAL_SITE}/"],
                                  "max_concurrent_jobs": 8}}}
    path.write_text(yaml.safe_dump(doc))
    return path


def local_events(work: Path, api_key: str) -> dict[str, Any]:
    """Event intake for the embedded default: volumes pushed for ``s3://{bucket}/{site}/inbox/``
    are segmented into ``s3://{bucket}/{site}/outbox/{site}/{case}/``."""
    keys = work / "event-site-keys.json"
    fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({LOCAL_SITE: api_key}, f)
    return {"jobs": f"s3://{LOCAL_BUCKET}/{LOCAL_SITE}/_jobs/", "site_keys_file": str(keys),
            "rules": [{"bucket": LOCAL_BUCKET, "prefix": f"{LOCAL_SITE}/inbox/", "site": LOCAL_SITE,
                       "output_root": f"s3://{LOCAL_BUCKET}/{LOCAL_SITE}/outbox"}]}


def _save_state(stack: LocalStack) -> Path:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    p = d / "stack.json"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(stack), f)
    return p


def _healthy(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(url + "/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def find_running_stack() -> LocalStack | None:
    """The stack ``mriseg up`` started, if it still answers; a dead one's state (keys included) is removed."""
    p = state_dir() / "stack.json"
    if not p.is_file():
        return None
    try:
        stack = LocalStack(**json.loads(p.read_text()))
    except (ValueError, TypeError):
        p.unlink(missing_ok=True)
        return None
    if _healthy(stack.url):
        return stack
    _kill_stale_s3(stack.s3_pid)
    p.unlink(missing_ok=True)
    return None


def _kill_stale_s3(pid: int | None) -> None:
    """The embedded S3 server a dead ``mriseg up`` left behind, if that pid still is one."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return
    if Path(cmdline.decode(errors="replace")).name == "weed":
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def wait_ready(url: str, timeout: float = 600) -> None:
    import httpx

    deadline, detail = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=10)
            if r.status_code == 200:
                return
            detail = r.json().get("detail", r.text)
        except (httpx.HTTPError, ValueError) as e:
            detail = type(e).__name__
        time.sleep(1)
    raise ServiceUnavailableError(f"the stack at {url} did not become ready in {timeout:.0f}s: {detail}")


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise MrisegError(f"cannot listen on {host}:{port} ({e.strerror}); is another stack running? "
                              f"Pass --port to use another port") from e


def start_local_stack(config: str | os.PathLike = DEFAULT_CONFIG, *, port: int | None = None,
                      models: list[str] | None = None, num_cpus: int | None = None,
                      save_state: bool = True, embedded_s3: bool = True) -> LocalStack:
    """Start the embedded S3 server, Ray and the app of ``config``; returns once ``/readyz`` is 200."""
    import ray
    from ray import serve as rayserve

    from serve.cluster.app import build_app

    app_cfg, http = load_serve_config(config)
    args = app_args_from_config(app_cfg)
    host = http.get("host", "127.0.0.1")
    port = int(port or http.get("port", 8000))
    _check_port_free(host, port)
    work = Path(tempfile.mkdtemp(prefix="mriseg-up-"))
    s3_server, ray_tmp = None, None
    try:  # from here on a failure removes what was made, keys included
        api_key = "mrs_" + secrets.token_urlsafe(24)
        args["tenants_file"] = str(write_tenants(work / "tenants.yaml", api_key))
        args.setdefault("router", {})["results_dir"] = str(work / "results")
        if models:
            args["model_sources"] = list(models)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # RAY_AUTH_MODE stays as the caller set it. Unset, Ray (2.59+) gives a local cluster a token
        # (~/.ray/auth_token): its gRPC servers listen on every interface whatever the node address.
        if embedded_s3:
            from dataclasses import asdict as _asdict

            from serve.embedded_s3 import SeaweedServer

            s3_server = SeaweedServer(work / "s3", buckets=[LOCAL_BUCKET]).start()
            args["s3"] = _asdict(s3_server.settings)
            if args.get("events") is not None:  # pushed events for the local site's inbox (no SQS here)
                args["events"] = {**args["events"], **local_events(work, api_key)}
        if args.get("events") is not None:
            args["events"] = {**args["events"], "api_url": f"http://127.0.0.1:{port}"}
        ray_tmp = tempfile.mkdtemp(prefix="mr", dir="/tmp")
        ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=0, include_dashboard=False, _temp_dir=ray_tmp,
                 log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        keep_ray_token_private()
        rayserve.start(http_options={"host": host, "port": port})
        rayserve.run(build_app(args), name=app_cfg.get("name", "mriseg"),
                     route_prefix=app_cfg.get("route_prefix", "/"), blocking=False)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        wait_ready(url)
    except BaseException:
        if s3_server is not None:
            s3_server.stop()
        _shutdown(ray_tmp, str(work))
        raise
    metrics_port = args.get("metrics_port")
    stack = LocalStack(url, api_key, LOCAL_SITE, os.getpid(),
                       f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None, ray_tmp, str(work),
                       args.get("s3"), s3_server.proc.pid if s3_server is not None else None)
    _S3_SERVERS[stack.pid] = s3_server
    if save_state:
        _save_state(stack)
    return stack


def keep_ray_token_private(path: Path | None = None) -> bool:
    """Make Ray's generated token (``~/.ray/auth_token``) readable by its owner only; True if it was changed.

    Ray writes it with the process umask, usually world-readable, and whoever
    reads it can run code on this cluster. A token file the user named with
    ``RAY_AUTH_TOKEN_PATH``, or one owned by someone else, is left as it is.
    """
    path = path or Path.home() / ".ray" / "auth_token"
    try:
        st = path.stat()
        if not (st.st_mode & 0o077) or st.st_uid != os.getuid():
            return False
        path.chmod(0o600)
        return True
    except FileNotFoundError:  # RAY_AUTH_MODE=disabled, or a token given another way
        return False
    except OSError as e:
        log.warning("could not make %s private (%s); run: chmod 600 %s", path, e.strerror, path)
        return False


def _shutdown(ray_tmp: str | None, work: str | None) -> None:
    import ray
    from ray import serve as rayserve

    try:
        if ray.is_initialized():
            rayserve.shutdown()
    finally:
        ray.shutdown()
        for d in (ray_tmp, work):
            if d:
                shutil.rmtree(d, ignore_errors=True)


_S3_SERVERS: dict[int, Any] = {}


def stop_local_stack(stack: LocalStack) -> None:
    """Stop what :func:`start_local_stack` started in this process."""
    server = _S3_SERVERS.pop(stack.pid, None)
    if server is not None:
        server.stop()
    p = state_dir() / "stack.json"
    try:
        if p.is_file() and json.loads(p.read_text()).get("pid") == stack.pid:
            p.unlink()
    except (OSError, ValueError):
        pass
    _shutdown(stack.ray_tmp, stack.work_dir)
