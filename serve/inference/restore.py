"""Return label maps from the prepared grid to the input's exact voxel grid.

The inverse of :func:`serve.inference.preprocess.prepare`, as TotalSegmentator 2.18 does
it (``change_spacing(order=0, target_shape=...)``): nearest-neighbour (order 0,
``mode="nearest"``) zoom back to the canonical input shape, then
the axis permutation/flips of ``as_closest_canonical`` undone. Both steps only
move voxels, so no label value is ever invented, and the result has exactly
the input's shape; its affine is the input's affine.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform
from scipy import ndimage

from serve.inference.preprocess import InputGrid, PreparedVolume


def zoom_to_shape(labels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Order-0 ``scipy.ndimage.zoom`` to exactly ``shape`` (TotalSegmentator's ``target_shape`` mode)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    zoom = np.array(shape) / np.array(labels.shape)
    # mode="nearest" as TotalSegmentator: the last plane's coordinate can land a rounding error past the
    # input's edge, where scipy's default mode ("constant") would give it label 0
    out = ndimage.zoom(labels, zoom, order=0, mode="nearest")
    if tuple(out.shape) != tuple(shape):  # pragma: no cover - guards scipy's rounding of the output shape
        raise RuntimeError(f"order-0 zoom produced {out.shape}, expected {shape}")
    return out


def from_canonical(labels: np.ndarray, grid: InputGrid) -> np.ndarray:
    """Undo ``as_closest_canonical``: canonical (RAS) voxel order -> the input's voxel order."""
    back = ornt_transform(axcodes2ornt("RAS"), grid.ornt)
    return apply_orientation(labels, back)


def to_input_grid(labels: np.ndarray, prepared: PreparedVolume) -> np.ndarray:
    """``labels`` on ``prepared``'s grid -> the input grid (same shape as the input volume)."""
    grid = prepared.grid
    if tuple(labels.shape) != tuple(prepared.data.shape):
        raise ValueError(f"labels have shape {labels.shape}, the prepared volume {prepared.data.shape}")
    out = np.ascontiguousarray(from_canonical(zoom_to_shape(labels, grid.canonical_shape), grid))
    if tuple(out.shape) != tuple(grid.shape):  # pragma: no cover - would be a bug in the steps above
        raise RuntimeError(f"restored shape {out.shape} differs from the input shape {grid.shape}")
    return out
