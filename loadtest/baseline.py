"""The sequential baseline: the six sub-models run one after another, as TotalSegmentator runs them.

For one input file, TotalSegmentator (``nnUNet_predict_image``):

1. reorients the image to the closest canonical orientation and resamples it
   to 1.5 mm (``-ro``: spline order 1 by default, ``mode="nearest"``, the result
   truncated to int32), and saves it as ``s01_0000.nii.gz``;
2. for each sub-model in turn: builds an ``nnUNetPredictor`` (loads the
   weights) and calls nnunetv2's own file-based prediction on that folder,
   which reads the file, preprocesses (crop, normalise, resample to the plans'
   spacing), runs the sliding window and exports a label NIfTI;
3. reads the label maps back and combines them into one map with global ids;
4. resamples it back to the input grid (order 0), undoes the reorientation and
   saves it.

TotalSegmentator's settings: tile step 0.8 for 850/851, 0.5 for the others
(the catalogue's ``tile_step_size``), Gaussian weighting, no mirroring (the
MRI models were trained without it).

Differences from the real CLI, all of which make this baseline faster or equal:

* the predictor is built by ``serve.inference.modelload.load_model`` rather than
  ``initialize_from_trained_model_folder``: the same nnunetv2 network class
  from the same plans, the same checkpoint file, the same
  ``nnUNetPredictor``; only nnunetv2's trainer-class search (which imports
  every trainer module) is skipped, because it crashes beside the CPU torch
  build. That search only costs the CLI time.
* nnU-Net's worker processes: ``predict_from_files`` spawns a preprocessing
  worker and an export pool per call. On 2 cores the honest fast setting is one
  of each (``num_processes_preprocessing=1, num_processes_segmentation_export=1``);
  ``mode="sequential"`` uses nnunetv2's ``predict_from_files_sequential``
  (no worker processes at all), which :func:`pick_mode` measures and prefers
  when it is faster.
* no TotalSegmentator import, licence check or statistics.

Precision: nnU-Net runs CUDA inference under fp16 autocast and CPU inference
in fp32. ``precision="bf16"`` gives the baseline the same reduced precision as
the server by wrapping nnunetv2's prediction in ``torch.autocast(cpu, bfloat16)``
(CUDA: ``torch.autocast(cuda, bfloat16)``; ``fp16`` on CUDA is nnU-Net's default).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # for the CLI-like run: import time counts

import argparse
import contextlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER

MODES = ("files", "sequential")


@dataclass
class BaselineTimings:
    """Seconds per phase of one baseline request."""

    prepare_s: float = 0.0                                # canonical + resample + save
    load_s: dict[str, float] = field(default_factory=dict)  # per sub-model (0 with cached models)
    predict_s: dict[str, float] = field(default_factory=dict)  # nnunetv2 file prediction incl. export
    combine_s: float = 0.0                                # read back, merge, resample back, save
    total_s: float = 0.0
    import_s: float = 0.0                                  # only in the CLI-like subprocess

    @property
    def total_without_loading_s(self) -> float:
        return self.total_s - sum(self.load_s.values())


def precision_context(precision: str, device_type: str):
    """Autocast for ``bf16``/``fp16``; nothing for ``fp32`` (nnU-Net's own CPU behaviour)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type, dtype=dtype)


def resample_like_totalseg(img, spacing_mm: float, order: int = DEFAULT_RESAMPLING_ORDER):
    """TotalSegmentator 2.18's ``change_spacing(img, spacing, order=order, dtype=np.int32)``, step for step.

    Args:
        img: The canonical input image, whose data TotalSegmentator has already copied to float64
            (``nib.Nifti1Image(img.get_fdata(), affine)``).
        spacing_mm: The isotropic target spacing.
        order: The spline order (``-ro``; 1 is TotalSegmentator's default).

    Returns:
        ``img`` itself where its spacing already is the target (no resampling and no cast), else the
        ``mode="nearest"`` zoom truncated to int32, with each affine column divided by its zoom.
    """
    import nibabel as nib
    from scipy import ndimage

    data = img.get_fdata()
    img_spacing = np.array(img.header.get_zooms()[:3])
    new_spacing = np.array([spacing_mm] * 3)
    if np.array_equal(img_spacing, new_spacing):
        return img
    zoom = img_spacing / new_spacing
    out = ndimage.zoom(data, zoom, order=order, mode="nearest").astype(np.int32)
    affine = img.affine.copy()
    for axis in range(3):
        affine[:3, axis] = affine[:3, axis] / zoom[axis]
    return nib.Nifti1Image(out, affine)


def resample_to_shape(data: np.ndarray, affine: np.ndarray, target_shape, order: int):
    from scipy import ndimage

    factors = np.array(target_shape) / np.array(data.shape)
    return ndimage.zoom(data, factors, order=order, mode="nearest"), affine


def load_models(models_root: str | Path, names: Iterable[str], device: str = "auto") -> dict:
    """Load sub-models by name, as the cached-models loop keeps them."""
    from serve.catalogue import load_catalogue
    from serve.inference.modelstore import ModelStore

    cat = load_catalogue()
    store = ModelStore([str(models_root)], catalogue=cat)
    out = {}
    for name in names:
        sm = cat.submodel(name)
        out[name] = store.load(sm, device=device, use_mirroring=False)
    return out


def _predict(loaded, in_dir: Path, out_dir: Path, mode: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = loaded.predictor
    if mode == "files":
        p.predict_from_files(str(in_dir), str(out_dir), save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
    elif mode == "sequential":
        p.predict_from_files_sequential(str(in_dir), str(out_dir), save_probabilities=False, overwrite=True)
    else:
        raise ValueError(f"mode must be one of {MODES}")


def run_baseline(input_path: str | Path, models_root: str | Path, workdir: str | Path, *,
                 names: Iterable[str] | None = None, precision: str = "fp32", device: str = "auto",
                 cached: dict | None = None, mode: str = "sequential",
                 output_path: str | Path | None = None,
                 resampling_order: int = DEFAULT_RESAMPLING_ORDER) -> BaselineTimings:
    """One baseline request; loads each model just before use unless ``cached`` holds them.

    ``resampling_order`` is TotalSegmentator's ``-ro`` (the input's spline order), default 1 as in 2.18.
    """
    import nibabel as nib
    import torch

    from serve.catalogue import load_catalogue
    from serve.inference.modelload import pick_device

    cat = load_catalogue()
    names = list(names) if names is not None else [sm.name for sm in cat.submodels]
    dev_type = pick_device(device).type
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    in_dir = workdir / "in"
    in_dir.mkdir(parents=True)
    t = BaselineTimings()
    t_start = time.perf_counter()

    img_orig = nib.load(str(input_path))
    img = nib.as_closest_canonical(nib.Nifti1Image(img_orig.get_fdata(), img_orig.affine))
    spacing = cat.submodel(names[0]).spacing_mm
    img_rs = resample_like_totalseg(img, spacing, order=resampling_order)
    nib.save(img_rs, str(in_dir / "s01_0000.nii.gz"))
    t.prepare_s = time.perf_counter() - t_start

    for name in names:
        t0 = time.perf_counter()
        loaded = cached[name] if cached is not None else load_models(models_root, [name], device)[name]
        t.load_s[name] = 0.0 if cached is not None else time.perf_counter() - t0
        t0 = time.perf_counter()
        with precision_context(precision, dev_type):
            _predict(loaded, in_dir, workdir / "parts" / name, mode)
        t.predict_s[name] = time.perf_counter() - t0
        if cached is None:
            del loaded  # the CLI drops each predictor before loading the next
            if dev_type == "cuda":
                torch.cuda.empty_cache()

    t0 = time.perf_counter()
    combined = np.zeros(img_rs.shape, dtype=np.uint8)
    # TotalSegmentator writes each part's classes into one map; the catalogue's
    # precedence decides overlaps (higher rank last).
    for name in sorted(names, key=cat.precedence_rank):
        sm = cat.submodel(name)
        seg = np.asanyarray(nib.load(str(workdir / "parts" / name / "s01.nii.gz")).dataobj)
        for local, gid in enumerate(sm.global_ids.values(), start=1):
            combined[seg == local] = gid
    back, _ = resample_to_shape(combined, img.affine, img.shape, order=0)
    out_img = nib.Nifti1Image(back.astype(np.uint8), img.affine)
    # undo_canonical: back to the input's own orientation
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                           nib.orientations.io_orientation(img_orig.affine))
    out_img = out_img.as_reoriented(ornt)
    nib.save(out_img, str(output_path or workdir / "segmentation.nii.gz"))
    t.combine_s = time.perf_counter() - t0
    t.total_s = time.perf_counter() - t_start
    return t


def main(argv: list[str] | None = None) -> None:
    """CLI-like run in a fresh process: imports + per-model load + predict + combine."""
    ap = argparse.ArgumentParser(description="Sequential TotalSegmentator-style baseline (one request)")
    ap.add_argument("--input", required=True)
    ap.add_argument("--models", required=True, help="folder with the DatasetNNN_* model folders")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", default="sequential", choices=MODES)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--names", default=None, help="comma-separated sub-models (default: the six)")
    ap.add_argument("--json", default=None, help="write the timings here")
    ap.add_argument("-ro", "--resampling-order", type=int, default=DEFAULT_RESAMPLING_ORDER, choices=range(6),
                    help="spline order of the input's resampling (TotalSegmentator's -ro; default 1)")
    args = ap.parse_args(argv)

    from serve.inference.modelload import configure_threads

    configure_threads(args.threads or os.cpu_count())
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401 - part of the CLI's import cost

    import_s = time.perf_counter() - _T0
    names = args.names.split(",") if args.names else None
    with contextlib.redirect_stdout(sys.stderr):  # nnunetv2 prints progress
        t = run_baseline(args.input, args.models, args.workdir, names=names, precision=args.precision,
                         device=args.device, mode=args.mode, resampling_order=args.resampling_order)
    t.import_s = import_s
    out = asdict(t) | {"total_without_loading_s": t.total_without_loading_s}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
