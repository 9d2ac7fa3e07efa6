"""A preview PNG: axial, coronal and sagittal slices with coloured label overlays and a legend.

Shown in canonical (RAS) orientation in radiological convention (patient's
right on the viewer's left), whatever the input's voxel order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from serve.inference.preprocess import to_canonical

MAX_LEGEND = 24


def label_colours(n: int = 256) -> np.ndarray:
    """RGBA per label id; 0 is transparent. Neighbouring ids get distinct colours."""
    # lazy: matplotlib takes about a second to import; only preview.png needs it
    import matplotlib

    base = np.concatenate([matplotlib.colormaps["tab20"](np.arange(20)),
                           matplotlib.colormaps["tab20b"](np.arange(20)),
                           matplotlib.colormaps["tab20c"](np.arange(20))])
    cols = np.array([base[(i * 7) % len(base)] for i in range(n)])
    cols[:, 3] = 0.55
    cols[0] = (0, 0, 0, 0)
    return cols


def _pick_slices(labels: np.ndarray, axis: int, n: int) -> list[int]:
    """``n`` slice indices spread over the labelled extent along ``axis`` (the whole extent if no labels)."""
    other = tuple(a for a in range(3) if a != axis)
    counts = np.count_nonzero(labels, axis=other)
    idx = np.nonzero(counts)[0]
    lo, hi = (int(idx[0]), int(idx[-1])) if idx.size else (0, labels.shape[axis] - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]}) or [labels.shape[axis] // 2]


def render_preview(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, structures: Mapping[int, str],
                   path: str | Path, title: str = "", n_slices: int = 3) -> Path:
    """Write the preview PNG for ``image``/``labels`` (input grid, same shape) and return its path."""
    # lazy: matplotlib takes about a second to import; only preview.png needs it
    import matplotlib

    matplotlib.use("Agg", force=False)
    # lazy: matplotlib takes about a second to import; only preview.png needs it
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    img, can_aff, zooms, _ = to_canonical(image, affine)
    lab, _, _, _ = to_canonical(labels, affine)
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0, 1)
    cmap = ListedColormap(label_colours())
    sx, sy, sz = zooms
    views = [("axial", 2, (sx, sy)), ("coronal", 1, (sx, sz)), ("sagittal", 0, (sy, sz))]
    # (left edge, right edge) of each view once drawn, and the RAS axis letters for a slice's position
    edges = {2: ("R", "L"), 1: ("R", "L"), 0: ("P", "A")}
    where = {2: ("I", "S"), 1: ("P", "A"), 0: ("L", "R")}
    fig, axes = plt.subplots(3, n_slices, figsize=(3.2 * n_slices + 3.2, 9.6), squeeze=False)
    for row, (name, axis, (h_sp, v_sp)) in enumerate(views):
        slices = _pick_slices(lab, axis, n_slices)
        for col in range(n_slices):
            ax = axes[row][col]
            ax.set_axis_off()
            if col >= len(slices):
                continue
            s = slices[col]
            im2 = np.take(img, s, axis=axis).T
            lb2 = np.take(lab, s, axis=axis).T
            ax.imshow(im2, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=v_sp / h_sp,
                      interpolation="nearest")
            ax.imshow(np.ma.masked_equal(lb2, 0), cmap=cmap, vmin=0, vmax=255, origin="lower",
                      aspect=v_sp / h_sp, interpolation="nearest")
            if axis != 0:
                # canonical RAS columns grow toward the patient's right (RAS+: +x is right); mirrored, the
                # patient's right is on the viewer's left (radiological convention). Sagittal views keep
                # anterior on the right.
                ax.invert_xaxis()
            for x, letter in zip((0.02, 0.98), edges[axis]):
                ax.text(x, 0.5, letter, transform=ax.transAxes, color="yellow", fontsize=8, va="center",
                        ha="left" if x < 0.5 else "right")
            # the slice's position in scanner millimetres (RAS), which the user's viewer also shows
            mm = float((can_aff @ np.r_[[s if a == axis else 0 for a in range(3)], 1.0])[axis])
            ax.set_title(f"{name} {where[axis][mm >= 0]} {abs(mm):.0f} mm", fontsize=8)
    present, counts = np.unique(lab[lab > 0], return_counts=True)
    order = [int(present[i]) for i in np.argsort(-counts)][:MAX_LEGEND]
    cols = label_colours()
    handles = [Patch(color=cols[g][:3], label=structures.get(g, str(g))) for g in sorted(order)]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False,
                   title=f"{len(present)} structures" + (f" (top {MAX_LEGEND})" if len(present) > MAX_LEGEND else ""))
    else:
        fig.text(0.88, 0.5, "no structures found", ha="center", fontsize=9)
    fig.suptitle(title or "mriseg preview", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.78, top=0.93, bottom=0.02, wspace=0.05, hspace=0.15)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
