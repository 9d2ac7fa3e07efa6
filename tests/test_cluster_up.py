"""The embedded default: `mriseg demo` through a local stack, and `serve run deployments/local.yaml`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.ray_fixtures import _shared_stack_owner, free_port, isolated_ray  # noqa: F401

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_mriseg_demo_goes_through_a_local_stack(isolated_ray, tmp_path, monkeypatch, capsys):
    from serve.cli import main

    monkeypatch.setenv("MRISEG_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "starting a temporary one" in out and "through http://127.0.0.1:" in out
    assert "sub-models (ran in parallel)" in out
    seg = nib.load(tmp_path / "demo" / "result" / "segmentations.nii.gz")
    phantom = nib.load(tmp_path / "demo" / "phantom.nii.gz")
    assert seg.shape == phantom.shape and np.allclose(seg.affine, phantom.affine)
    assert (tmp_path / "demo" / "result" / "preview.png").stat().st_size > 0
    assert not (tmp_path / "cache" / "up" / "stack.json").exists()  # the temporary stack left no state


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
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
