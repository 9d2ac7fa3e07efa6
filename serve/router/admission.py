"""Router admission by memory: a job computes only while the bytes it will hold fit the router's budget.

Slots bound how many jobs run at once, but one job's memory depends on its
volume: a 512 x 512 x 1024 scan at 0.5 mm costs the router gigabytes where a
phantom costs megabytes. Each job's cost is estimated from its decoded shape
and voxel size *before* anything else is allocated (:func:`job_bytes`); a job
that could never fit is refused (413), others wait until running jobs have
released enough (:class:`MemoryBudget`). The decoder child is told the most
voxels the budget could ever admit (:func:`max_admissible_voxels`), so a
volume that can never fit is refused from its header, before it is decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import AsyncIterator, Sequence

import numpy as np

from serve.errors import VolumeTooLargeError

#: Router bytes per input voxel: the float32 volume (4), its canonical float32 copy (4), scipy's float64
#: spline coefficients (8), the merged and restored uint8 labels (2).
BYTES_PER_INPUT_VOXEL = 18
#: Router bytes per voxel of each resampled grid: the float32 grid (4), its object-store copy (4), and the
#: uint8 label maps the sub-models return (6 at most).
BYTES_PER_GRID_VOXEL = 14


def max_admissible_voxels(budget_bytes: int) -> int:
    """The most input voxels a job may have under ``budget_bytes`` (its input cost alone).

    Args:
        budget_bytes: the router's memory budget for jobs.

    Returns:
        The voxel bound to hand the decoder.
    """
    return max(1, budget_bytes // BYTES_PER_INPUT_VOXEL)


def job_bytes(shape: Sequence[int], affine: np.ndarray, spacings_mm: Sequence[float]) -> int:
    """An upper estimate of the router memory one job holds, from its decoded shape and voxel size.

    Args:
        shape: the input volume's shape.
        affine: its voxel-to-world transform (for the voxel sizes).
        spacings_mm: the grid spacing of each group of sub-models the job runs (1.5, and 3 for --fast).

    Returns:
        Bytes.
    """
    n = math.prod(int(s) for s in shape)
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    extent = [float(s) * float(z) for s, z in zip(shape, zooms)]
    grid = sum(math.prod(max(1, round(e / float(sp))) for e in extent) for sp in spacings_mm)
    return n * BYTES_PER_INPUT_VOXEL + grid * BYTES_PER_GRID_VOXEL


class MemoryBudget:
    """Bytes shared by the router's running jobs (used from one event loop).

    Args:
        total: the budget in bytes.
    """

    def __init__(self, total: int):
        self.total = int(total)
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the duration of the block, waiting until they fit.

        Raises:
            VolumeTooLargeError: ``nbytes`` exceeds the whole budget (413: the job could never run).
        """
        if nbytes > self.total:
            raise VolumeTooLargeError(
                f"the job needs about {nbytes >> 20} MiB of router memory (from the volume's size and voxel "
                f"size), more than the router's whole budget of {self.total >> 20} MiB (router.memory_budget_bytes); "
                f"crop or downsample the volume first")
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + nbytes <= self.total)
            self.used += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= nbytes
                self._changed.notify_all()
