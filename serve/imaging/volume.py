"""The decoded volume, the file types we read, and the checks every reader applies.

Every reader checks the voxel count from the header *before* decoding the data, so a
decompression bomb costs nothing, and every failure a user can cause becomes a
:class:`serve.errors.MrisegError`.
"""

from __future__ import annotations

import contextvars
import math
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Sequence

import numpy as np

from serve.errors import CorruptFileError, InvalidVolumeError, VolumeTooLargeError

#: 512 x 512 x 1024 voxels: a large whole-body MRI; 1 GiB as float32.
DEFAULT_MAX_VOXELS: int = int(os.environ.get("MRISEG_MAX_VOXELS", 512 * 512 * 1024))
#: Bound on what a DICOM zip may expand to.
DEFAULT_MAX_ZIP_BYTES: int = int(os.environ.get("MRISEG_MAX_ZIP_BYTES", 4 * 1024**3))
MAX_ZIP_ENTRIES = 20000
#: Deeper entry paths are refused: Python's recursive folder walks and removals fail near 1000 levels.
MAX_ZIP_DEPTH = 32

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".ima")
ZIP_SUFFIXES = (".zip",)
SUPPORTED = NIFTI_SUFFIXES + SITK_SUFFIXES + ZIP_SUFFIXES + DICOM_SUFFIXES

@dataclass
class Volume:
    """A 3D scan: ``data[i, j, k]`` in on-disk voxel order, ``affine`` maps (i, j, k, 1) to RAS+ mm."""

    data: np.ndarray
    affine: np.ndarray
    source_format: str  # "nifti" | "sitk" | "dicom"
    header: Any = None  # the nibabel header of NIfTI inputs, copied into NIfTI outputs
    #: integer voxels on disk with identity scaling (:func:`serve.imaging.nifti.nifti_integer_valued`, :func:`serve.imaging.itk.dicom_integer_valued`):
    #: only such inputs get TotalSegmentator's int32 cast after resampling (serve.inference.preprocess)
    integer_valued: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore


def suffix_of(name: str) -> str:
    """The format suffix of a file name (``.nii.gz`` counts as one suffix)."""
    low = name.lower()
    for s in sorted(SUPPORTED, key=len, reverse=True):
        if low.endswith(s):
            return s
    return PurePosixPath(low).suffix


# -- validation ----------------------------------------------------------------

def _squeezed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Drop trailing singleton dimensions beyond the third (one time point, one channel)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_shape(shape: Sequence[int], max_voxels: int) -> tuple[int, int, int]:
    """Validate a header shape before any data is decoded."""
    sq = _squeezed_shape(shape)
    if any(int(s) < 0 for s in shape):
        raise CorruptFileError(f"the header gives a negative dimension (shape {tuple(int(s) for s in shape)}); "
                               f"the file is corrupt")
    if any(s == 0 for s in sq):
        raise InvalidVolumeError(f"the volume has a zero-size dimension (shape {tuple(shape)}); "
                                 f"the file holds no image data")
    if len(sq) > 3:
        raise InvalidVolumeError(f"the volume is {len(sq)}D with shape {tuple(shape)}; only 3D volumes (or 4D "
                                 f"with a single time point) can be segmented. Extract one time point first")
    if len(sq) < 3 or min(sq) == 1:
        raise InvalidVolumeError(f"the volume has a single slice (shape {tuple(shape)}); a 3D volume with at "
                                 f"least 2 voxels along every axis is needed")
    n = math.prod(sq)  # Python ints: numpy's int64 product wraps around for a forged header's sizes
    if n > max_voxels:
        raise VolumeTooLargeError(f"the volume has {n} voxels (shape {sq}), more than the limit of {max_voxels}; "
                                  f"crop or downsample it first")
    return sq  # type: ignore[return-value]


#: The memory one decode may take (read_volume's max_decode_bytes), for every reader.
DECODE_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("decode_budget", default=None)
#: Bytes per voxel a reader's array costs beyond its source type: the float32 copy and its contiguous copy.
DECODE_OVERHEAD_PER_VOXEL = 8


def check_decode_memory(shape: Sequence[int], itemsize: int) -> None:
    """Refuse, from the header, a volume whose decoding would take more than the decode budget.

    Args:
        shape: the header's shape.
        itemsize: bytes per voxel of the stored type (8 for float64: a small gzip can hold gigabytes of it).

    Raises:
        VolumeTooLargeError: over the budget set by :func:`serve.imaging.volume_io.read_volume`'s ``max_decode_bytes``.
    """
    budget = DECODE_BUDGET.get()
    if budget is None:
        return
    need = math.prod(int(s) for s in shape) * (int(itemsize) + DECODE_OVERHEAD_PER_VOXEL)
    if need > budget:
        raise VolumeTooLargeError(f"decoding the volume ({tuple(int(s) for s in shape)} voxels of {itemsize} bytes) "
                                  f"needs about {need >> 20} MiB, more than the decoder's {budget >> 20} MiB; "
                                  f"crop or downsample it, or save it with a smaller voxel type (e.g. int16)")


def check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidVolumeError("the volume's voxel-to-world transform is missing or not finite")
    rzs = affine[:3, :3]
    if abs(np.linalg.det(rzs)) < 1e-12 or np.linalg.cond(rzs) > 1e8:
        raise InvalidVolumeError("the volume's voxel-to-world transform is not invertible (a zero voxel size "
                                 "or degenerate direction cosines); fix the header's spacing/orientation")
    return affine


def check_data(data: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InvalidVolumeError(f"the volume contains {bad} non-finite voxel value(s) (NaN or infinity); "
                                 f"replace them before segmenting")
    return data


def finish(data: np.ndarray, affine: np.ndarray, fmt: str, max_voxels: int, header=None,
            integer_valued: bool = False) -> Volume:
    shape = check_shape(data.shape, max_voxels)
    data = np.asarray(data).reshape(shape)
    if data.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            data = data.astype(np.float32)
    data = np.ascontiguousarray(data)
    return Volume(check_data(data), check_affine(affine), fmt, header, integer_valued)


def error_reason(e: Exception) -> str:
    """The line of a reader's error that says what went wrong (the last), cut to 300 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # ITK's messages start with file/line noise; the last line says what went wrong
    return lines[-1][:300] if lines else type(e).__name__
