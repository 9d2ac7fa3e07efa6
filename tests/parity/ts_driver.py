"""Run the real TotalSegmentator 2.18 in the side venv (``.venv-ts``) for the parity tests.

This file is executed by ``.venv-ts/bin/python``, never imported by the test process: it imports
the installed ``totalsegmentator`` package, which .venv does not have. Commands:

- ``describe``: print, as JSON, the package's own tables the catalogue must match (class maps,
  task configs, weights folder names, licensed tasks).
- ``run JOBS.json``: run each job in order, in this one process (TotalSegmentator's imports and
  nnU-Net's are paid once). A job is one of

  - ``{"kind": "cli", "argv": [...]}``: ``TotalSegmentator`` with these arguments, i.e. its
    console script's ``main()`` (``totalsegmentator.bin.TotalSegmentator:main``);
  - ``{"kind": "task", "task": "face_mr", "input": ..., "output": ...}``: a licensed MR task through
    ``nnunet.nnUNet_predict_image``, the function ``python_api.totalsegmentator`` calls for it, with
    the task's own ``TASK_CONFIGS`` entry. The python API's licence check is not passed (no licence
    number is set, none is faked): it guards the download of licensed weights, and these weights
    are planted random ones;
  - ``{"kind": "float_reference", "input": ..., "output": ...}``: total_mr on the input's float
    intensities, i.e. TotalSegmentator's own steps with its int32 cast left out: its
    ``as_closest_canonical`` and ``change_spacing`` (order 1, no dtype) to 1.5 mm, its
    ``nnUNet_predict_image`` on that image, its ``change_spacing`` (order 0) and
    ``undo_canonical`` back to the input grid.

One adaptation, the same for every job: nnU-Net's trainer-class search imports every module under
``nnunetv2/training/nnUNetTrainer``, and its ``primus`` trainers import timm, which imports
torchvision; PyPI's torchvision is built for CUDA torch and fails to import beside CPU torch. So
the two trainer classes the MR tasks name are put into TotalSegmentator's own ``custom_trainers``
table (the hook its ``nnunet.py`` consults before that search), as the classes that search would
return: each name is defined by exactly one module of nnunetv2 (checked below).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# The MR tasks' trainers -> the nnunetv2 module that defines each (the one the class search finds).
TRAINER_MODULES = {
    "nnUNetTrainer_2000epochs_NoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainer_DASegOrd0_NoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDAOrd0",
}

#: TotalSegmentator's MR tasks that mriseg serves (task name -> task id); total_mr is 850 + 851 (852 fast)
MR_TASKS = ("total_mr", "tissue_types_mr", "thigh_shoulder_muscles_mr", "appendicular_bones_mr", "face_mr")


def describe() -> dict:
    """The package's tables that mriseg's catalogue mirrors, JSON-ready (int keys become strings)."""
    from totalsegmentator import map_tasks_config as mtc
    from totalsegmentator import map_to_binary as m2b

    tasks = {t: mtc.TASK_CONFIGS[t] for t in MR_TASKS}
    ids: set[int] = set()
    for cfg in tasks.values():
        for sub in cfg.get("sub_modes", {"": cfg}).values():
            tid = sub["task_id"]
            ids.update(tid if isinstance(tid, list) else [tid])
    aux = {t: m2b.class_map[f"{t}_auxiliary"] for t in MR_TASKS if f"{t}_auxiliary" in m2b.class_map}
    return {
        "version": _version(),
        "class_map": {t: m2b.class_map[t] for t in MR_TASKS},
        "auxiliary": aux,
        "class_map_parts_mr": m2b.class_map_parts_mr,
        "map_taskid_to_partname_mr": m2b.map_taskid_to_partname_mr,
        "task_configs": tasks,
        "default_config": mtc.DEFAULT_CONFIG,
        "weights": {tid: mtc.TASK_ID_WEIGHTS_CONFIGS[tid] for tid in sorted(ids)},
        "commercial_models": m2b.commercial_models,
        "tile_step_size": tile_step_sizes(),
    }


def tile_step_sizes() -> dict:
    """nnUNet_predict_image's sliding-window step: ``{"tasks": [...], "step": 0.8, "else": 0.5}``, read from
    its source (it is code there, not a table): ``if task_name in [...]: step_size = A else: step_size = B``."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec("totalsegmentator.nnunet").origin).read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "task_name"
                and len(node.body) == 1 and isinstance(node.body[0], ast.Assign)
                and getattr(node.body[0].targets[0], "id", None) == "step_size"):
            return {"tasks": ast.literal_eval(node.test.comparators[0]),
                    "step": ast.literal_eval(node.body[0].value),
                    "else": ast.literal_eval(node.orelse[0].value)}
    raise SystemExit("no 'if task_name in [...]: step_size = ...' in totalsegmentator/nnunet.py: read it again")


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("TotalSegmentator")


def register_trainers() -> None:
    """Put the MR trainers into TotalSegmentator's ``custom_trainers`` (see the module docstring)."""
    import importlib

    import nnunetv2
    from totalsegmentator import nnunet as ts_nnunet

    root = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    for name, module in TRAINER_MODULES.items():
        defining = [p for p in root.rglob("*.py") if f"class {name}(" in p.read_text(encoding="utf-8")]
        expected = root.parent.parent.parent.joinpath(*module.split(".")).with_suffix(".py")
        if defining != [expected]:
            raise SystemExit(f"{name} is defined in {defining}, not only in {expected}: update TRAINER_MODULES")
        ts_nnunet.custom_trainers[name] = getattr(importlib.import_module(module), name)


def run_cli(argv: list[str]) -> None:
    from totalsegmentator.bin import TotalSegmentator as cli

    saved = sys.argv
    sys.argv = ["TotalSegmentator", *argv]
    try:
        cli.main()
    finally:
        sys.argv = saved


def task_config(task: str) -> dict:
    """``python_api.get_task_config`` for a task without sub-modes, less its licence check."""
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG, TASK_CONFIGS

    raw = TASK_CONFIGS[task]
    config = DEFAULT_CONFIG.copy()
    config.update({k: v for k, v in raw.items() if k not in ("disallow_fast", "commercial", "info_msg")})
    config["plans"] = "nnUNetPlans"  # python_api.totalsegmentator's default, passed to get_task_config
    return config


def run_task(task: str, input_path: str, output_path: str) -> None:
    from totalsegmentator.config import setup_nnunet, setup_totalseg

    setup_nnunet()
    setup_totalseg()
    from totalsegmentator.nnunet import nnUNet_predict_image

    c = task_config(task)
    if c["crop"] is not None or c["cascade"] is not None:
        raise SystemExit(f"{task} crops or cascades; this driver does not run that")
    nnUNet_predict_image(Path(input_path), Path(output_path), c["task_id"], model=c["model"], folds=c["folds"],
                         trainer=c["trainer"], tta=False, multilabel_image=True, resample=c["resample"],
                         task_name=task, nr_threads_resampling=1, nr_threads_saving=1, quiet=True,
                         device="cpu", resampling_order=1, plans=c["plans"], output_task_name=task)


def run_float_reference(input_path: str, output_path: str) -> None:
    import nibabel as nib
    import numpy as np
    from totalsegmentator.alignment import as_closest_canonical, undo_canonical
    from totalsegmentator.config import setup_nnunet, setup_totalseg
    from totalsegmentator.resampling import change_spacing

    setup_nnunet()
    setup_totalseg()
    from totalsegmentator.nnunet import nnUNet_predict_image
    from totalsegmentator.python_api import get_task_config

    c = get_task_config("total_mr", quiet=True, plans="nnUNetPlans")
    orig = nib.load(input_path)
    img = as_closest_canonical(nib.Nifti1Image(orig.get_fdata(), orig.affine))
    rsp = change_spacing(img, c["resample"], order=1, nr_cpus=1)  # as nnUNet_predict_image, less dtype=np.int32
    pred, _, _ = nnUNet_predict_image(rsp, None, c["task_id"], model=c["model"], folds=c["folds"],
                                      trainer=c["trainer"], tta=False, multilabel_image=True, resample=None,
                                      task_name="total_mr", nr_threads_resampling=1, nr_threads_saving=1,
                                      quiet=True, device="cpu", resampling_order=1, plans=c["plans"])
    back = change_spacing(pred, c["resample"], img.shape, order=0, dtype=np.uint8, nr_cpus=1,
                          force_affine=img.affine)
    out = undo_canonical(back, orig)
    nib.save(nib.Nifti1Image(np.asanyarray(out.dataobj).astype(np.uint8), out.affine), output_path)


def run(jobs_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    register_trainers()
    for job in jobs:
        t = time.perf_counter()
        if job["kind"] == "cli":
            run_cli(job["argv"])
        elif job["kind"] == "task":
            run_task(job["task"], job["input"], job["output"])
        elif job["kind"] == "float_reference":
            run_float_reference(job["input"], job["output"])
        else:
            raise SystemExit(f"unknown job kind {job['kind']!r}")
        print(f"ts_driver: {job['kind']} {job.get('name', '')} took {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":  # nnU-Net's workers are spawned: they re-import this file, which must do nothing then
    if sys.argv[1:2] == ["describe"]:
        print(json.dumps(describe()))
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(sys.argv[2])
    else:
        raise SystemExit("usage: ts_driver.py describe | run JOBS.json")
