"""The one-screen summary of a segmentation that ``mriseg segment`` and ``mriseg demo`` print."""

from __future__ import annotations

import numpy as np

from serve.outputs.statistics import compute_statistics


def summary_table(stats: dict[str, dict] | None, result, max_rows: int = 20) -> str:
    """One screen: structure, voxels, volume (ml), QC; the largest structures first."""
    rows = []
    if stats is None:
        stats = compute_statistics(result.structures, result.mask, np.zeros(result.labels.shape, np.float32),
                                   result.affine)
    for name, s in stats.items():
        qc = [k for k, v in s["qc"].items() if v]
        rows.append((name, s["voxel_count"], s["volume"] / 1000.0, ",".join(qc) or "ok"))
    found = [r for r in rows if r[1] > 0]
    found.sort(key=lambda r: -r[1])
    w = max([len("structure")] + [len(r[0]) for r in found[:max_rows]])
    lines = [f"{'structure':<{w}}  {'voxels':>9}  {'volume ml':>10}  qc", "-" * (w + 30)]
    lines += [f"{n:<{w}}  {v:>9d}  {ml:>10.2f}  {qc}" for n, v, ml, qc in found[:max_rows]]
    if len(found) > max_rows:
        lines.append(f"... and {len(found) - max_rows} more structures (see statistics.json)")
    empty = len(rows) - len(found)
    lines.append(f"{len(found)} structure(s) found, {empty} empty" +
                 (f"; {sum(1 for r in found if 'touches_border' in r[3])} touch the field-of-view border"
                  if found else ""))
    if result.unavailable:
        lines.append("not run (model not installed): " + ", ".join(sorted(result.unavailable)))
    if getattr(result, "demo", False):
        lines.append("DEMO MODELS - not for clinical use")
    return "\n".join(lines)
