"""Bring a volume into the orientation and spacing the sub-models were trained on.

This is TotalSegmentator's own path, done once per distinct target spacing
and shared by every sub-model that uses it:

1. ``nibabel.as_closest_canonical``: permute/flip voxel axes to RAS+ (no
   interpolation, so oblique scans keep their obliquity in the affine);
2. ``scipy.ndimage.zoom(order=3)`` to isotropic ``spacing_mm``, with the zoom
   factors, output shape and affine computed exactly as TotalSegmentator's
   ``resampling.change_spacing`` does (voxel sizes read from the NIfTI header,
   i.e. rounded to float32; columns of the affine divided by the zoom).

The one departure, documented in docs/inference.md: the resampled intensities
stay float32, where TotalSegmentator casts them to int32 (harmless for CT
Hounsfield units, destructive for MRI scaled to small floating-point ranges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from serve.errors import InvalidVolumeError, VolumeTooLargeError
from serve.volume_io import DEFAULT_MAX_VOXELS, Volume


@dataclass
class InputGrid:
    """Everything needed to return labels to the input's exact voxel grid."""

    shape: tuple[int, int, int]          # input shape (i, j, k)
    affine: np.ndarray                   # input affine (RAS+)
    ornt: np.ndarray                     # nibabel orientation: input axes -> canonical (RAS) axes
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    canonical_zooms: tuple[float, float, float]  # float32 header zooms, as TotalSegmentator reads them

    @property
    def axcodes(self) -> tuple[str, ...]:
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))


@dataclass
class PreparedVolume:
    """Canonical (RAS) orientation, resampled (order 3) to isotropic ``spacing_mm``; float32 (x, y, z)."""

    data: np.ndarray
    spacing_mm: float
    affine: np.ndarray
    grid: InputGrid
    zoom: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resampled: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def to_canonical(data: np.ndarray, affine: np.ndarray):
    """``nibabel.as_closest_canonical``: returns (data view, canonical affine, float32 zooms, ornt)."""
    import nibabel as nib
    from nibabel.orientations import io_orientation

    img = nib.Nifti1Image(data, affine)
    can = nib.as_closest_canonical(img)
    zooms = tuple(float(z) for z in np.asarray(can.header.get_zooms()[:3], dtype=np.float32))
    return np.asanyarray(can.dataobj), np.asarray(can.affine, dtype=np.float64), zooms, io_orientation(affine)


def zoom_factors(zooms, spacing_mm: float) -> np.ndarray:
    """TotalSegmentator's ``img_spacing / new_spacing`` (header zooms are float32)."""
    return np.asarray(zooms, dtype=np.float32) / np.array([float(spacing_mm)] * 3)


def needs_resampling(zooms, spacing_mm: float) -> bool:
    # TotalSegmentator's change_spacing returns its input unchanged in exactly this case
    return not np.array_equal(np.asarray(zooms, dtype=np.float32), np.array([float(spacing_mm)] * 3))


def resampled_affine(affine: np.ndarray, zoom: np.ndarray) -> np.ndarray:
    """Scale each voxel-axis column of ``affine`` by ``1 / zoom``; the origin stays."""
    out = np.array(affine, dtype=np.float64, copy=True)
    for i in range(3):
        out[:3, i] = out[:3, i] / zoom[i]
    return out


def prepare(volume: Volume, spacing_mm: float, max_voxels: int = DEFAULT_MAX_VOXELS) -> PreparedVolume:
    """Reorient ``volume`` to closest canonical and resample it to ``spacing_mm`` (order 3).

    The resampled grid is held to ``max_voxels`` too: the input's limit alone would let a small volume
    with huge voxel sizes in its header grow without bound.
    """
    import time

    from scipy import ndimage

    t0 = time.perf_counter()
    can, can_aff, zooms, ornt = to_canonical(volume.data, volume.affine)
    grid = InputGrid(shape=tuple(int(s) for s in volume.data.shape), affine=np.array(volume.affine, copy=True),
                     ornt=ornt, canonical_shape=tuple(int(s) for s in can.shape),
                     canonical_affine=can_aff, canonical_zooms=zooms)
    t1 = time.perf_counter()
    if not needs_resampling(zooms, spacing_mm):
        return PreparedVolume(np.ascontiguousarray(can, dtype=np.float32), float(spacing_mm), can_aff, grid,
                              timings={"reorient_s": t1 - t0})
    zoom = zoom_factors(zooms, spacing_mm)
    check_resampled_shape(can.shape, zoom, zooms, spacing_mm, max_voxels)
    # The spline prefilter and interpolation run in float64 inside scipy;
    # only the stored result is float32 (identical to casting a float64 zoom).
    data = ndimage.zoom(np.ascontiguousarray(can, dtype=np.float32), zoom, order=3, output=np.float32)
    t2 = time.perf_counter()
    return PreparedVolume(data, float(spacing_mm), resampled_affine(can_aff, zoom), grid,
                          zoom=tuple(float(z) for z in zoom), resampled=True,
                          timings={"reorient_s": t1 - t0, "resample_s": t2 - t1})


def check_resampled_shape(shape: Sequence[int], zoom: Sequence[float], zooms: Sequence[float], spacing_mm: float,
                          max_voxels: int) -> tuple[int, ...]:
    """The shape ``scipy.ndimage.zoom`` will give, refused before it is allocated when it is empty or too large."""
    out = tuple(int(round(s * z)) for s, z in zip(shape, zoom))
    sizes = ", ".join(f"{z:g}" for z in zooms)
    if min(out) < 1:
        raise InvalidVolumeError(f"the volume is thinner than one {spacing_mm:g} mm voxel along an axis (shape "
                                 f"{tuple(shape)}, voxel sizes {sizes} mm): check the voxel sizes in its header")
    n = math.prod(out)
    if n > max_voxels:
        raise VolumeTooLargeError(f"resampled to {spacing_mm:g} mm the volume would have {n} voxels (shape {out}), "
                                  f"more than the limit of {max_voxels}: its voxel sizes ({sizes} mm) make it "
                                  f"{n / math.prod(shape):.0f} times its {math.prod(shape)} voxels; check the voxel "
                                  f"sizes in its header, or crop it")
    return out


def prepare_labels_like(labels: np.ndarray, grid: InputGrid, spacing_mm: float) -> np.ndarray:
    """Bring a label map on the input grid to the prepared grid (order 0); used by tests and training."""
    from scipy import ndimage

    can, _, zooms, _ = to_canonical(labels, grid.affine)
    if not needs_resampling(zooms, spacing_mm):
        return np.ascontiguousarray(can)
    return ndimage.zoom(np.ascontiguousarray(can), zoom_factors(zooms, spacing_mm), order=0)
