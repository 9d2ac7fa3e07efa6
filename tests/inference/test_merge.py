"""Local -> global ids by name, auxiliary labels dropped, precedence, lossless per-structure form."""

from __future__ import annotations

import numpy as np
import pytest

from serve.catalogue import load_catalogue
from serve.errors import ModelFolderError
from serve.inference.merge import merge
from serve.inference.modelfolder import UNetSpec, write_model_folder
from serve.inference.modelload import load_model

SPEC = UNetSpec(features=(4, 8), patch_size=(16, 16, 16))
CAT = load_catalogue()
IDS = CAT.structure_ids


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Real model folders whose dataset.json differs from the catalogue's order and carries extras."""
    root = tmp_path_factory.mktemp("odd")
    face = CAT.submodel("face")
    tissue = CAT.submodel("tissue_types")
    muscles = CAT.submodel("muscles")
    folders = {
        # TotalSegmentator's face model carries brain and liver as auxiliary classes
        "face": write_model_folder(root, face, SPEC, extra_labels=("brain", "liver")),
        # label order reversed: local ids differ from catalogue order, names still match
        "tissue_types": write_model_folder(root, tissue, SPEC, labels=list(reversed(tissue.labels))),
        "muscles": write_model_folder(root, muscles, SPEC),
    }
    return {n: load_model(f, CAT.submodel(n), device="cpu") for n, f in folders.items()}


def test_auxiliary_labels_are_dropped_by_name(odd_models):
    face = odd_models["face"]
    assert set(face.dropped_labels) == {"brain", "liver"}
    local = np.array([[[0, 1, 2, 3]]], np.uint8)  # background, face, brain (aux), liver (aux)
    m = merge({"face": local}, {"face": face})
    assert m.per_model["face"].tolist() == [[[0, IDS["face"], 0, 0]]]
    assert m.structures == {80: "face"}
    # the auxiliary "brain"/"liver" never turn into the catalogue's brain (50) or liver (5)
    assert not np.isin(m.labels, [IDS["brain"], IDS["liver"]]).any()


def test_labels_map_by_name_not_position(odd_models):
    tissue = odd_models["tissue_types"]
    assert tissue.label_names[1] == "skeletal_muscle"
    m = merge({"tissue_types": np.array([[[1, 2, 3]]], np.uint8)}, {"tissue_types": tissue})
    assert m.labels.tolist() == [[[IDS["skeletal_muscle"], IDS["torso_fat"], IDS["subcutaneous_fat"]]]]


def test_a_specific_label_beats_a_coarse_one_and_both_masks_stay_whole(odd_models):
    shape = (4, 4, 4)
    tissue = np.zeros(shape, np.uint8)
    tissue[:, :, :] = 1  # skeletal_muscle everywhere (local 1 after the reversal)
    muscles = np.zeros(shape, np.uint8)
    muscles[:2] = CAT.submodel("muscles").labels.index("autochthon_left") + 1
    models = {k: odd_models[k] for k in ("tissue_types", "muscles")}
    m = merge({"tissue_types": tissue, "muscles": muscles}, models)
    # the named muscle wins over the coarse tissue class in the single-label map
    assert np.all(m.labels[:2] == IDS["autochthon_left"])
    assert np.all(m.labels[2:] == IDS["skeletal_muscle"])
    # ... and skeletal_muscle stays whole in the lossless form
    assert m.mask("skeletal_muscle").all()
    assert m.mask("autochthon_left").sum() == 2 * 16
    # input order does not matter
    m2 = merge({"muscles": muscles, "tissue_types": tissue}, models)
    assert np.array_equal(m.labels, m2.labels)


def test_roi_subset_keeps_only_requested(odd_models):
    local = np.array([[[1, 2, 3]]], np.uint8)
    m = merge({"tissue_types": local}, {"tissue_types": odd_models["tissue_types"]}, roi_subset=["torso_fat"])
    assert m.structures == {IDS["torso_fat"]: "torso_fat"}
    assert m.labels.tolist() == [[[0, IDS["torso_fat"], 0]]]


@pytest.mark.parametrize("label", [300, 10])  # 10: past face's few ids but inside the 256-entry lookup table
def test_label_outside_dataset_json_is_an_error(odd_models, label):
    assert label > max(odd_models["face"].label_names)
    local = np.zeros((2, 2, 2), np.uint16)
    local[0, 0, 0] = label
    with pytest.raises(ValueError, match="not in its dataset.json"):
        merge({"face": local}, {"face": odd_models["face"]})


def test_model_lacking_a_catalogue_label_is_refused(tmp_path):
    organs = CAT.submodel("organs")
    folder = write_model_folder(tmp_path, organs, SPEC, labels=[n for n in organs.labels if n != "pancreas"])
    with pytest.raises(ModelFolderError, match="lacks catalogue label.*pancreas"):
        load_model(folder, organs, device="cpu")
