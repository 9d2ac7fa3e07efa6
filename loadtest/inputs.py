"""Synthetic MRI-like input volumes of given sizes (NIfTI) for the benchmark.

The reference models have random weights, so the content of the volume does
not change the cost; only its grid does. The volumes still look like a body
(an ellipsoid of tissue with smooth texture and noise) so that nnU-Net's
cropping to non-zero voxels behaves as on a real scan, and their affine is
LPS-oriented (as DICOM-derived NIfTIs usually are) so that the reorientation
to canonical is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class InputSize:
    """A named input grid."""

    name: str
    shape: tuple[int, int, int]
    spacing_mm: float

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


SMALL = InputSize("small", (117, 91, 20), 3.0)
MEDIUM = InputSize("medium", (256, 256, 128), 1.5)
LARGE = InputSize("large", (320, 320, 200), 1.5)
# one 128^3 tile per 1.5 mm model: the stream's volume on CPU
TINY = InputSize("tiny", (60, 48, 20), 3.0)
SIZES = {s.name: s for s in (TINY, SMALL, MEDIUM, LARGE)}


def make_volume(size: InputSize, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(data int16, affine) of a body-like volume on ``size``'s grid.

    Integer voxels, as MRI scanners store them: TotalSegmentator's int32 cast then applies on both
    sides of the benchmark (docs/inference.md: float inputs keep their fractions in ours only).
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = np.array(size.shape)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid[0] / 0.85) ** 2 + (grid[1] / 0.7) ** 2 + (grid[2] / 1.2) ** 2)
    texture = ndimage.gaussian_filter(rng.normal(size=size.shape), 2.0)
    data = np.where(r < 1.0, 300.0 + 800.0 * texture, 0.0) + rng.normal(0, 5, size=size.shape)
    data = np.round(np.clip(data, 0, None)).astype(np.int16)
    sp = size.spacing_mm
    # LPS-like axes: i -> -x, j -> -y, k -> +z
    affine = np.diag([-sp, -sp, sp, 1.0])
    affine[:3, 3] = [sp * shape[0] / 2, sp * shape[1] / 2, -sp * shape[2] / 2]
    return data, affine


def write_volume(size: InputSize, path: str | Path, seed: int = 0) -> Path:
    import nibabel as nib

    data, affine = make_volume(size, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path
