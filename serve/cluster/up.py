"""The embedded default: a whole mriseg-serve stack on this machine.

:func:`start_local_stack` starts the embedded S3 server (SeaweedFS, locked
down: :mod:`serve.storage.embedded_s3`), a local Ray, a tenants file and the Serve
app from ``deployments/local.yaml`` (the same file ``serve run`` takes).
Each site (one, ``local``, unless named with ``--sites`` or ``--tenants``)
gets a fresh API key (only its digest is in the tenants file), its prefix
``s3://mriseg/<site>/`` with an inbox (``inbox/``) whose pushed volumes are
segmented into ``outbox/``, and an S3 identity of its own limited to that
prefix. The job records live in ``s3://mriseg/_jobs/``, outside every site's
prefix, signed with a record key generated into the stack's private work
dir. The URL, the sites' keys and the S3 settings go to a state file
readable only by the user, so ``mriseg demo`` (and
:func:`find_running_stack`) can reach the stack.

:func:`start_cluster` / :func:`stop_cluster` start and stop Ray, Serve and the
app for ``mriseg up`` and equally for the test stacks (``tests/helpers/stack.py``)
and the load tests (``loadtest/localcluster.py``), which choose their own args.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import asdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx
import yaml

from serve.cachedir import cache_root
from serve.cluster.sites import (LOCAL_BUCKET, LOCAL_SITE, LocalSite, check_site_names, local_events, site_prefix,
                                 write_tenants)
from serve.errors import MrisegError, ServiceUnavailableError
from serve.jobs.records import ENV as RECORD_KEY_ENV
from serve.jobs.records import RecordSigner
from serve.storage.embedded_s3 import HOST as S3_HOST
from serve.storage.embedded_s3 import SeaweedServer

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "deployments" / "local.yaml"


def state_dir() -> Path:
    return cache_root() / "up"


@dataclass
class LocalStack:
    """How to reach a running local stack. ``api_key``, ``site`` and ``s3`` are the first site's."""

    url: str
    api_key: str
    site: str
    pid: int
    metrics_url: str | None = None
    ray_tmp: str | None = None
    work_dir: str | None = None
    s3: dict | None = None          # the first site's S3 settings (its own keys), if the embedded S3 runs
    s3_pid: int | None = None
    sites: list[LocalSite] = field(default_factory=list)
    open_ports: list[str] = field(default_factory=list)  # embedded S3 ports answering without credentials
    record_key_file: str | None = None

    def __post_init__(self) -> None:
        self.sites = [s if isinstance(s, LocalSite) else LocalSite(**s) for s in self.sites]  # from the state file

    def s3_curl_line(self, key: str = "in/scan.nii.gz") -> str | None:
        """Segment a volume already in the embedded S3 server (``aws s3 cp`` it there first)."""
        if not self.s3:
            return None
        body = json.dumps({"input": f"s3://{LOCAL_BUCKET}/{self.site}/{key}",
                           "output_prefix": f"s3://{LOCAL_BUCKET}/{self.site}/out/{Path(key).name.split('.')[0]}/"})
        return (f"curl -sS -H 'Authorization: Bearer {self.api_key}' -H 'Content-Type: application/json' "
                f"-d '{body}' '{self.url}/v1/segmentations?wait=true'")

    def curl_line(self, volume: str = "scan.nii.gz") -> str:
        return (f"curl -sS -H 'Authorization: Bearer {self.api_key}' -H 'Content-Type: application/octet-stream' "
                f"--data-binary @{shlex.quote(volume)} '{self.url}/v1/segmentations/upload?wait=true"
                f"&filename={shlex.quote(Path(volume).name)}'")


def load_serve_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(application entry, http_options) of a one-application Serve config file."""
    # lazy: ray takes seconds to import; only code running under Ray needs it
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


def _save_state(stack: LocalStack) -> Path:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    p = d / "stack.json"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(stack), f)
    return p


def _healthy(url: str, timeout: float = 2.0) -> bool:
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
    """Return once ``url``'s ``/readyz`` answers 200.

    Args:
        url: the app's base URL.
        timeout: seconds to wait.

    Returns:
        None; a :class:`ServiceUnavailableError` with the last answer's detail after ``timeout``.
    """
    deadline, detail = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=10)
            if r.status_code == 200:
                return
            detail = r.json().get("detail", r.text)
        except (httpx.HTTPError, ValueError) as e:
            detail = type(e).__name__
        time.sleep(0.5)
    raise ServiceUnavailableError(f"the stack at {url} did not become ready in {timeout:.0f}s: {detail}")


@dataclass
class ClusterHandle:
    """A Ray cluster running the mriseg app, as :func:`start_cluster` left it."""

    url: str
    ray_tmp: str | None = None   # the Ray temp dir start_cluster made; None where it joined a cluster by address
    session_dir: str = ""        # this Ray session's folder (logs, sockets)
    app_name: str = "mriseg"
    metrics_url: str | None = None  # Prometheus text from this node's Ray metrics agent (every replica's series)


def start_cluster(args: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000,
                  num_cpus: float | None = None, num_gpus: float = 0, runtime_env: Mapping[str, Any] | None = None,
                  address: str | None = None, proxy_location: str | None = None, app_name: str = "mriseg",
                  route_prefix: str = "/", ray_tmp_prefix: str = "mr", ready_timeout: float = 600) -> ClusterHandle:
    """Start Ray (or join the cluster at ``address``), Serve and the app of ``args``; returns once ``/readyz`` is 200.

    The one starter of ``mriseg up``, the test stacks and the load tests, so that what they run is
    started the same way. ``RAY_AUTH_MODE`` is left as the caller set it (``mriseg up`` leaves
    Ray's token authentication on; the tests and load tests turn it off). A failed start stops
    what it started, so the next start in this process is not refused as a second ``ray.init``.

    Args:
        args: the app's args (:func:`serve.cluster.app.build_app`).
        host: the HTTP host Serve listens on.
        port: the HTTP port.
        num_cpus: CPUs a fresh Ray declares (default: all); ignored with ``address``.
        num_gpus: GPUs a fresh Ray declares; ignored with ``address``.
        runtime_env: Ray's runtime env for the app's workers (e.g. ``{"env_vars": {"OMP_NUM_THREADS": "1"}}``).
        address: a running Ray cluster to join (e.g. ``ray.cluster_utils.Cluster().address``) instead
            of starting one; its owner stops it.
        proxy_location: Serve's proxy placement (e.g. ``"HeadOnly"`` where simulated nodes share one
            machine's ports); default Serve's.
        app_name: the Serve application's name.
        route_prefix: the application's route prefix.
        ray_tmp_prefix: prefix of the fresh Ray temp dir under /tmp (short: Ray's socket paths
            must fit in 107 bytes).
        ready_timeout: seconds to wait for ``/readyz``.

    Returns:
        The running cluster; :func:`stop_cluster` stops it.
    """
    # lazy: ray takes seconds to import; only code running under Ray needs it
    import ray
    from ray import serve as rayserve

    # lazy: the app imports Ray Serve and every deployment; mriseg's parser imports this module
    from serve.cluster.app import AppArgs, build_app

    if ray.is_initialized():  # one driver holds one Ray connection; tearing down the other one is not ours to do
        raise MrisegError("this process is already connected to a Ray cluster; stop it first (stop_cluster)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_tmp = None
    try:
        if address is None:
            ray_tmp = tempfile.mkdtemp(prefix=ray_tmp_prefix, dir="/tmp")
            ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, include_dashboard=False,
                     _temp_dir=ray_tmp, log_to_driver=False, runtime_env=dict(runtime_env or {}))
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=dict(runtime_env or {}))
        keep_ray_token_private()
        # Ray has no public call for it; the load tests find the cluster's processes by it
        node = ray._private.worker._global_node
        session_dir = node.get_session_dir_path()
        rayserve.start(proxy_location=proxy_location, http_options={"host": host, "port": port})
        app = build_app(AppArgs.model_validate(dict(args)))  # as Ray's typed builder does for a config file
        rayserve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
        # the metrics agent exports what every replica on the node records (ray.util.metrics), the Router's too
        cluster = ClusterHandle(f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}", ray_tmp,
                                session_dir, app_name, f"http://127.0.0.1:{node.metrics_export_port}/metrics")
        wait_ready(cluster.url, ready_timeout)
    except BaseException:
        stop_cluster(ClusterHandle("", ray_tmp))
        raise
    return cluster


def stop_cluster(cluster: ClusterHandle | None = None) -> None:
    """Shut down Serve and this process's Ray, and remove the Ray temp dir :func:`start_cluster` made.

    Args:
        cluster: what :func:`start_cluster` returned; None still shuts down Serve and whatever Ray
            this process runs. The nodes of a cluster joined by address keep running: their owner
            stops them.
    """
    # lazy: ray takes seconds to import; only code running under Ray needs it
    import ray
    from ray import serve as rayserve

    try:
        if ray.is_initialized():
            rayserve.shutdown()
    finally:
        ray.shutdown()
        if cluster is not None and cluster.ray_tmp:
            shutil.rmtree(cluster.ray_tmp, ignore_errors=True)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise MrisegError(f"cannot listen on {host}:{port} ({e.strerror}); is another stack running? "
                              f"Pass --port to use another port") from e


def start_local_stack(config: str | os.PathLike = DEFAULT_CONFIG, *, port: int | None = None,
                      models: list[str] | None = None, num_cpus: int | None = None,
                      save_state: bool = True, embedded_s3: bool = True,
                      sites: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None) -> LocalStack:
    """Start the embedded S3 server, Ray and the app of ``config``; returns once ``/readyz`` is 200.

    Args:
        config: the Serve config file.
        port: the HTTP port (default: the config's).
        models: model sources (default: the config's).
        num_cpus: CPUs for Ray (default: all).
        save_state: record the stack in the state file (for ``mriseg demo``).
        embedded_s3: start the embedded S3 server (with the sites' inboxes).
        sites: site names, or name -> settings (:func:`load_site_specs`); default one site, ``local``.

    Returns:
        The stack; its first site is ``api_key``/``site``/``s3``, every site is in ``sites``.
    """
    specs = dict(sites) if isinstance(sites, Mapping) else {n: {} for n in (sites or [LOCAL_SITE])}
    check_site_names(list(specs))
    app_cfg, http = load_serve_config(config)
    args = app_args_from_config(app_cfg)
    host = http.get("host", "127.0.0.1")
    port = int(port or http.get("port", 8000))
    _check_port_free(host, port)
    work = Path(tempfile.mkdtemp(prefix="mriseg-up-"))  # 0700: keys, tenants, the S3 server's data
    s3_server = None
    env_saved: dict[str, str | None] = {}
    try:  # from here on a failure removes what was made, keys included
        api_keys = {site: "mrs_" + secrets.token_urlsafe(24) for site in specs}
        args["tenants_file"] = str(write_tenants(work / "tenants.yaml", api_keys, specs))
        args.setdefault("router", {})["results_dir"] = str(work / "results")
        if models:
            args["model_sources"] = list(models)
        # RAY_AUTH_MODE stays as the caller set it. Unset, Ray (2.59+) gives a local cluster a token
        # (~/.ray/auth_token): its gRPC servers listen on every interface whatever the node address.
        # A fresh key for this stack's job records, set before ray.init so Ray's workers (the intake, the
        # router) inherit it; the variable's earlier value comes back when the stack stops.
        record_key = str(RecordSigner.generate(work / "record.key"))
        env_saved[RECORD_KEY_ENV] = os.environ.get(RECORD_KEY_ENV)
        os.environ[RECORD_KEY_ENV] = record_key
        site_s3: dict[str, dict | None] = {site: None for site in specs}
        open_ports: list[str] = []
        if embedded_s3:
            s3_server = SeaweedServer(work / "s3", buckets=[LOCAL_BUCKET],
                                      identities={site: [site_prefix(site)] for site in specs}).start()
            args["s3"] = s3_server.settings.model_dump()  # the server identity: the app's only, never printed
            site_s3 = {site: s3_server.identity_settings(site).model_dump() for site in specs}
            open_ports = [f"{S3_HOST}:{p} ({op.flag.split('.')[0]} HTTP: {op.serves})"
                          for p, op in s3_server.open_ports()]
            if args.get("events") is not None:  # pushed events for the sites' inboxes (no SQS here)
                args["events"] = {**args["events"], **local_events(list(specs))}
        cluster = start_cluster(args, host=host, port=port, num_cpus=num_cpus, num_gpus=0,
                                runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
                                app_name=app_cfg.get("name", "mriseg"), route_prefix=app_cfg.get("route_prefix", "/"))
    except BaseException:  # start_cluster has stopped Ray already
        if s3_server is not None:
            s3_server.stop()
        shutil.rmtree(work, ignore_errors=True)
        _restore_env(env_saved)
        raise
    local_sites = [LocalSite(site, api_keys[site], site_prefix(site), site_s3[site]) for site in specs]
    first = local_sites[0]
    stack = LocalStack(cluster.url, first.api_key, first.name, os.getpid(),
                       cluster.metrics_url, cluster.ray_tmp,
                       str(work),
                       first.s3, s3_server.proc.pid if s3_server is not None else None, local_sites, open_ports,
                       record_key)
    _S3_SERVERS[stack.pid] = s3_server
    _ENV_SAVED[stack.pid] = env_saved
    if save_state:
        _save_state(stack)
    return stack


def _restore_env(saved: Mapping[str, str | None]) -> None:
    """Give the environment variables a stack set their earlier values back (unset where there was none)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


_S3_SERVERS: dict[int, Any] = {}
_ENV_SAVED: dict[int, dict[str, str | None]] = {}  # pid -> the variables its stack set, earlier values


def stop_local_stack(stack: LocalStack) -> None:
    """Stop what :func:`start_local_stack` started in this process."""
    server = _S3_SERVERS.pop(stack.pid, None)
    if server is not None:
        server.stop()
    _restore_env(_ENV_SAVED.pop(stack.pid, {}))
    p = state_dir() / "stack.json"
    try:
        if p.is_file() and json.loads(p.read_text()).get("pid") == stack.pid:
            p.unlink()
    except (OSError, ValueError):
        pass
    try:
        stop_cluster(ClusterHandle(stack.url, stack.ray_tmp))
    finally:
        if stack.work_dir:
            shutil.rmtree(stack.work_dir, ignore_errors=True)
