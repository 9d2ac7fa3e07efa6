"""Generated MR-like volumes and planted random-weight models for the TotalSegmentator parity tests.

Both tools read the very same model files: they are planted under TotalSegmentator's own folder
names (``TASK_ID_WEIGHTS_CONFIGS`` of the installed package, read through :func:`describe`) in a
temporary TotalSegmentator home; mriseg reads the same folders (its store matches ``DatasetNNN_*``).
The networks are tiny (patch 32^3, 3 stages) so a CPU test runs each sub-model in about a second.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.parity.sidevenv import describe

# -- models -------------------------------------------------------------------------------------------

def plant_models(results: Path, task_ids, seed: int = 350) -> dict[int, Path]:
    """Random-init models for ``task_ids`` under TotalSegmentator's folder names in ``results``.

    Returns task id -> dataset folder. The trainer, plans and configuration are the catalogue's, which
    tests/parity/test_catalogue_drift.py holds equal to TotalSegmentator's task configs.
    """
    from serve.catalogue import load_catalogue
    from serve.inference.modelfolder import UNetSpec, write_model_folder

    cat = load_catalogue()
    folders = describe()["weights"]
    spec = UNetSpec(features=(4, 8, 16), patch_size=(32, 32, 32))
    out = {}
    for i, tid in enumerate(task_ids):
        sm = cat.by_task_id(tid)
        name = folders[str(tid)]["foldername"]
        extra = auxiliary_labels(tid)
        write_model_folder(results, sm, spec, dataset_name=name, extra_labels=extra, seed=seed + i)
        out[tid] = results / name
    return out


def auxiliary_labels(task_id: int) -> list[str]:
    """Labels a real model has beyond the catalogue's, which both tools must drop (TotalSegmentator's
    ``<task>_auxiliary`` class maps, e.g. brain and liver in face_mr)."""
    d = describe()
    task = next((t for t, c in d["task_configs"].items() if c.get("task_id") == task_id), None)
    aux = d["auxiliary"].get(task or "", {})
    return [aux[k] for k in sorted(aux, key=int)]


def write_home_config(home: Path) -> Path:
    """TotalSegmentator's config.json with usage statistics off (config.py's keys); no licence number."""
    ts_home = home / ".totalsegmentator"
    ts_home.mkdir(parents=True, exist_ok=True)
    path = ts_home / "config.json"
    path.write_text(json.dumps({"totalseg_id": "totalseg_parity", "send_usage_stats": False,
                                "prediction_counter": 0, "statistics_disclaimer_shown": True}, indent=1))
    return path


# -- volumes ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One generated volume: voxel axes' directions, voxel sizes, an optional rotation, how it is stored."""

    name: str
    axcodes: str                       # the direction of voxel axes i, j, k, e.g. "LPS"
    zooms: tuple[float, float, float]  # mm
    shape: tuple[int, int, int]
    oblique_deg: float = 0.0           # rotation about the scanner's (1, 1, 1) axis
    float_scaled: bool = False         # stored as int16 with scl_slope != 1 (not integer-valued)
    seed: int = 0


_AXIS = {"L": (0, -1), "R": (0, 1), "P": (1, -1), "A": (1, 1), "I": (2, -1), "S": (2, 1)}


def affine_for(case: Case) -> np.ndarray:
    """The case's voxel-to-RAS affine: axis directions, voxel sizes, rotation, centred on the origin."""
    rot = np.zeros((3, 3))
    for i, code in enumerate(case.axcodes):
        axis, sign = _AXIS[code]
        rot[axis, i] = sign
    if case.oblique_deg:
        th = math.radians(case.oblique_deg)
        u = np.ones(3) / math.sqrt(3)
        k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
        rot = (np.eye(3) + math.sin(th) * k + (1 - math.cos(th)) * k @ k) @ rot
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(case.zooms)
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(case.shape) - 1) / 2)
    return aff


def mr_like(case: Case) -> np.ndarray:
    """An MR-like body: zero air around an ellipsoid of tissue with brighter and darker blobs, a smooth
    bias field and noise; float64 intensities in the range of a T1 scan."""
    rng = np.random.default_rng(case.seed)
    aff = affine_for(case)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in case.shape], indexing="ij"), -1).astype(float)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]          # mm, RAS: the anatomy is fixed in the scanner
    ext = np.asarray(case.shape) * np.asarray(case.zooms) / 2
    r = np.linalg.norm(xyz / (0.8 * ext.min()), axis=-1)
    body = r < 1
    img = np.where(body, 320.0, 0.0)
    for _ in range(6):  # "organs": blobs of other intensities
        c = rng.uniform(-0.5, 0.5, 3) * ext.min()
        rad = rng.uniform(0.15, 0.3) * ext.min()
        img[body & (np.linalg.norm(xyz - c, axis=-1) < rad)] = rng.choice([90.0, 610.0, 850.0, 450.0])
    bias = 1 + 0.15 * np.sin(xyz[..., 0] / 40) * np.cos(xyz[..., 2] / 55)
    img = img * bias + np.where(body, rng.normal(0, 25, case.shape), 0)
    return np.clip(img, 0, None)


def write_case(case: Case, folder: Path) -> Path:
    """Write ``case`` as ``folder/<name>.nii.gz``: int16 voxels, integer-valued or with a float scale."""
    import nibabel as nib

    data = mr_like(case)
    aff = affine_for(case)
    if case.float_scaled:
        # a scanner's float intensities (small values): nibabel stores them as int16 with its own scl_slope
        img = nib.Nifti1Image(data * 0.0123 + 0.5, aff)
        img.set_data_dtype(np.int16)
    else:
        img = nib.Nifti1Image(np.round(data).astype(np.int16), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.name}.nii.gz"
    nib.save(img, path)
    back = nib.load(path)
    slope, inter = back.dataobj.slope, back.dataobj.inter
    assert back.get_data_dtype() == np.int16
    assert (slope not in (0, 1) or inter != 0) == case.float_scaled, (case.name, slope, inter)
    assert "".join(nib.aff2axcodes(back.affine)) == case.axcodes or case.oblique_deg
    return path
