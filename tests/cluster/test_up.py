"""The embedded default: `mriseg demo` through a local stack, and `serve run deployments/local.yaml`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.helpers.stack import free_port, wait_for_series
from tests.security.upstack import _stop

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_mriseg_demo_and_s3_go_through_the_stack_mriseg_up_started(isolated_ray, tmp_path, monkeypatch, capsys):
    """`mriseg up`'s stack (Ray + SeaweedFS + local.yaml); `mriseg demo` finds it and goes through it."""
    import httpx

    from serve.storage import staging
    from serve.cli.main import main
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
        # the metrics URL `mriseg up` prints is Ray's export, where the Router's series are too
        wait_for_series(stack.metrics_url, [("ray_mriseg_volumes_total", {"site": stack.site}),
                                            ("ray_mriseg_submodel_volumes_total", {})])
    finally:
        stop_local_stack(stack)
    assert find_running_stack() is None
    assert not (tmp_path / "cache" / "up" / "stack.json").exists()


def test_serve_run_on_local_yaml_segments_with_all_six_submodels(isolated_ray, tmp_path):
    """Ray's own `serve run` on deployments/local.yaml (only the port and tenants moved for the test)."""
    from serve.api.client import ApiClient, segment_file
    from serve.demo import demo_volume
    from serve.imaging.nifti import write_nifti
    from serve.cluster.sites import write_tenants

    cfg = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
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


def test_a_failed_start_stops_its_ray_and_a_start_beside_a_running_ray_is_refused(isolated_ray):
    """The one starter (`mriseg up`, the test stacks, the load tests) leaves no Ray behind when it fails, so
    the next start is not refused as a second ray.init; it never tears down a Ray it did not start."""
    import shutil
    import tempfile

    import ray

    from serve.cluster.up import start_cluster
    from serve.errors import MrisegError

    prefix = f"mrt{os.getpid()}-"  # this test's Ray temp dirs (other runs may share /tmp)
    with pytest.raises(MrisegError, match="unknown sub-model"):  # fails after ray.init and serve.start
        start_cluster({"submodels": ["no-such-model"]}, port=free_port(), num_cpus=1, ray_tmp_prefix=prefix)
    assert not ray.is_initialized()
    assert not list(Path("/tmp").glob(prefix + "*"))

    theirs = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=theirs, log_to_driver=False)
        with pytest.raises(MrisegError, match="already connected to a Ray cluster"):
            start_cluster({}, port=free_port(), num_cpus=1, ray_tmp_prefix=prefix)
        assert ray.is_initialized()  # still theirs
        assert [str(p) for p in Path("/tmp").glob(prefix + "*")] == [theirs]
    finally:
        ray.shutdown()
        shutil.rmtree(theirs, ignore_errors=True)


def test_state_of_a_dead_stack_is_removed_keys_and_all(tmp_path, monkeypatch):
    import json

    from serve.cluster.up import find_running_stack, state_dir
    from serve.storage.embedded_s3 import free_ports

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
    from serve.cluster.sites import check_site_names
    from serve.errors import MrisegError

    with pytest.raises(MrisegError, match=says):
        check_site_names(names)


def test_a_tenants_spec_gives_sites_settings_but_never_keys_or_prefixes(tmp_path):
    from serve.router.tenancy import Tenancy
    from serve.cluster.sites import load_site_specs, write_tenants
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
    from serve.router.tenancy import Tenancy
    from serve.cluster.sites import JOBS_PREFIX, local_events, write_tenants

    keys = {"a": "mrs_" + "a" * 24, "b": "mrs_" + "b" * 24}
    tenants = Tenancy.load(write_tenants(tmp_path / "tenants.yaml", keys))
    events = local_events(list(keys))
    assert events["jobs"] == JOBS_PREFIX
    assert not set(events) & {"site_keys", "site_keys_file", "api_url"}  # no pod holds a site's key
    assert not any(key in str(events) for key in keys.values()) and not list(tmp_path.glob("*keys*"))
    assert not any(site.owns(JOBS_PREFIX + "pushed/x.json") for site in tenants.sites.values())
    for rule in events["rules"]:
        site = tenants.sites[rule["site"]]
        assert site.owns(f"s3://{rule['bucket']}/{rule['prefix']}scan.nii.gz")
        assert site.owns(rule["output_root"] + f"/{rule['site']}/case/job.json")
    assert sorted(r["site"] for r in events["rules"]) == ["a", "b"]


def test_the_banner_shows_each_sites_keys_and_the_open_ports():
    from serve.cli.stack import banner
    from serve.cluster.sites import LocalSite
    from serve.cluster.up import LocalStack

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
