"""Synthetic phantoms: deterministic, complete, lateralised in world coordinates, truth on the image grid."""

from __future__ import annotations

import numpy as np
import pytest

from serve.catalogue import load_catalogue
from serve.phantoms import DEMO_SEED_BASE, HELDOUT_SEEDS, TEST_SEEDS, TRAIN_SEEDS, make_phantom


@pytest.fixture(scope="module")
def full():
    return make_phantom(3, full_fov=True, spacing_mm=1.5, axcodes="RAS")


def test_same_seed_same_phantom_and_different_seed_differs():
    a, b, c = make_phantom(11), make_phantom(11), make_phantom(12)
    assert np.array_equal(a.volume.data, b.volume.data)
    assert np.array_equal(a.volume.affine, b.volume.affine)
    assert np.array_equal(a.truth, b.truth)
    assert a.volume.data.shape != c.volume.data.shape or not np.array_equal(a.volume.data, c.volume.data)


def test_heldout_seeds_are_outside_the_training_range():
    assert not set(HELDOUT_SEEDS) & set(TRAIN_SEEDS)


def test_test_seeds_are_neither_training_nor_validation_nor_demo_seeds():
    assert TEST_SEEDS and not any(s in TRAIN_SEEDS for s in TEST_SEEDS)
    assert not set(TEST_SEEDS) & set(HELDOUT_SEEDS)
    assert DEMO_SEED_BASE + 9 not in TEST_SEEDS  # demo_volume()'s seed


def test_full_fov_phantom_has_all_80_structures(full):
    cat = load_catalogue()
    for sm in cat.submodels:
        present = set(np.unique(full.truth_per_model[sm.name]).tolist()) - {0}
        expected = set(sm.global_ids.values())
        assert present == expected, f"{sm.name}: missing {[cat.structures[g] for g in expected - present]}"
    small = {n: int((full.truth_per_model[cat.owner(n).name] == cat.structure_ids[n]).sum())
             for n in ("adrenal_gland_left", "intervertebral_discs", "phalanges_feet")}
    assert all(v > 0 for v in small.values()), small


def test_merged_truth_applies_precedence(full):
    cat = load_catalogue()
    ids = cat.structure_ids
    muscle = full.truth_per_model["tissue_types"] == ids["skeletal_muscle"]
    glut = full.truth_per_model["muscles"] == ids["gluteus_maximus_left"]
    assert glut.any() and np.all(muscle[glut])          # coarse class contains the named muscle
    assert np.all(full.truth[glut] == ids["gluteus_maximus_left"])  # ...and loses to it in the merged map


def _world_centroid(ph, owner: str, name: str) -> np.ndarray:
    ijk = np.argwhere(ph.truth_per_model[owner] == load_catalogue().structure_ids[name])
    assert ijk.size, name
    return ph.volume.affine[:3, :3] @ ijk.mean(0) + ph.volume.affine[:3, 3]


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "SLA", "ASL"])
def test_truth_on_volume_grid_and_left_is_patient_left(axcodes):
    ph = make_phantom(5, axcodes=axcodes, full_fov=True)
    assert ph.truth.shape == ph.volume.data.shape
    assert all(m.shape == ph.volume.data.shape for m in ph.truth_per_model.values())
    import nibabel as nib

    assert "".join(nib.aff2axcodes(ph.volume.affine)) == axcodes == ph.axcodes
    for base in ("kidney", "femur", "lung", "humerus", "adrenal_gland"):
        owner = "organs" if base in ("kidney", "lung", "adrenal_gland") else "muscles"
        xs = {side: _world_centroid(ph, owner, f"{base}_{side}")[0] for side in ("left", "right")}
        # RAS+: world x grows toward the patient's right, so the patient's left is at -x
        assert xs["left"] < 0 < xs["right"], (base, xs)
    # the unpaired organs on their true sides: liver, gallbladder and inferior vena cava on the patient's
    # right, spleen and stomach on the left
    for name in ("liver", "gallbladder", "inferior_vena_cava"):
        assert _world_centroid(ph, "organs", name)[0] > 0, name
    for name in ("spleen", "stomach"):
        assert _world_centroid(ph, "organs", name)[0] < 0, name


def test_random_orientations_cover_both_left_right_directions():
    import nibabel as nib

    firsts = {"".join(nib.aff2axcodes(make_phantom(s, spacing_mm=3.0).volume.affine)).strip("PAIS")
              for s in range(12)}
    assert firsts == {"L", "R"}


def test_random_contrast_includes_inverted_fat():
    cat = load_catalogue()
    fat_id = cat.structure_ids["subcutaneous_fat"]
    mus_id = cat.structure_ids["skeletal_muscle"]
    order = set()
    for contrast in ("t1", "t2"):
        ph = make_phantom(21, contrast=contrast, full_fov=True, noise=0.0)
        d, t = ph.volume.data, ph.truth_per_model["tissue_types"]
        order.add(np.median(d[t == fat_id]) > np.median(d[t == mus_id]))
        assert np.isfinite(d).all() and d.dtype == np.float32
    assert order == {True}  # fat brighter than muscle in both; t2 maps differ below
    a = make_phantom(21, contrast="t1", full_fov=True).volume.data
    b = make_phantom(21, contrast="t2", full_fov=True).volume.data
    assert not np.allclose(a, b)
