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


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads Ray's environment from /proc")
def test_up_as_users_start_it_leaves_ray_token_auth_on(isolated_ray, tmp_path):
    """`mriseg up` with RAY_AUTH_MODE unset: Ray's ports (all interfaces) want Ray's token; the stack serves."""
    import json

    from serve.cluster.cli import run_demo_through_stack
    from serve.cluster.up import LocalStack, wait_ready

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(HOME=str(tmp_path / "home"), MRISEG_CACHE=str(tmp_path / "cache"), RAY_USAGE_STATS_ENABLED="0")
    port, log = free_port(), tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mriseg")), "up", "--port", str(port), "--no-s3"],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=400)
        state_file = tmp_path / "cache" / "up" / "stack.json"
        for _ in range(120):  # written just after the stack answers /readyz
            if state_file.exists():
                break
            time.sleep(0.5)
        stack = LocalStack(**json.loads(state_file.read_text()))
        gcs = _gcs_pids(stack.ray_tmp)
        assert len(gcs) == 1, gcs
        assert _environ(gcs[0]).get("RAY_AUTH_MODE") == "token"
        token_file = tmp_path / "home" / ".ray" / "auth_token"  # Ray's own place for it
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # Ray writes it world-readable under umask 022
        assert len(token) >= 32
        assert token not in state_file.read_text() and token not in log.read_text(errors="replace")
        out = run_demo_through_stack(stack, tmp_path / "demo", quiet=True)
        assert out["job"]["status"] == "succeeded"
    finally:
        _stop(proc)


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
