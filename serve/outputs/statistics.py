"""Per-structure statistics in TotalSegmentator's ``statistics.json`` layout, plus QC.

TotalSegmentator writes ``{structure: {"volume": mm3, "intensity": mean}}``.
We keep those keys and units and add ``intensity_std``, ``voxel_count`` and
``qc`` flags. Two departures (docs/inference.md): statistics are computed on
the input's own grid rather than the 1.5 mm working grid, and a structure
touching the field-of-view border keeps its real volume with
``qc.touches_border = true`` instead of being zeroed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

#: TotalSegmentator treats a mask within 3 voxels of 1.5 mm (4.5 mm) of the border as cut off.
BORDER_MARGIN_MM = 4.5


def border_margins(spacing) -> tuple[int, int, int]:
    return tuple(max(1, math.ceil(BORDER_MARGIN_MM / float(s) - 1e-9)) for s in spacing)  # type: ignore


def touches_border(mask: np.ndarray, margins=(1, 1, 1)) -> bool:
    """True if any voxel of ``mask`` lies within ``margins`` voxels of the volume's faces."""
    for axis, m in enumerate(margins):
        m = min(int(m), mask.shape[axis])
        lo = np.take(mask, range(m), axis=axis)
        hi = np.take(mask, range(mask.shape[axis] - m, mask.shape[axis]), axis=axis)
        if lo.any() or hi.any():
            return True
    return False


def structure_statistics(mask: np.ndarray, image: np.ndarray, voxel_volume_mm3: float, margins) -> dict:
    n = int(np.count_nonzero(mask))
    if n:
        vals = image[mask].astype(np.float64)
        mean, std = float(vals.mean()), float(vals.std())
    else:
        mean = std = 0.0
    return {
        "volume": round(n * voxel_volume_mm3, 4),
        "intensity": round(mean, 5),
        "intensity_std": round(std, 5),
        "voxel_count": n,
        "qc": {"empty": n == 0, "touches_border": bool(n and touches_border(mask, margins))},
    }


def compute_statistics(structures: Mapping[int, str], mask_of: Callable[[str], np.ndarray], image: np.ndarray,
                       affine: np.ndarray) -> dict[str, dict]:
    """``{name: stats}`` for every structure; ``mask_of(name)`` gives its whole (boolean) mask."""
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    voxel_volume = float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
    margins = border_margins(spacing)
    return {name: structure_statistics(mask_of(name), image, voxel_volume, margins)
            for _, name in sorted(structures.items())}


def write_statistics(stats: Mapping[str, dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(stats, indent=4))
    return path
