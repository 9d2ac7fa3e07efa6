"""The mriseg command line: segment, demo, errors (exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from serve.cli.main import build_parser, main
from serve.outputs.labeltable import read_label_table
from serve.imaging.nifti import write_nifti
from tests.helpers.volumes import body_volume


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    vol = body_volume("LPS", shape=(26, 22, 14), spacing=(1.4, 1.6, 2.0), rotation_deg=5)
    return write_nifti(tmp_path_factory.mktemp("cli") / "phantom.nii.gz", vol.data, vol.affine)


def test_segment_with_totalsegmentator_flags_writes_only_the_roi_subset(phantom, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["segment", "-i", str(phantom), "-o", str(out), "--roi_subset", "liver", "spleen", "face",
               "--statistics", "--preview", "--device", "cpu", "--threads", "1", "--models", str(tiny_models)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "structure" in text and "volume ml" in text and "preview:" in text
    assert sorted(p.name for p in (out / "segmentations").iterdir()) == ["face.nii.gz", "liver.nii.gz",
                                                                          "spleen.nii.gz"]
    ml = nib.load(str(out / "segmentations.nii.gz"))
    assert ml.shape == nib.load(str(phantom)).shape
    assert np.array_equal(ml.affine, nib.load(str(phantom)).affine)
    assert read_label_table(out / "segmentations.nii.gz") == {1: "spleen", 5: "liver", 80: "face"}
    assert set(np.unique(np.asarray(ml.dataobj))) <= {0, 1, 5, 80}
    stats = json.loads((out / "statistics.json").read_text())
    assert set(stats) == {"spleen", "liver", "face"}
    assert set(stats["liver"]) == {"volume", "intensity", "intensity_std", "voxel_count", "qc"}
    assert (out / "preview.png").is_file()


def test_segment_ml_only_writes_no_per_structure_files(phantom, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["segment", "-i", str(phantom), "-o", str(out), "--ml", "--roi-subset", "subcutaneous_fat",
               "--device", "cpu", "-q", "--models", str(tiny_models)])
    assert rc == 0
    assert (out / "segmentations.nii.gz").is_file() and not (out / "segmentations").exists()
    assert not (out / "statistics.json").exists() and not (out / "preview.png").exists()


def test_segment_fast_uses_the_3mm_model(phantom, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", "-i", str(phantom), "-o", str(out), "--fast", "--ml", "--device", "cpu", "-q",
                 "--models", str(tiny_models)]) == 0
    meta = json.loads((out / "mriseg.json").read_text())
    assert meta["fast"] is True and list(meta["models"]) == ["total_fast"]
    assert max(int(k) for k in meta["structures"]) == 50
    assert np.asarray(nib.load(str(out / "segmentations.nii.gz")).dataobj).max() <= 50


def test_segment_resampling_order_flag_is_used_and_recorded(tiny_models, tmp_path):
    """-ro reaches the resampling (the labels are those of that order's array) and mriseg.json says which, with
    the int32 cast an int16 input gets; the default is TotalSegmentator's order 1."""
    from serve.inference.modelload import load_model
    from serve.inference.modelstore import ModelStore
    from serve.inference.predict import predict_labels
    from serve.inference.preprocess import prepare
    from serve.inference.restore import to_input_grid
    from serve.imaging.volume_io import read_volume

    vol = body_volume("LPS", shape=(26, 22, 14), spacing=(1.4, 1.6, 2.0), rotation_deg=5)
    src = write_nifti(tmp_path / "int16.nii.gz", np.round(vol.data).astype(np.int16), vol.affine)
    store = ModelStore([tiny_models])
    model = load_model(store.locate("tissue_types"), store.catalogue.submodel("tissue_types"), device="cpu")
    for argv, order in (([], 1), (["-ro", "3"], 3), (["--resampling_order", "0"], 0)):
        out = tmp_path / f"out{order}"
        assert main(["segment", "-i", str(src), "-o", str(out), "--ml", "--roi-subset", "subcutaneous_fat",
                     "--device", "cpu", "-q", "--models", str(tiny_models), *argv]) == 0
        meta = json.loads((out / "mriseg.json").read_text())
        assert (meta["resampling_order"], meta["input_cast"]) == (order, "int32")
        prep = prepare(read_volume(src), 1.5, resampling_order=order)
        want = to_input_grid(predict_labels(model, prep.data, 1.5), prep)
        got = np.asarray(nib.load(str(out / "segmentations.nii.gz")).dataobj)
        sub = {v: k for k, v in model.label_names.items()}["subcutaneous_fat"]
        assert np.array_equal(got > 0, want == sub), argv


@pytest.mark.parametrize("value", ["6", "-1", "1.5", "cubic"])
def test_segment_refuses_a_resampling_order_outside_0_to_5(phantom, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["segment", "-i", str(phantom), "-o", str(tmp_path / "o"), "-ro", value])
    assert e.value.code == 2 and "resampling order" in capsys.readouterr().err


@pytest.mark.parametrize("argv_tail,message", [
    (["--roi-subset", "livr"], "unknown structure(s): livr"),
    (["--fast", "--roi-subset", "face"], "fast mode only covers"),
])
def test_bad_requests_exit_2(phantom, tiny_models, tmp_path, capsys, argv_tail, message):
    rc = main(["segment", "-i", str(phantom), "-o", str(tmp_path / "o"), "--models", str(tiny_models), "-q",
               *argv_tail])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_input_exits_2_without_traceback_in_a_real_process(tmp_path, tiny_models):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    env = {**os.environ, "MRISEG_MODELS": str(tiny_models)}
    p = subprocess.run([sys.executable, "-m", "serve.cli.main", "segment", "-i", str(bad), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("mriseg: error:") and "Traceback" not in p.stderr
    assert "truncated or corrupt" in p.stderr or "not a readable NIfTI" in p.stderr


def test_missing_input_exits_2(tmp_path, tiny_models, capsys):
    assert main(["segment", "-i", str(tmp_path / "none.nii.gz"), "-o", str(tmp_path / "o"),
                 "--models", str(tiny_models)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unwritable_destinations_exit_2_before_any_work(phantom, tiny_models, tmp_path, capsys,
                                                       monkeypatch):
    (tmp_path / "a-file").write_text("x")  # a folder below a file cannot exist, even for root
    assert main(["segment", "-i", str(phantom), "-o", str(tmp_path / "a-file" / "out"), "--models",
                 str(tiny_models), "-q"]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    bulk = ["bulk", "s3://in/x/", "--out", "s3://out/y/", "--no-progress"]
    assert main([*bulk, "--api-key-file", str(tmp_path / "no-such-key")]) == 2
    assert "cannot read the API key file" in capsys.readouterr().err
    monkeypatch.setenv("MRISEG_API_KEY", "k" * 16)  # the report is checked before any volume is listed or sent
    assert main([*bulk, "--api", "http://127.0.0.1:9", "--report", str(tmp_path / "a-file" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report" in err and "Traceback" not in err


def _in_process_flag() -> list[str]:
    """The cluster plugin sends ``demo`` through Ray unless told otherwise; this test is the in-process path."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    demo = sub.choices["demo"]
    return ["--in-process"] if any("--in-process" in a.option_strings for a in demo._actions) else []


def test_demo_prints_summary_and_preview(tmp_path, tiny_models, capsys):
    argv = ["demo", "-o", str(tmp_path / "demo"), "--device", "cpu", "-q", "--models", str(tiny_models)]
    assert main(argv + _in_process_flag()) == 0
    out = capsys.readouterr().out
    assert "structure(s) found" in out
    preview = [ln for ln in out.splitlines() if ln.startswith("preview: ")][0].split(": ", 1)[1]
    assert os.path.isfile(preview)
    assert "DEMO MODELS - not for clinical use" in out


def test_plugins_can_add_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"segment", "models", "demo"} <= set(sub.choices)


def test_every_cache_follows_mriseg_cache(tmp_path, monkeypatch):
    from serve.cli.main import default_import_dir
    from serve.cluster.up import state_dir
    from serve.demo import default_cache_dir
    from serve.inference.modelstore import ModelStore

    monkeypatch.setenv("MRISEG_CACHE", str(tmp_path))
    paths = [default_import_dir(), default_cache_dir(), state_dir(), ModelStore([]).cache_dir]
    assert all(p.is_relative_to(tmp_path) for p in paths), paths
    monkeypatch.delenv("MRISEG_CACHE")
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "mriseg")
    assert all(str(p).startswith(home_cache) for p in
               [default_import_dir(), default_cache_dir(), state_dir(), ModelStore([]).cache_dir])


def test_models_list_require_fails_when_a_required_sub_model_is_not_present(tmp_path, capsys):
    """What the k8s init container runs: weights that could not be staged must stop the pod."""
    from tests.helpers.stack import tiny_models as tiny_folders

    models = tiny_folders(tmp_path / "models", names=("organs",))
    listing = ["models", "list", "--models", str(models)]
    assert main(listing) == 0  # without --require it only reports
    assert main([*listing, "--require", "organs"]) == 0
    assert main([*listing, "--require"]) == 1  # the six: five are missing
    assert "muscles (missing)" in capsys.readouterr().err
    assert main([*listing, "--require", "kidneys"]) == 2  # a typo is an error, not a pass
