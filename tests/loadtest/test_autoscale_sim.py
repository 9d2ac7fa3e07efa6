"""loadtest/autoscale_sim.py takes its knobs from deployments/six-gpu.yaml (the full run is a documented command)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("autoscale_sim", ROOT / "loadtest" / "autoscale_sim.py")
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


def test_sim_uses_the_production_knobs_with_only_delays_shortened():
    config = yaml.safe_load((ROOT / "deployments" / "six-gpu.yaml").read_text())
    prod = {d["name"]: d for a in config["applications"] for d in a["deployments"]}
    for name in sim.SUBMODELS:
        opts = sim.submodel_options(name)
        want, got = prod[name]["autoscaling_config"], opts["autoscaling_config"]
        for knob in ("min_replicas", "target_ongoing_requests"):
            assert got[knob] == want[knob], (name, knob)
        assert got["downscale_delay_s"] < want["downscale_delay_s"]
        assert opts["ray_actor_options"]["num_gpus"] == prod[name]["ray_actor_options"]["num_gpus"]
    assert sim.submodel_options("face")["autoscaling_config"]["min_replicas"] == 0
    assert sim.submodel_options("organs")["autoscaling_config"]["min_replicas"] >= 1


def test_sim_cluster_has_a_gpu_less_head_and_one_gpu_workers():
    cfg = sim.autoscaling_config("127.0.0.1:1")
    types = cfg["available_node_types"]
    assert "GPU" not in types["ray.head.default"]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] == sim.MAX_GPU_NODES
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:1"
