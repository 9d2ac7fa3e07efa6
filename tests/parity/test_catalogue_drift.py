"""The catalogue (serve/data/catalogue.json) against the installed TotalSegmentator 2.18's own tables.

Read from the real package in the side venv (``.venv-ts``, via tests/parity/ts_driver.py describe),
not from a copy: every name and ID of the 80 structures (total_mr's 50, the licensed MR tasks' 30),
each sub-model's task id, weights folder, trainer, plans, configuration, spacing, sliding-window
step and licence. Skipped where the side venv is absent, except where ``MRISEG_REQUIRE_TOTALSEG=1``.
"""

from __future__ import annotations

import pytest

from serve.catalogue import load_catalogue
from tests.parity import sidevenv as pc

#: our sub-model -> TotalSegmentator's task (and, for total_mr's two models, its part map)
TASK_OF = {"organs": "total_mr", "muscles": "total_mr", "total_fast": "total_mr",
           "tissue_types": "tissue_types_mr", "thigh_shoulder_muscles": "thigh_shoulder_muscles_mr",
           "appendicular_bones": "appendicular_bones_mr", "face": "face_mr"}


def ints(d: dict) -> dict[int, str]:
    return {int(k): v for k, v in d.items()}


@pytest.fixture(scope="module")
def ts() -> dict:
    pc.require_side_venv()
    d = pc.describe()
    assert d["version"] == "2.18.0", f"the side venv has TotalSegmentator {d['version']}, the catalogue follows 2.18.0"
    return d


@pytest.fixture(scope="module")
def cat():
    return load_catalogue()


def test_every_submodel_has_a_totalsegmentator_task(cat):
    assert {sm.name for sm in cat.submodels + cat.fast_variants} == set(TASK_OF)


def test_merged_ids_1_to_50_are_total_mrs_class_map(ts, cat):
    """Merged ids 1-50 are TotalSegmentator's class_map["total_mr"], name for name."""
    theirs = ints(ts["class_map"]["total_mr"])
    assert sorted(theirs) == list(range(1, 51))
    assert {i: cat.structures[i] for i in range(1, 51)} == theirs


def test_total_mr_parts_are_models_850_and_851(ts, cat):
    """Each part's local ids (what the model's dataset.json says) are ours, and map to the same merged ids."""
    total = {v: k for k, v in ints(ts["class_map"]["total_mr"]).items()}
    parts = ts["class_map_parts_mr"]
    assert ints(ts["map_taskid_to_partname_mr"]) == {850: "class_map_part_organs", 851: "class_map_part_muscles"}
    for tid, part in ints(ts["map_taskid_to_partname_mr"]).items():
        sm = cat.by_task_id(tid)
        theirs = ints(parts[part])
        assert dict(enumerate(sm.labels, 1)) == theirs, sm.name
        assert sm.global_ids == {name: total[name] for name in theirs.values()}, sm.name


def test_fast_model_is_total_mr(ts, cat):
    fast = cat.by_task_id(852)
    assert dict(enumerate(fast.labels, 1)) == ints(ts["class_map"]["total_mr"])
    assert fast.global_ids == {v: k for k, v in ints(ts["class_map"]["total_mr"]).items()}


@pytest.mark.parametrize("submodel", ["tissue_types", "thigh_shoulder_muscles", "appendicular_bones", "face"])
def test_a_licensed_tasks_class_map_is_the_submodels_labels_in_order(ts, cat, submodel):
    """A licensed task's class map is the sub-model's labels in order (local id i -> merged id start + i - 1),
    and its auxiliary labels are none of them (they are dropped by name)."""
    sm = cat.submodel(submodel)
    task = TASK_OF[submodel]
    assert dict(enumerate(sm.labels, 1)) == ints(ts["class_map"][task])
    assert not set(ts["auxiliary"].get(task, {}).values()) & set(sm.labels)


def test_the_eighty_structures_are_the_tasks_classes_each_once(ts, cat):
    """The 80 merged structures are exactly the union of those tasks' classes, each once."""
    theirs = [n for t in sorted(set(TASK_OF.values())) for n in ts["class_map"][t].values()]
    assert len(theirs) == 80 and sorted(theirs) == sorted(cat.structures.values())


@pytest.mark.parametrize("submodel", sorted(TASK_OF))
def test_each_submodels_settings_equal_its_totalsegmentator_task_config(ts, cat, submodel):
    """Task id, weights folder, trainer, plans, configuration, spacing, tile step, licence."""
    sm = cat.submodel(submodel)
    task = TASK_OF[submodel]
    raw = ts["task_configs"][task]
    if "sub_modes" in raw:
        mode = "fast" if sm.is_fast_variant else "default"
        cfg = raw["sub_modes"][mode]
        tids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    else:
        cfg, tids = raw, [raw["task_id"]]
    default = ts["default_config"]
    assert sm.task_id in tids
    assert ts["weights"][str(sm.task_id)]["foldername"].startswith(sm.folder_prefix)
    assert sm.trainer == cfg["trainer"]
    assert sm.configuration == cfg.get("model", default["model"])
    assert sm.plans == (cfg.get("plans", default["plans"]) or "nnUNetPlans")  # python_api's default plans
    assert default["folds"] == [0] and "folds" not in cfg
    assert sm.spacing_mm == cfg["resample"]
    step = ts["tile_step_size"]
    assert sm.tile_step_size == (step["step"] if task in step["tasks"] else step["else"])
    commercial = set(ts["commercial_models"].values())
    assert sm.licence == ("licensed" if sm.task_id in commercial else "open")
    assert not raw.get("crop") and not raw.get("cascade"), f"{task} crops or cascades: mriseg does neither"
