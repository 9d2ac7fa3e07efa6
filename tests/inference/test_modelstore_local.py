"""Local model folders: TotalSegmentator's layout, any trainer name, partial installs, import."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve.catalogue import load_catalogue
from serve.cli.main import main
from serve.errors import ModelFolderError, ModelUnavailableError
from serve.inference.modelfolder import UNetSpec, write_model_folder
from serve.inference.modelstore import ModelStore
from serve.inference.pipeline import Segmenter
from tests.helpers.volumes import body_volume

CAT = load_catalogue()
SPEC = UNetSpec(features=(4, 8), patch_size=(16, 16, 16))
TS_ORGANS = "Dataset850_TotalSegMRI_part1_organs_1088subj"
ODD_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring_MySiteVariant"


def totalseg_home(tmp: Path) -> Path:
    """A fake ~/.totalsegmentator holding organs and muscles as TotalSegmentator lays them out."""
    results = tmp / "ts_home" / "nnunet" / "results"
    write_model_folder(results, CAT.submodel("organs"), SPEC, dataset_name=TS_ORGANS, trainer=ODD_TRAINER)
    write_model_folder(results, CAT.submodel("muscles"), SPEC,
                       dataset_name="Dataset851_TotalSegMRI_part2_muscles_1088subj")
    # other, unrelated TotalSegmentator tasks sit beside them
    (results / "Dataset291_TotalSegmentator_part1_organs_1559subj").mkdir()
    return tmp / "ts_home"


def test_totalsegmentator_folder_with_nonstandard_trainer_loads(tmp_path):
    home = totalseg_home(tmp_path)
    store = ModelStore([home / "nnunet" / "results"])
    st = {s.submodel: s for s in store.status()}
    assert st["organs"].state == "present" and ODD_TRAINER in st["organs"].path
    assert "non-standard trainer" in st["organs"].detail
    seg = Segmenter(store, device="cpu")
    model = seg.model("organs")
    assert model.trainer_name == ODD_TRAINER
    assert model.folder.parent.name == TS_ORGANS
    res = seg.segment(body_volume("LPS", shape=(20, 18, 12), spacing=(1.5, 1.5, 1.5)), roi_subset=["liver"])
    assert res.structures == {5: "liver"} and set(res.per_model) == {"organs"}


def test_only_organs_and_muscles_present(tmp_path, tiny_models):
    root = tmp_path / "partial"
    root.mkdir()
    for sm in ("organs", "muscles"):
        src = next(tiny_models.glob(f"{CAT.submodel(sm).folder_prefix}*"))
        shutil.copytree(src, root / src.name)
    store = ModelStore([root])
    states = {s.submodel: s.state for s in store.status()}
    assert states == {"organs": "present", "muscles": "present", "tissue_types": "missing",
                      "thigh_shoulder_muscles": "missing", "appendicular_bones": "missing", "face": "missing",
                      "total_fast": "missing"}
    seg = Segmenter(store, device="cpu")
    res = seg.segment(body_volume("RAS", shape=(24, 20, 14), spacing=(1.5, 1.5, 1.5)))
    assert set(res.per_model) == {"organs", "muscles"}
    assert sorted(res.structures) == list(range(1, 51))
    assert set(res.unavailable) == {"tissue_types", "thigh_shoulder_muscles", "appendicular_bones", "face"}
    assert res.labels.max() <= 50
    with pytest.raises(ModelUnavailableError) as ei:
        seg.segment(body_volume(), roi_subset=["liver", "face"])
    assert "face" in ei.value.message and "Dataset856" in ei.value.message and "licensed" in ei.value.message
    with pytest.raises(ModelUnavailableError, match="total_fast"):
        seg.segment(body_volume(), fast=True)


def test_nothing_installed_is_a_clear_error(tmp_path):
    seg = Segmenter(ModelStore([tmp_path]), device="cpu")
    with pytest.raises(ModelUnavailableError, match="mriseg models import"):
        seg.segment(body_volume())


def test_models_import_copies_weights_and_list_shows_present_and_missing(tmp_path, capsys):
    home = totalseg_home(tmp_path)
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "organs" in out and "muscles" in out
    assert (dest / TS_ORGANS / f"{ODD_TRAINER}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth").is_file()
    assert not any(dest.glob("Dataset291_*"))
    assert main(["models", "list", "--models", str(dest)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and ln.split()[0] in
             {sm.name for sm in CAT.submodels + CAT.fast_variants}}
    assert "present" in lines["organs"] and "present" in lines["muscles"]
    assert "missing" in lines["face"] and "missing" in lines["tissue_types"]
    assert "structure(s) unavailable" in out


def test_models_import_link_symlinks_and_a_missing_home_exits_2(tmp_path, capsys):
    home = totalseg_home(tmp_path)
    dest = tmp_path / "linked"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest), "--link"]) == 0
    assert (dest / TS_ORGANS).is_symlink()
    assert main(["models", "import", "--totalseg-home", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_mismatched_model_is_listed_and_refused(tmp_path):
    organs = CAT.submodel("organs")
    write_model_folder(tmp_path, organs, SPEC, labels=organs.labels[:-1])
    store = ModelStore([tmp_path])
    st = store.inspect(organs)
    assert st.state == "mismatched" and "iliac_vena_right" in st.detail
    seg = Segmenter(store, device="cpu")
    with pytest.raises(ModelUnavailableError, match="mismatched"):
        seg.segment(body_volume(), roi_subset=["liver"])


def test_models_import_skips_a_broken_folder_and_imports_the_rest(tmp_path, capsys):
    home = totalseg_home(tmp_path)
    results = home / "nnunet" / "results"
    organs = next(results.glob("Dataset850_*"))
    shutil.rmtree(organs)
    (results / organs.name).mkdir()  # an empty (interrupted) download
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 1
    captured = capsys.readouterr()
    assert "skipped organs" in captured.err and "Traceback" not in captured.err
    assert "muscles" in captured.out and any(dest.glob("Dataset851_*")) and not (dest / organs.name).exists()


def test_a_checkpoint_that_is_not_one_is_mismatched_not_present(tmp_path):
    home = totalseg_home(tmp_path)
    results = home / "nnunet" / "results"
    ckpt = next(results.glob("Dataset850_*/*/fold_0/checkpoint_final.pth"))
    ckpt.write_bytes(b"not a zip: a truncated or HTML error page")
    st = ModelStore([str(results)]).inspect(CAT.submodel("organs"))
    assert st.state == "mismatched" and "not a PyTorch checkpoint" in st.detail


def test_a_reimport_that_fails_half_way_keeps_the_earlier_import(tmp_path, capsys):
    home = totalseg_home(tmp_path)
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0
    ckpt = next(dest.glob(f"{TS_ORGANS}/*/fold_0/checkpoint_final.pth"))
    before = ckpt.read_bytes()
    src_fold = next((home / "nnunet" / "results").glob(f"{TS_ORGANS}/*/fold_0"))
    (src_fold / "checkpoint_best.pth").symlink_to(tmp_path / "gone.pth")  # an interrupted download's dangling link
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert "skipped organs" in err and "an earlier import of it, if any, is kept" in err and "Traceback" not in err
    assert ckpt.read_bytes() == before and ModelStore([dest]).inspect(CAT.submodel("organs")).state == "present"
    assert sorted(p.name for p in dest.iterdir()) == sorted([TS_ORGANS, "Dataset851_TotalSegMRI_part2_muscles_1088subj",
                                                             "mriseg-pins.json"])
    (src_fold / "checkpoint_best.pth").unlink()
    (src_fold / "extra.txt").write_text("new")
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0  # a whole copy replaces it
    assert (ckpt.parent / "extra.txt").read_text() == "new"
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


def test_a_region_based_model_is_refused_rather_than_read_with_wrong_ids():
    from serve.errors import ModelFolderError
    from serve.inference.modelload import read_dataset_labels

    assert read_dataset_labels({"labels": {"background": 0, "liver": [5], "spleen": 1}}) == \
        {"background": 0, "liver": 5, "spleen": 1}
    with pytest.raises(ModelFolderError, match="region-based"):
        read_dataset_labels({"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "et": [3]}})


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_models_import_pins_every_checkpoint_plans_and_dataset_json(tmp_path, capsys):
    import json

    home = totalseg_home(tmp_path)
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0
    pins = json.loads((dest / "mriseg-pins.json").read_text())
    organs_tf = f"{ODD_TRAINER}__nnUNetPlans__3d_fullres"
    assert pins["format"] == "mriseg-pins/1"
    assert set(pins["models"]) == {TS_ORGANS, "Dataset851_TotalSegMRI_part2_muscles_1088subj"}
    organs = pins["models"][TS_ORGANS]
    assert set(organs) == {f"{organs_tf}/plans.json", f"{organs_tf}/dataset.json",
                           f"{organs_tf}/fold_0/checkpoint_final.pth"}
    for rel, sha in organs.items():
        assert _sha256(dest / TS_ORGANS / rel) == sha
    st = ModelStore([dest]).inspect(CAT.submodel("organs"))
    assert st.state == "present" and "unpinned" not in st.detail
    assert st.pinned == {k[len(organs_tf) + 1:]: v for k, v in organs.items()}


@pytest.mark.parametrize("victim", ["fold_0/checkpoint_final.pth", "plans.json", "dataset.json"])
def test_a_file_changed_after_import_is_mismatched_and_never_loaded(tmp_path, capsys, victim):
    import json

    home = totalseg_home(tmp_path)
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0
    path = next(dest.glob(f"{TS_ORGANS}/*/{victim}"))
    if victim.endswith(".json"):  # still valid, still the organs model: only the pin tells
        doc = json.loads(path.read_text())
        doc["tampered"] = True
        path.write_text(json.dumps(doc))
    else:  # other weights of the same shape, as a swapped-in checkpoint would be
        other = write_model_folder(tmp_path / "other", CAT.submodel("organs"), SPEC, seed=5)
        shutil.copyfile(other / "fold_0" / "checkpoint_final.pth", path)
    capsys.readouterr()
    assert main(["models", "list", "--models", str(dest)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("organs "))
    assert "mismatched" in line and victim in line and "pinned model manifest" in line
    seg = Segmenter(ModelStore([dest]), device="cpu")
    with pytest.raises(ModelUnavailableError, match="mismatched"):
        seg.segment(body_volume(), roi_subset=["liver"])
    assert seg.model("muscles").label_names  # the untouched model still loads


def test_a_file_swapped_between_inspect_and_load_is_refused_at_load(tmp_path, capsys):
    """The store hashes what it lists; loading checks the bytes it actually parses once more."""
    from serve.errors import ModelFolderError

    home = totalseg_home(tmp_path)
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0
    store = ModelStore([dest])
    st = store.inspect(CAT.submodel("organs"))
    assert st.state == "present"
    ckpt = Path(st.path) / "fold_0" / "checkpoint_final.pth"
    other = write_model_folder(tmp_path / "other", CAT.submodel("organs"), SPEC, seed=5)
    shutil.copyfile(other / "fold_0" / "checkpoint_final.pth", ckpt)
    with pytest.raises(ModelFolderError, match="does not match its pinned sha256"):
        store.load("organs", st, device="cpu")


def test_a_model_added_beside_pinned_ones_is_not_trusted(tmp_path, capsys):
    home = totalseg_home(tmp_path)
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0
    write_model_folder(dest, CAT.submodel("face"), SPEC)  # copied in by hand, never imported
    st = ModelStore([dest]).inspect(CAT.submodel("face"))
    assert st.state == "mismatched" and "not in the pinned model manifest" in st.detail
    ckpt = next(dest.glob(f"{TS_ORGANS}/*/fold_0"))
    shutil.copyfile(ckpt / "checkpoint_final.pth", ckpt / "checkpoint_best.pth")  # an unpinned extra checkpoint
    st = ModelStore([dest]).inspect(CAT.submodel("organs"))
    assert st.state == "mismatched" and "checkpoint_best.pth is not in the pinned model manifest" in st.detail


def test_a_local_folder_without_pins_is_loaded_as_it_is_with_a_warning(tmp_path, caplog):
    write_model_folder(tmp_path / "mine", CAT.submodel("organs"), SPEC)
    store = ModelStore([tmp_path / "mine"])
    st = store.inspect(CAT.submodel("organs"))
    assert st.state == "present" and st.pinned is None and "unpinned" in st.detail
    assert "no mriseg-pins.json" in caplog.text
    assert store.load("organs", st, device="cpu").label_names[5] == "liver"


def test_the_operators_pins_apply_to_a_local_folder_and_a_bad_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from serve.errors import ModelFolderError

    home = totalseg_home(tmp_path)
    dest = tmp_path / "imported"
    assert main(["models", "import", "--totalseg-home", str(home), "--dest", str(dest)]) == 0
    pins = tmp_path / "operator-pins.json"
    (dest / "mriseg-pins.json").rename(pins)
    assert ModelStore([dest], pins=pins).inspect(CAT.submodel("organs")).pinned is not None
    monkeypatch.setenv("MRISEG_MODEL_PINS", str(pins))
    assert ModelStore([dest]).inspect(CAT.submodel("muscles")).pinned is not None
    with pytest.raises(ModelFolderError, match="cannot be read"):
        ModelStore([dest], pins=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"models": []}')
    capsys.readouterr()
    assert main(["models", "list", "--models", str(dest), "--model-pins", str(tmp_path / "bad.json")]) == 2
    assert "not a pinned model manifest" in capsys.readouterr().err


def test_an_s3_source_without_an_s3_reader_is_refused_naming_the_builder():
    """The inference layer has no S3 client: an ``s3://`` source needs serve.storage.models's store."""
    with pytest.raises(ModelFolderError, match="open_model_store"):
        ModelStore(["s3://models/totalseg/"])
