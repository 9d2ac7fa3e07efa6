"""Bring a volume into the orientation and spacing the sub-models were trained on.

This is TotalSegmentator 2.18's own path (``nnUNet_predict_image`` and
``resampling.change_spacing``), done once per distinct target spacing and
shared by every sub-model that uses it:

1. ``nibabel.as_closest_canonical``: permute/flip voxel axes to RAS+ (no
   interpolation, so oblique scans keep their obliquity in the affine);
2. ``scipy.ndimage.zoom(order=resampling_order, mode="nearest")`` to isotropic
   ``spacing_mm`` (TotalSegmentator's ``-ro``, default 1), with the zoom factors,
   output shape and affine computed exactly as ``change_spacing`` does (voxel
   sizes read from the NIfTI header, i.e. rounded to float32; columns of the
   affine divided by the zoom);
3. the resampled values cast to int32 (truncation toward zero), as
   ``change_spacing(dtype=np.int32)`` does, for integer-valued inputs
   (:attr:`serve.imaging.volume_io.Volume.integer_valued`). Where the header zooms already
   equal the target, ``change_spacing`` returns its input: no zoom, no cast.

The departure, documented in docs/inference.md: inputs that are not
integer-valued (float on disk, or scaled by a fraction) keep float intensities,
where TotalSegmentator casts them too (which destroys MRI scaled to small ranges).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage

from serve.errors import InvalidVolumeError, VolumeTooLargeError
from serve.imaging.volume import DEFAULT_MAX_VOXELS, Volume
from serve.inference.resampling import (CAST_INT32, CAST_NONE, DEFAULT_RESAMPLING_ORDER,  # noqa: F401 - re-exported
                                        RESAMPLING_ORDERS, check_resampling_order)


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
        return tuple(nib.aff2axcodes(self.affine))


@dataclass
class PreparedVolume:
    """Canonical (RAS) orientation, resampled to isotropic ``spacing_mm``; float32 (x, y, z).

    ``input_cast`` is ``"int32"`` where the resampled values were truncated to integers (TotalSegmentator's
    cast, integer-valued inputs only), else ``"none"`` (not resampled, or float intensities kept).
    """

    data: np.ndarray
    spacing_mm: float
    affine: np.ndarray
    grid: InputGrid
    zoom: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resampled: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    resampling_order: int = DEFAULT_RESAMPLING_ORDER
    input_cast: str = CAST_NONE


def to_canonical(data: np.ndarray, affine: np.ndarray):
    """``nibabel.as_closest_canonical``: returns (data view, canonical affine, float32 zooms, ornt)."""
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


def prepare(volume: Volume, spacing_mm: float, max_voxels: int = DEFAULT_MAX_VOXELS,
            resampling_order: int = DEFAULT_RESAMPLING_ORDER) -> PreparedVolume:
    """Reorient ``volume`` to closest canonical and resample it to ``spacing_mm``, as TotalSegmentator 2.18.

    Args:
        volume: the decoded input.
        spacing_mm: the sub-models' isotropic spacing.
        max_voxels: the most voxels the resampled grid may have: the input's limit alone would let a small
            volume with huge voxel sizes in its header grow without bound.
        resampling_order: the spline order of the zoom (TotalSegmentator's ``-ro``, 0..5).

    Returns:
        The prepared float32 array with its grid; ``input_cast`` says whether the int32 cast was applied.
    """
    order = check_resampling_order(resampling_order)
    t0 = time.perf_counter()
    can, can_aff, zooms, ornt = to_canonical(volume.data, volume.affine)
    grid = InputGrid(shape=tuple(int(s) for s in volume.data.shape), affine=np.array(volume.affine, copy=True),
                     ornt=ornt, canonical_shape=tuple(int(s) for s in can.shape),
                     canonical_affine=can_aff, canonical_zooms=zooms)
    t1 = time.perf_counter()
    if not needs_resampling(zooms, spacing_mm):
        # change_spacing returns its input here: neither zoomed nor cast
        return PreparedVolume(np.ascontiguousarray(can, dtype=np.float32), float(spacing_mm), can_aff, grid,
                              timings={"reorient_s": t1 - t0}, resampling_order=order)
    zoom = zoom_factors(zooms, spacing_mm)
    check_resampled_shape(can.shape, zoom, zooms, spacing_mm, max_voxels)
    # TotalSegmentator zooms get_fdata()'s float64 array. Our float32 voxels hold the same values wherever
    # float32 holds them exactly (every integer-valued input up to 2**24), and scipy reads any input type
    # into float64 (spline coefficients included), so the interpolated float64 values are the same.
    src = np.ascontiguousarray(can, dtype=np.float32)
    if volume.integer_valued:
        # float64 out, then truncated: a float32 result could round 4.9999999 up to 5 before the cast
        zoomed = ndimage.zoom(src, zoom, order=order, mode="nearest", output=np.float64)
        data, cast = _int32_as_float32(zoomed), CAST_INT32
        del zoomed
    else:
        # float intensities kept (the departure); one rounding of scipy's float64 result to float32
        data, cast = ndimage.zoom(src, zoom, order=order, mode="nearest", output=np.float32), CAST_NONE
    t2 = time.perf_counter()
    return PreparedVolume(data, float(spacing_mm), resampled_affine(can_aff, zoom), grid,
                          zoom=tuple(float(z) for z in zoom), resampled=True,
                          timings={"reorient_s": t1 - t0, "resample_s": t2 - t1},
                          resampling_order=order, input_cast=cast)


def _int32_as_float32(values: np.ndarray) -> np.ndarray:
    """``values.astype(np.int32)`` (truncation toward zero, as TotalSegmentator) as the float32 the models get
    (nnU-Net reads the int32 file as float32); a slab at a time, so no int32 copy of the whole grid is held."""
    out = np.empty(values.shape, dtype=np.float32)
    for i in range(values.shape[0]):
        out[i] = values[i].astype(np.int32)
    return out


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
    """Bring a label map on the input grid to the prepared grid (order 0, ``mode="nearest"`` as TotalSegmentator's
    ``change_spacing`` resamples label maps); used by tests and training."""
    can, _, zooms, _ = to_canonical(labels, grid.affine)
    if not needs_resampling(zooms, spacing_mm):
        return np.ascontiguousarray(can)
    return ndimage.zoom(np.ascontiguousarray(can), zoom_factors(zooms, spacing_mm), order=0, mode="nearest")
