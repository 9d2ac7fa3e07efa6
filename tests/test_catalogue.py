"""The catalogue: 80 unique structures, TotalSegmentator's IDs, plans for roi_subset and fast mode."""

from __future__ import annotations

import pytest

from serve.catalogue import load_catalogue
from serve.errors import UnknownStructureError

# TotalSegmentator's class_map["total_mr"] (map_to_binary.py), ids 1-50, written out independently
TOTAL_MR = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
    "lung_left lung_right esophagus small_bowel duodenum colon urinary_bladder prostate sacrum vertebrae "
    "intervertebral_discs spinal_cord heart aorta inferior_vena_cava portal_vein_and_splenic_vein "
    "iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right "
    "scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right hip_left hip_right "
    "gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left "
    "gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain").split()


@pytest.fixture(scope="module")
def cat():
    return load_catalogue()


def test_eighty_unique_names_with_contiguous_ids(cat):
    s = cat.structures
    assert len(s) == 80 and sorted(s) == list(range(1, 81))
    assert len(set(s.values())) == 80


@pytest.mark.parametrize("submodel,first,last", [
    ("organs", 1, 29), ("muscles", 30, 50), ("tissue_types", 51, 53),
    ("thigh_shoulder_muscles", 54, 71), ("appendicular_bones", 72, 79), ("face", 80, 80)])
def test_each_submodel_owns_a_contiguous_range_of_merged_ids(cat, submodel, first, last):
    ids = sorted(cat.submodel(submodel).global_ids.values())
    assert ids == list(range(first, last + 1))


def test_first_fifty_are_totalsegmentators_total_mr(cat):
    assert [cat.structures[i] for i in range(1, 51)] == TOTAL_MR


def test_each_task_id_has_its_tile_step_trainer_spacing_and_licence(cat):
    by = {sm.task_id: sm for sm in cat.submodels + cat.fast_variants}
    assert sorted(by) == [850, 851, 852, 855, 856, 857, 925]
    for tid in (850, 851, 852):
        assert by[tid].tile_step_size == 0.8
    for tid in (855, 856, 857, 925):
        assert by[tid].tile_step_size == 0.5
    assert by[925].trainer == "nnUNetTrainer_DASegOrd0_NoMirroring"
    assert by[852].spacing_mm == 3.0 and all(by[t].spacing_mm == 1.5 for t in (850, 851, 855, 856, 857, 925))
    assert {by[t].licence for t in (850, 851, 852)} == {"open"}


def test_fast_variant_covers_labels_1_to_50(cat):
    fv = cat.fast_variants[0]
    assert set(fv.replaces) == {"organs", "muscles"}
    assert cat.plan(fast=True) == [fv]
    assert [sm.name for sm in cat.plan(["liver"], fast=True)] == ["total_fast"]
    with pytest.raises(UnknownStructureError, match="fast mode only covers"):
        cat.plan(["face"], fast=True)


def test_plan_runs_only_needed_submodels(cat):
    assert [sm.name for sm in cat.plan(["liver", "femur_left"])] == ["organs", "muscles"]
    assert [sm.name for sm in cat.plan(["face", "tibia"])] == ["appendicular_bones", "face"]
    assert len(cat.plan(None)) == 6


def test_unknown_structure_lists_valid_names(cat):
    with pytest.raises(UnknownStructureError) as ei:
        cat.plan(["liver", "livr"])
    msg = str(ei.value)
    assert "livr" in msg and "Valid names:" in msg and "spleen" in msg and "face" in msg
    assert ei.value.status == 400


def test_precedence_specific_beats_coarse(cat):
    rank = cat.precedence_rank
    assert rank("tissue_types") < min(rank(n) for n in ("organs", "muscles", "thigh_shoulder_muscles",
                                                        "appendicular_bones"))
