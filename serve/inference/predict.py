"""Run one sub-model on a prepared volume with nnU-Net's own predictor.

``nnUNetPredictor.predict_single_npy_array`` does everything nnU-Net does for
a file: crop to non-zero, normalise with the plans' scheme, resample if the
spacing differs from the plans', Gaussian-weighted sliding window (mirroring
only where the checkpoint allows it), and export back to the given shape.
We only hand it the array in the axis order its image reader would produce.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import numpy as np

from serve.inference.modelload import LoadedModel

log = logging.getLogger(__name__)

# Every nnU-Net v2 reader returns arrays as SimpleITK does, (z, y, x), with the
# spacing reversed to match: NibabelIO/NibabelIOWithReorient transpose
# nibabel's (x, y, z) data explicitly. A reader listed here as "xyz" would get
# the array untransposed; none of nnunetv2 2.x's readers needs it.
READER_AXIS_ORDER: dict[str, str] = {
    "SimpleITKIO": "zyx",
    "SimpleITKIOWithReorient": "zyx",
    "NibabelIO": "zyx",
    "NibabelIOWithReorient": "zyx",
    "Tiff3DIO": "zyx",
}

PRECISIONS = ("fp32", "bf16")


def reader_axis_order(model: LoadedModel) -> str:
    """The axis order the model's plans' ``image_reader_writer`` produced during training."""
    reader = model.predictor.plans_manager.plans.get("image_reader_writer", "SimpleITKIO")
    order = READER_AXIS_ORDER.get(reader)
    if order is None:
        log.warning("unknown image_reader_writer %r in %s plans; assuming SimpleITK's (z, y, x) order",
                    reader, model.submodel.name)
        order = "zyx"
    return order


def _autocast(model: LoadedModel, precision: str):
    """Optional bf16 autocast on CPU; on CUDA nnU-Net autocasts by itself."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    # lazy: torch takes seconds to import; only model loading and prediction need it
    import torch

    if precision == "bf16" and model.predictor.device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_labels(model: LoadedModel, data: np.ndarray, spacing_mm: float | Sequence[float],
                   precision: str = "fp32") -> np.ndarray:
    """Local label ids (uint8) of ``model`` for ``data`` (x, y, z), same shape as ``data``."""
    if data.ndim != 3:
        raise ValueError(f"expected a 3D (x, y, z) array, got shape {data.shape}")
    spacing = [float(spacing_mm)] * 3 if np.isscalar(spacing_mm) else [float(s) for s in spacing_mm]
    zyx = reader_axis_order(model) == "zyx"
    arr = data.transpose(2, 1, 0) if zyx else data
    props = {"spacing": spacing[::-1] if zyx else spacing}
    arr = np.ascontiguousarray(arr, dtype=np.float32)[None]
    with _autocast(model, precision):
        seg = model.predictor.predict_single_npy_array(arr, props, None, None, False)
    seg = np.asarray(seg)
    if zyx:
        seg = seg.transpose(2, 1, 0)
    if seg.shape != data.shape:  # pragma: no cover - nnU-Net exports to the input shape
        raise RuntimeError(f"{model.submodel.name} returned shape {seg.shape} for input {data.shape}")
    if seg.max(initial=0) > 255:
        raise RuntimeError(f"{model.submodel.name} produced label ids above 255")
    return np.ascontiguousarray(seg, dtype=np.uint8)
