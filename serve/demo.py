"""Demo models and a demo volume, so everything runs without real weights.

``serve/demo_models/`` holds the committed tiny demo models, trained on
synthetic phantoms (nnU-Net layout, see docs/demo-models.md). Where that
folder is missing, :func:`ensure_demo_models` writes randomly initialised
tiny models of the catalogue's exact labels into a cache directory. Either way they are DEMO
MODELS, NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from serve.cachedir import cache_root
from serve.catalogue import Catalogue, load_catalogue

log = logging.getLogger(__name__)

DEMO_NOTICE = "DEMO MODEL - not for clinical use"
RANDOM_DEMO_VERSION = "random-v1"
TINY_FEATURES = (8, 16, 32, 64)
TINY_PATCH = (48, 48, 48)


def demo_model_dir() -> Path:
    """Where committed demo models live (``serve/demo_models``)."""
    return Path(__file__).resolve().parent / "demo_models"


def _has_all(root: Path, catalogue: Catalogue) -> bool:
    if not root.is_dir():
        return False
    for sm in catalogue.submodels:
        if not any(root.glob(f"{sm.folder_prefix}*/*__{sm.configuration}/fold_*/checkpoint_final.pth")):
            return False
    return True


def default_cache_dir() -> Path:
    return cache_root() / "demo_models" / RANDOM_DEMO_VERSION


def write_random_models(root: Path, catalogue: Catalogue | None = None, include_fast: bool = True,
                        seed: int = 0) -> Path:
    """Randomly initialised tiny nnU-Net models for every sub-model (seeded, reproducible)."""
    from serve.inference.modelfolder import UNetSpec, write_model_folder

    catalogue = catalogue or load_catalogue()
    spec = UNetSpec(features=TINY_FEATURES, patch_size=TINY_PATCH)
    sms = list(catalogue.submodels) + (list(catalogue.fast_variants) if include_fast else [])
    root.mkdir(parents=True, exist_ok=True)
    for i, sm in enumerate(sms):
        labels = None
        if sm.is_fast_variant:  # the fast model predicts the labels of the models it replaces
            labels = [n for name in sm.replaces for n in catalogue.submodel(name).labels]
        write_model_folder(root, sm, spec, labels=labels, seed=seed + i,
                           description=f"{DEMO_NOTICE}; randomly initialised, untrained")
    (root / "DEMO_MODELS.json").write_text(json.dumps(
        {"notice": DEMO_NOTICE, "kind": "random-init", "version": RANDOM_DEMO_VERSION}, indent=1))
    return root


def ensure_demo_models(cache_dir: str | os.PathLike | None = None) -> Path:
    """A model directory with all six sub-models: the committed demo models, else random-init ones."""
    catalogue = load_catalogue()
    committed = demo_model_dir()
    if _has_all(committed, catalogue):
        return committed
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if not (_has_all(root, catalogue) and (root / "DEMO_MODELS.json").is_file()):
        log.warning("no trained demo models in %s; writing randomly initialised ones to %s", committed, root)
        import shutil

        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_random_models(tmp, catalogue)
        root.parent.mkdir(parents=True, exist_ok=True)
        if _has_all(root, catalogue) and (root / "DEMO_MODELS.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        else:
            shutil.rmtree(root, ignore_errors=True)  # an incomplete earlier attempt
            os.replace(tmp, root)
    return root


def demo_volume(shape=(48, 40, 48), spacing=(1.5, 1.5, 2.0), seed: int = 0, axcodes: str = "RAS"):
    """A small body-like synthetic volume (serve.phantoms when available, else ellipsoids)."""
    from serve.imaging.volume_io import Volume

    try:  # the phantom engineer's generator, once committed
        from serve import phantoms  # type: ignore[attr-defined]

        make = getattr(phantoms, "demo_volume", None)
        if make is not None:
            return make(seed=seed)
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    x, y, z = grid
    body = (x / 0.85) ** 2 + (y / 0.6) ** 2 < 1
    data = np.where(body, 300.0, 0.0)
    blobs = [((-0.35, 0.0, 0.2), 0.18, 700.0), ((0.35, 0.0, 0.2), 0.18, 650.0), ((0.0, 0.15, -0.2), 0.3, 500.0),
             ((0.0, -0.4, 0.0), 0.08, 900.0)]
    for (cx, cy, cz), r, v in blobs:
        data[(x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) / 1.5) ** 2 < r ** 2] = v
    data = data + rng.normal(0, 20, size=shape) * body
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    # express the same RAS-defined object in the requested voxel order
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes))
    data = apply_orientation(data, t)
    return Volume(np.ascontiguousarray(data, dtype=np.float32), affine_for(axcodes, spacing, data.shape), "nifti")


def affine_for(axcodes: str, spacing, shape) -> np.ndarray:
    """An affine whose voxel axes point along ``axcodes`` (e.g. "LPS", "PIR"), centred on the origin.

    ``spacing`` is given in RAS order (x, y, z world spacing of the object).
    """
    from nibabel.orientations import axcodes2ornt

    ornt = axcodes2ornt(axcodes)
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for i, (ax, flip) in enumerate(ornt):
        aff[int(ax), i] = flip * float(spacing[int(ax)])
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff

