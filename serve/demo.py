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
import shutil
from pathlib import Path

from serve.cachedir import cache_root
from serve.catalogue import Catalogue, load_catalogue
from serve.imaging.volume import Volume
from serve.inference.modelfolder import UNetSpec, write_model_folder

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


def demo_volume(seed: int = 0) -> Volume:
    """The synthetic phantom ``mriseg demo`` segments (:func:`serve.phantoms.demo_volume`)."""
    # lazy: the phantoms need scipy.ndimage (most of a second to import); mriseg's parser imports this module
    from serve import phantoms

    return phantoms.demo_volume(seed=seed)
