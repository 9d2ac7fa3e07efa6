"""Write a segmentation result to a folder, in TotalSegmentator's layouts.

- ``segmentations.nii.gz``: the 80-label (precedence-merged) map with the XML
  label table extension (TotalSegmentator's ``--ml`` output);
- ``segmentations/<structure>.nii.gz``: one binary mask per structure, each
  whole even where structures overlap (TotalSegmentator's default layout);
- ``statistics.json`` and ``preview.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from serve.outputs import layout
from serve.outputs.labeltable import add_label_table
from serve.outputs.preview import render_preview
from serve.outputs.statistics import compute_statistics, write_statistics
from serve.records_schema import output_meta_doc

DEMO_MODEL_NOTICE = "DEMO MODELS - not for clinical use"


def _nifti(data: np.ndarray, affine: np.ndarray, header=None):
    hdr = None
    if header is not None and isinstance(header, nib.Nifti1Header):
        # keep the input's header (as TotalSegmentator does), but as plain uint8 labels
        hdr = header.copy()
        hdr.set_data_dtype(np.uint8)
        hdr.set_slope_inter(1, 0)
        hdr["cal_min"], hdr["cal_max"] = 0, 0  # the input's display window means nothing for labels
        hdr.extensions.clear()
    img = nib.Nifti1Image(np.asarray(data, dtype=np.uint8), affine, hdr)
    if hdr is None:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    return img


def write_outputs(result, volume, outdir: str | Path, *, multilabel: bool = True, per_structure: bool = False,
                  statistics: bool = True, preview: bool = True,
                  roi_subset: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the selected outputs of ``result`` (a SegmentationResult on ``volume``'s grid).

    ``roi_subset`` is what was asked for; ``mriseg.json`` (``mriseg.meta/1``,
    :class:`serve.records_schema.OutputMeta`) records it beside ``fast``, the result's
    ``resampling_order`` and ``input_cast`` and the files, so an output set says which options made it
    (``serve.jobs.results.completion_doc``).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(volume.affine)
    header = getattr(volume, "header", None)
    if tuple(result.labels.shape) != tuple(volume.data.shape):
        raise ValueError(f"result shape {result.labels.shape} is not the volume's {volume.data.shape}")
    written: dict[str, Path] = {}
    if multilabel:
        img = add_label_table(_nifti(result.labels, affine, header), result.structures)
        path = outdir / layout.MULTILABEL
        nib.save(img, str(path))
        written["multilabel"] = path
    if per_structure:
        seg_dir = outdir / layout.PER_STRUCTURE_DIR
        seg_dir.mkdir(exist_ok=True)
        for _, name in sorted(result.structures.items()):
            path = seg_dir / f"{name}.nii.gz"
            nib.save(_nifti(result.mask(name), affine, header), str(path))
        written["per_structure"] = seg_dir
    if statistics:
        stats = compute_statistics(result.structures, result.mask, volume.data, affine)
        written["statistics"] = write_statistics(stats, outdir / layout.STATISTICS)
    if preview:
        written["preview"] = render_preview(volume.data, result.labels, affine, result.structures,
                                            outdir / layout.PREVIEW, title=f"mriseg - {DEMO_MODEL_NOTICE}"
                                            if getattr(result, "demo", False) else "mriseg")
    meta = output_meta_doc({
        "structures": {str(k): v for k, v in result.structures.items()},
        "models": getattr(result, "models", {}), "unavailable": getattr(result, "unavailable", {}),
        "fast": bool(getattr(result, "fast", False)), "roi_subset": sorted(roi_subset) if roi_subset else None,
        "demo": bool(getattr(result, "demo", False)),
        # what was done to the input's intensities (docs/inference.md): TotalSegmentator's -ro and int32 cast
        "resampling_order": int(result.resampling_order), "input_cast": str(result.input_cast),
        "files": {k: v.name for k, v in written.items()}})  # validated (mriseg.meta/1): never written malformed
    (outdir / layout.METADATA).write_text(json.dumps(meta, indent=1))
    written["metadata"] = outdir / layout.METADATA
    return written
