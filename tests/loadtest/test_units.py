"""The benchmark's building blocks: reference size, tile counts, floor, baseline, verdicts, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest.bench import judge
from loadtest.inputs import InputSize, write_volume
from serve.catalogue import load_catalogue
from serve.inference.modelfolder import UNetSpec, write_model_folder

MICRO = UNetSpec(features=(4, 8, 16), patch_size=(32, 32, 32))


@pytest.fixture(scope="module")
def micro_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    cat = load_catalogue()
    for i, sm in enumerate(cat.submodels):
        write_model_folder(root, sm, MICRO, seed=i)
    return root


def test_reference_architecture_has_the_size_of_a_real_model():
    from loadtest.refmodels import EXPECTED_PARAMS, REFERENCE_SPEC, count_parameters

    arch = REFERENCE_SPEC.arch_kwargs()
    assert arch["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert arch["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert list(REFERENCE_SPEC.patch_size) == [128, 128, 128]
    n = count_parameters(load_catalogue().submodel("organs"))
    assert abs(n - EXPECTED_PARAMS) < 0.02 * EXPECTED_PARAMS


@pytest.mark.parametrize("shape", [(20, 20, 20), (70, 45, 33), (100, 64, 32)])
@pytest.mark.parametrize("model_name", ["organs", "face"])  # tile steps 0.8 and 0.5
def test_tile_count_equals_nnunets_own_sliding_window(micro_models, model_name, shape):
    from loadtest.baseline import load_models
    from loadtest.floor import tile_count

    m = load_models(micro_models, [model_name], "cpu")[model_name]
    patch = m.predictor.configuration_manager.patch_size
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    assert tile_count(m, shape) == len(m.predictor._internal_get_sliding_window_slicers(padded))


def test_floor_measures_or_scales_and_says_which(micro_models):
    from loadtest.baseline import load_models
    from loadtest.floor import measure_floor

    models = load_models(micro_models, ["organs", "face"], "cpu")
    shapes = {"a": {"organs": (70, 45, 33), "face": (70, 45, 33)}}
    full = measure_floor(models, shapes, "fp32", batch_size=2)["a"]
    assert full.tiles == full.timed_tiles and set(full.method.values()) == {"measured"}
    capped = measure_floor(models, shapes, "bf16", batch_size=2, max_tiles=1)["a"]
    assert capped.timed_tiles == {"organs": 1, "face": 1}
    assert set(capped.method.values()) == {"per-tile rate x tiles"}
    assert capped.tiles == full.tiles and capped.total_s > 0


def test_baseline_writes_a_combined_map_on_the_input_grid(micro_models, tmp_path):
    import nibabel as nib

    from loadtest.baseline import run_baseline

    src = write_volume(InputSize("t", (30, 24, 10), 3.0), tmp_path / "in.nii.gz")
    out = tmp_path / "seg.nii.gz"
    t = run_baseline(src, micro_models, tmp_path / "w", names=["organs", "face"], device="cpu",
                     output_path=out)
    img_in, img_out = nib.load(str(src)), nib.load(str(out))
    assert img_out.shape == img_in.shape
    np.testing.assert_allclose(img_out.affine, img_in.affine, atol=1e-4)
    cat = load_catalogue()
    allowed = {0} | set(cat.submodel("organs").global_ids.values()) | set(cat.submodel("face").global_ids.values())
    assert set(np.unique(np.asanyarray(img_out.dataobj)).tolist()) <= allowed
    assert set(t.load_s) == {"organs", "face"} and all(v > 0 for v in t.load_s.values())
    assert t.total_without_loading_s < t.total_s


def test_baseline_equals_our_pipeline_at_totalsegmentators_default(micro_models, tmp_path):
    """Like for like: on an integer-valued input the baseline (TotalSegmentator's sequence, -ro 1 with the
    int32 cast) and ``serve.inference.pipeline.Segmenter`` at its default give the same map, voxel for voxel."""
    import nibabel as nib

    from loadtest.baseline import run_baseline
    from serve.inference.modelstore import ModelStore
    from serve.inference.pipeline import Segmenter
    from serve.imaging.volume_io import read_volume

    src = write_volume(InputSize("t", (30, 24, 10), 3.0), tmp_path / "in.nii.gz", seed=3)
    assert nib.load(str(src)).get_data_dtype() == np.int16
    out = tmp_path / "seg.nii.gz"
    names = ["organs", "face"]
    run_baseline(src, micro_models, tmp_path / "w", names=names, device="cpu", output_path=out)
    two = tmp_path / "two"  # the same two model folders alone, so our merge sees what the baseline combined
    two.mkdir()
    for folder in micro_models.iterdir():
        if folder.name.endswith(("_organs", "_face")):
            (two / folder.name).symlink_to(folder)
    result = Segmenter(ModelStore([two]), device="cpu", threads=1).segment(read_volume(src))
    theirs = np.asanyarray(nib.load(str(out)).dataobj)
    assert len(np.unique(theirs)) > 2  # the micro models label something, so equality says something
    np.testing.assert_array_equal(result.labels, theirs)


def test_verdict_says_by_how_much_a_target_is_missed():
    assert judge(0.5, ("<=", 0.6))["met"] is True
    missed = judge(0.9, ("<=", 0.6))
    assert missed["met"] is False and missed["missed_by"].startswith("1.50x")
    assert judge(1.2, (">=", 2.0))["missed_by"].startswith("0.60x")
    assert judge(None, (">=", 2.0))["met"] is None


def test_report_renders_a_result(tmp_path):
    from loadtest.report import write_markdown, write_plot

    bl = {"with_loading_s": 100.0, "without_loading_s": 80.0, "peak_rss_mb_max_child_so_far": 900.0}
    stream = {"volumes_per_hour": 40.0}
    result = {
        "command": "python -m loadtest.bench", "started_utc": "x", "bench_wall_s": 60.0, "note": "",
        "device": {"name": "cpu", "label": "cpu-2core", "loadavg_at_start": [1, 1, 1]},
        "target_measured": "cluster", "reference_models": {"parameters": {"organs": 31_000_000}},
        "inputs": {"tiny": {"shape": [1, 2, 3], "spacing_mm": 3.0, "voxels": 6},
                   "small": {"shape": [4, 5, 6], "spacing_mm": 3.0, "voxels": 120}},
        "stream_input": "tiny",
        "baseline": {"fp32": {"small": bl, "stream": stream}},
        "ours": {"fp32": {"stream": {"volumes": 8, "clients": 2, "volumes_per_hour": 60.0},
                          "memory": {"cluster_total_peak_rss_mb_sampled": 5000.0,
                                     "per_process_peak_rss": {1: {"peak_rss_mb": 1200.0}}}}},
        "ratios": {"fp32": {
            "latency_s": 50.0, "floor_s": 45.0, "overhead_vs_floor": 50 / 45,
            "vs_baseline_fp32": {"latency_vs_baseline_with_loading": 0.5, "latency_vs_baseline_without_loading": 0.625,
                                 "stream_throughput_vs_baseline": 1.5},
            "targets_vs_baseline_fp32": {"latency_vs_baseline_with_loading": judge(0.5, ("<=", 0.6)),
                                         "stream_throughput_vs_baseline": judge(1.5, (">=", 2.0))},
            "overhead_target": judge(50 / 45, ("<=", 1.15)),
            "scaling": [{"size": "tiny", "voxels": 6, "ours_s": 5.0, "floor_s": 4.0, "baseline_with_loading_s": None},
                        {"size": "small", "voxels": 120, "ours_s": 50.0, "floor_s": 45.0,
                         "baseline_with_loading_s": 100.0}]}},
    }
    json.dumps(result)
    md = write_markdown(result, tmp_path / "b.md", "b.png").read_text()
    assert "**missed** (0.75x the target" in md and "| 0.500 |" in md
    assert write_plot(result, tmp_path / "b.png").stat().st_size > 1000


def test_a_gpu_bench_times_nnunets_own_fp16_once_not_again_under_another_label():
    from loadtest.bench import served_precisions

    assert all(served_precisions(choice, "cuda") == ["fp32"] for choice in ("fp32", "bf16", "both"))
    assert served_precisions("both", "cpu") == ["bf16", "fp32"] and served_precisions("bf16", "cpu") == ["bf16"]


def test_the_floor_on_cuda_runs_under_the_fp16_autocast_the_predictor_uses():
    import contextlib
    import warnings

    import torch

    from loadtest.floor import autocast_for

    assert isinstance(autocast_for("fp32", "cpu"), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that it would disable the context
        cuda = autocast_for("fp32", "cuda")
    assert isinstance(cuda, torch.autocast) and cuda.fast_dtype == torch.float16
