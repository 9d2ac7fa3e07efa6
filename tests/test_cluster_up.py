"""The embedded default: `mriseg demo` through a local stack, and `serve run deployments/local.yaml`."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.ray_fixtures import _shared_stack_owner, free_port, isolated_ray  # noqa: F401

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_up_with_embedded_s3_then_demo_through_it(isolated_ray, tmp_path, monkeypatch, capsys):
    """`mriseg up`'s stack (Ray + SeaweedFS + local.yaml); `mriseg demo` finds it and goes through it."""
    import httpx

    from serve import staging
    from serve.cli import main
    from serve.cluster.up import find_running_stack, start_local_stack, stop_local_stack

    monkeypatch.setenv("MRISEG_CACHE", str(tmp_path / "cache"))
    stack = start_local_stack(port=free_port())
    try:
        assert find_running_stack() == stack
        assert (tmp_path / "cache" / "up" / "stack.json").stat().st_mode & 0o077 == 0  # key file is private

        assert main(["demo", "-o", str(tmp_path / "demo"), "--threads", "1", "--models", "demo"]) == 0
        captured = capsys.readouterr()
        out = captured.out
        assert f"through {stack.url}" in out and "temporary" not in out
        # the running stack cannot take these, and says so instead of dropping them silently
        assert "ignoring --threads, --models" in captured.err and "--in-process" in captured.err
        assert "sub-models (ran in parallel)" in out
        seg = nib.load(tmp_path / "demo" / "result" / "segmentations.nii.gz")
        phantom = nib.load(tmp_path / "demo" / "phantom.nii.gz")
        assert seg.shape == phantom.shape and np.allclose(seg.affine, phantom.affine)
        assert (tmp_path / "demo" / "result" / "preview.png").stat().st_size > 0

        # the printed S3 recipe works against the embedded server
        staging.put_bytes((tmp_path / "demo" / "phantom.nii.gz").read_bytes(),
                          "s3://mriseg/local/in/scan.nii.gz", stack.s3)
        r = httpx.post(f"{stack.url}/v1/segmentations", params={"wait": "true"}, timeout=300,
                       headers={"Authorization": f"Bearer {stack.api_key}"},
                       json={"input": "s3://mriseg/local/in/scan.nii.gz",
                             "output_prefix": "s3://mriseg/local/out/scan/"})
        assert r.status_code == 200, r.text
        assert staging.object_exists("s3://mriseg/local/out/scan/segmentation.nii.gz", stack.s3)
    finally:
        stop_local_stack(stack)
    assert find_running_stack() is None
    assert not (tmp_path / "cache" / "up" / "stack.json").exists()


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the stack's whole process group, as a user would; SIGKILL after a minute."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_serve_run_local_yaml(isolated_ray, tmp_path):
    """Ray's own `serve run` on deployments/local.yaml (only the port and tenants moved for the test)."""
    from serve.cluster.client import ApiClient, segment_file
    from serve.demo import demo_volume
    from serve.volume_io import write_nifti
    from serve.cluster.up import write_tenants

    cfg = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["metrics_port"] = free_port()
    app["args"]["router"]["results_dir"] = str(tmp_path / "results")
    app["args"]["tenants_file"] = str(write_tenants(tmp_path / "tenants.yaml", "test-key-0123456789abcdef"))
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": "/tmp", "MRISEG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", str(tmp_path / "local.yaml")],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        from serve.cluster.up import wait_ready

        wait_ready(f"http://127.0.0.1:{port}", timeout=400)
        vol = demo_volume()
        src = write_nifti(tmp_path / "phantom.nii.gz", vol.data, vol.affine)
        out = segment_file(ApiClient(f"http://127.0.0.1:{port}", "test-key-0123456789abcdef"), src, tmp_path / "out")
        assert out["job"]["status"] == "succeeded"
        assert len(out["job"]["submodels"]) == 6  # a full run uses the six sub-models, not total_fast
        assert nib.load(out["written"]["multilabel"]).shape == vol.data.shape
    finally:
        _stop(proc)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _gcs_pids(ray_tmp: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "gcs_server" in cmd and ray_tmp in cmd:
            pids.append(int(d.name))
    return pids


def _replica_pids(deployment: str) -> list[int]:
    """Processes of ``deployment``'s Serve replicas (Ray names them ``ray::ServeReplica:<app>:<deployment>``)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ray::ServeReplica:mriseg:{deployment}"):
            pids.append(int(d.name))
    return pids


@pytest.fixture(scope="module")
def up_two_sites(_shared_stack_owner, tmp_path_factory):  # noqa: F811
    """`mriseg up --sites a,b` as a user starts it (RAY_AUTH_MODE unset), its state file, log and home."""
    import json

    from serve.cluster.up import LocalStack, wait_ready

    _shared_stack_owner.stop()  # one Ray cluster at a time on a small machine
    tmp = tmp_path_factory.mktemp("up-two-sites")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(HOME=str(tmp / "home"), MRISEG_CACHE=str(tmp / "cache"), RAY_USAGE_STATS_ENABLED="0")
    port, log = free_port(), tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mriseg")), "up", "--port", str(port),
                                 "--sites", "a,b"],
                                env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=400)
        state_file = tmp / "cache" / "up" / "stack.json"
        for _ in range(120):  # the state, then the banner, come just after the stack answers /readyz
            if state_file.exists() and "Ctrl-C stops the stack" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        stack = LocalStack(**json.loads(state_file.read_text()))
        yield {"stack": stack, "state_file": state_file, "log": log, "home": tmp / "home", "tmp": tmp}
    finally:
        _stop(proc)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads Ray's environment from /proc")
def test_up_as_users_start_it_leaves_ray_token_auth_on(up_two_sites):
    """`mriseg up` with RAY_AUTH_MODE unset: Ray's ports (all interfaces) want Ray's token; the stack serves."""
    from serve.cluster.cli import run_demo_through_stack

    stack, state_file, log = up_two_sites["stack"], up_two_sites["state_file"], up_two_sites["log"]
    gcs = _gcs_pids(stack.ray_tmp)
    assert len(gcs) == 1, gcs
    assert _environ(gcs[0]).get("RAY_AUTH_MODE") == "token"
    token_file = up_two_sites["home"] / ".ray" / "auth_token"  # Ray's own place for it
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # Ray writes it world-readable under umask 022
    assert len(token) >= 32
    assert token not in state_file.read_text() and token not in log.read_text(errors="replace")
    out = run_demo_through_stack(stack, up_two_sites["tmp"] / "demo", quiet=True)
    assert out["job"]["status"] == "succeeded"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads Ray's environment from /proc")
def test_up_gives_each_site_its_own_key_inbox_and_s3_identity(up_two_sites):
    """`mriseg up --sites a,b`: a's S3 keys reach a's prefix only; b's pushed volume is segmented into b's
    outbox; the job records lie outside both prefixes, signed with a key only the stack's workers hold; the
    banner shows each site's keys and the open ports, never the server identity's secret."""
    import json

    import httpx
    from botocore.exceptions import ClientError

    from serve.cluster.tenancy import Tenancy
    from serve.cluster.up import JOBS_PREFIX
    from serve.demo import demo_volume
    from serve.embedded_s3 import SEAWEED_OPEN_PORTS
    from serve.s3client import S3Settings, make_client
    from serve.volume_io import write_nifti

    stack, log = up_two_sites["stack"], up_two_sites["log"].read_text(errors="replace")
    state = up_two_sites["state_file"].read_text()
    work = Path(stack.work_dir)
    sites = {s.name: s for s in stack.sites}
    assert list(sites) == ["a", "b"] and (stack.site, stack.api_key) == ("a", sites["a"].api_key)
    assert sites["a"].prefix == "s3://mriseg/a/" and sites["b"].inbox == "s3://mriseg/b/inbox/"
    assert len({s.api_key for s in sites.values()}) == 2
    assert len({s.s3["access_key_id"] for s in sites.values()}) == 2

    # the tenants file: each site with its prefix, only key digests
    tenants = Tenancy.load(work / "tenants.yaml")
    for name, site in sites.items():
        assert site.api_key not in (work / "tenants.yaml").read_text()
        assert tenants.authenticate(site.api_key).name == name
        assert tenants.sites[name].prefixes == (site.prefix,)
        assert not tenants.sites[name].owns(JOBS_PREFIX + "jobs/x.json")

    # the banner: every site's API key and S3 keys, the open ports; the server identity's secret nowhere
    server = next(i for i in json.loads((work / "s3" / "s3.json").read_text())["identities"]
                  if "Admin" in i["actions"])["credentials"][0]
    for site in sites.values():
        assert site.api_key in log and site.s3["access_key_id"] in log and site.s3["secret_access_key"] in log
    assert server["secretKey"] not in log and server["secretKey"] not in state
    assert len(stack.open_ports) == len(SEAWEED_OPEN_PORTS) and all(p.split(" ")[0] in log for p in stack.open_ports)

    # the record key: generated into the private work dir, and what the event intake's workers read
    key_file = Path(stack.record_key_file)
    assert key_file.parent == work and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    intake = _replica_pids("EventIntake")
    assert intake and all(_environ(p).get("MRISEG_RECORD_KEY_FILE") == str(key_file) for p in intake)

    a = make_client(S3Settings.from_mapping(sites["a"].s3))
    b = make_client(S3Settings.from_mapping(sites["b"].s3))
    vol = demo_volume()
    scan = write_nifti(up_two_sites["tmp"] / "b-scan.nii.gz", vol.data, vol.affine).read_bytes()
    etag = b.put_object(Bucket="mriseg", Key="b/inbox/case1.nii.gz", Body=scan)["ETag"].strip('"')

    def denied(call) -> bool:
        try:
            call()
        except ClientError as e:
            return e.response["Error"]["Code"] == "AccessDenied"
        return False

    # site a's S3 keys on b's prefix and on the job records: Get, Put, List, Delete all denied
    for prefix in ("b/inbox/", "_jobs/"):
        assert denied(lambda: a.get_object(Bucket="mriseg", Key="b/inbox/case1.nii.gz"))
        assert denied(lambda: a.put_object(Bucket="mriseg", Key=prefix + "planted.json", Body=b"{}"))
        assert denied(lambda: a.list_objects_v2(Bucket="mriseg", Prefix=prefix))
        assert denied(lambda: a.delete_object(Bucket="mriseg", Key="b/inbox/case1.nii.gz"))
    a.put_object(Bucket="mriseg", Key="a/inbox/mine.nii.gz", Body=b"x")  # and allowed on its own
    assert [o["Key"] for o in a.list_objects_v2(Bucket="mriseg", Prefix="a/")["Contents"]] == ["a/inbox/mine.nii.gz"]

    # b's pushed volume is segmented into b's outbox
    obj = {"key": "b/inbox/case1.nii.gz", "eTag": etag}
    body = {"Records": [{"eventName": "ObjectCreated:Put", "eventSource": "minio:s3",
                         "s3": {"bucket": {"name": "mriseg"}, "object": obj}}]}
    r = httpx.post(f"{stack.url}/v1/events", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {sites['b'].api_key}"})
    assert r.status_code == 202 and r.json()["jobs"][0]["output_prefix"] == "s3://mriseg/b/outbox/b/case1/", r.text
    deadline, doc = time.monotonic() + 300, {}
    while time.monotonic() < deadline and doc.get("status") not in ("done", "failed"):
        try:
            doc = json.loads(b.get_object(Bucket="mriseg", Key="b/outbox/b/case1/job.json")["Body"].read())
        except ClientError:
            time.sleep(1)
    assert doc.get("status") == "done", doc


def test_state_of_a_dead_stack_is_removed_keys_and_all(tmp_path, monkeypatch):
    import json

    from serve.cluster.up import find_running_stack, state_dir
    from serve.embedded_s3 import free_ports

    monkeypatch.setenv("MRISEG_CACHE", str(tmp_path))
    state = state_dir() / "stack.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"url": f"http://127.0.0.1:{free_ports(1)[0]}", "api_key": "mrs_secret",
                                 "site": "local", "pid": 1, "s3_pid": os.getpid()}))  # a pid that is not weed
    assert find_running_stack() is None
    assert not state.exists()  # the clear API key does not outlive its stack


def test_a_world_readable_ray_token_is_made_private_and_a_missing_one_is_no_error(tmp_path):
    from serve.cluster.up import keep_ray_token_private

    token = tmp_path / "auth_token"
    assert keep_ray_token_private(token) is False
    token.write_text("x" * 32)
    token.chmod(0o644)
    assert keep_ray_token_private(token) is True
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert keep_ray_token_private(token) is False and token.read_text() == "x" * 32


@pytest.mark.parametrize("names, says", [
    (["_jobs"], "lower-case"), (["Site-A"], "lower-case"), (["a b"], "lower-case"), (["a/b"], "lower-case"),
    (["x" * 64], "at most 63"), (["a", "a"], "named twice"), ([""], "at least one site")])
def test_site_names_must_be_key_segments_given_once(names, says):
    from serve.cluster.up import check_site_names
    from serve.errors import MrisegError

    with pytest.raises(MrisegError, match=says):
        check_site_names(names)


def test_a_tenants_spec_gives_sites_settings_but_never_keys_or_prefixes(tmp_path):
    from serve.cluster.tenancy import Tenancy
    from serve.cluster.up import load_site_specs, write_tenants
    from serve.errors import MrisegError

    spec = tmp_path / "sites.yaml"
    spec.write_text("sites:\n  site-a: {max_concurrent_jobs: 2}\n  site-b:\n")
    specs = load_site_specs(spec)
    assert specs == {"site-a": {"max_concurrent_jobs": 2}, "site-b": {}}
    keys = {"site-a": "mrs_" + "a" * 24, "site-b": "mrs_" + "b" * 24}
    tenants = Tenancy.load(write_tenants(tmp_path / "tenants.yaml", keys, specs))
    assert tenants.sites["site-a"].max_concurrent_jobs == 2 and tenants.sites["site-b"].max_concurrent_jobs == 8
    assert tenants.authenticate(keys["site-b"]).name == "site-b"
    for bad, says in (("sites:\n  site-a: {keys: [mrs_0123456789abcdef]}\n", "cannot be set here"),
                      ("sites:\n  site-a: {prefixes: ['s3://other/']}\n", "cannot be set here"),
                      ("sites:\n  _jobs: {}\n", "lower-case"), ("site-a: {}\n", "expected 'sites:'")):
        spec.write_text(bad)
        with pytest.raises(MrisegError, match=says):
            load_site_specs(spec)


def test_local_events_put_each_sites_inbox_in_its_prefix_and_the_jobs_outside_all(tmp_path):
    from serve.cluster.tenancy import Tenancy
    from serve.cluster.up import JOBS_PREFIX, local_events, write_tenants

    keys = {"a": "mrs_" + "a" * 24, "b": "mrs_" + "b" * 24}
    tenants = Tenancy.load(write_tenants(tmp_path / "tenants.yaml", keys))
    events = local_events(tmp_path, keys)
    assert events["jobs"] == JOBS_PREFIX
    assert not any(site.owns(JOBS_PREFIX + "pushed/x.json") for site in tenants.sites.values())
    for rule in events["rules"]:
        site = tenants.sites[rule["site"]]
        assert site.owns(f"s3://{rule['bucket']}/{rule['prefix']}scan.nii.gz")
        assert site.owns(rule["output_root"] + f"/{rule['site']}/case/job.json")
    assert sorted(r["site"] for r in events["rules"]) == ["a", "b"]


def test_the_banner_shows_each_sites_keys_and_the_open_ports():
    from serve.cluster.cli import banner
    from serve.cluster.up import LocalSite, LocalStack

    s3 = {"endpoint_url": "http://127.0.0.1:9", "access_key_id": "AKA", "secret_access_key": "SECRET-A"}
    sites = [LocalSite("a", "mrs_keyA", "s3://mriseg/a/", s3),
             LocalSite("b", "mrs_keyB", "s3://mriseg/b/",
                       {**s3, "access_key_id": "AKB", "secret_access_key": "SECRET-B"})]
    stack = LocalStack("http://127.0.0.1:8000", "mrs_keyA", "a", 1, s3=s3, sites=sites,
                       open_ports=["127.0.0.1:5 (master HTTP: its status page)"])
    text = banner(stack)
    for word in ("mrs_keyA", "mrs_keyB", "AKA", "SECRET-A", "AKB", "SECRET-B", "s3://mriseg/b/inbox/",
                 "s3://mriseg/b/outbox/b/<case>/", "127.0.0.1:5 (master HTTP"):
        assert word in text, word
    # the state file's form comes back as the same stack
    import dataclasses
    import json

    assert LocalStack(**json.loads(json.dumps(dataclasses.asdict(stack)))) == stack
