"""Pinned manifests: the sha256 of every file loading reads, written at import, checked at every load.

A *pinned manifest* (``mriseg-pins.json``, written by ``mriseg models import``) holds the sha256
of every checkpoint, ``plans.json`` and ``dataset.json`` of each model; which manifest applies
to which source is :class:`serve.inference.modelstore.ModelStore`'s rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from serve.catalogue import SubModel
from serve.errors import ModelFolderError

log = logging.getLogger(__name__)

#: The pinned manifest ``mriseg models import`` writes at the top of its destination.
PINS = "mriseg-pins.json"
#: The operator's pinned manifest (a file path), for every source; required for S3 sources.
PINS_ENV = "MRISEG_MODEL_PINS"
PINS_FORMAT = "mriseg-pins/1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HASHES: dict[str, tuple[tuple[int, ...], str]] = {}
_HASHES_LOCK = threading.Lock()


def _sha256_seen(path: Path) -> str:
    """``sha256_file``, remembered while the file's inode, size, mtime and ctime stay the same.

    For listing (every request inspects its models); :func:`serve.inference.modelload.load_model` hashes
    the bytes it loads, so a file changed without a trace in its stat is still caught there.
    """
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _HASHES_LOCK:
        hit = _HASHES.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    digest = sha256_file(path)
    with _HASHES_LOCK:
        _HASHES[str(path)] = (key, digest)
    return digest


def loadable_files(trainer_folder: Path) -> list[Path]:
    """The files of a trainer folder that loading reads: plans.json, dataset.json, every fold's checkpoints."""
    return [p for p in [trainer_folder / "plans.json", trainer_folder / "dataset.json",
                        *sorted(trainer_folder.glob("fold_*/*.pth"))] if p.is_file()]


def pin_dataset(dataset_dir: Path) -> dict[str, str]:
    """sha256 of every loadable file of every trainer folder in ``dataset_dir``.

    Args:
        dataset_dir: A ``DatasetNNN_*`` folder.

    Returns:
        ``{"<trainer folder>/<file>": sha256}``, paths relative to ``dataset_dir``.
    """
    return {p.relative_to(dataset_dir).as_posix(): sha256_file(p)
            for tf in sorted(q for q in dataset_dir.iterdir() if q.is_dir()) for p in loadable_files(tf)}


@dataclass(frozen=True)
class PinnedManifest:
    """sha256 pins of model files: ``models[dataset folder name][path in it] = sha256``."""

    path: Path
    models: dict[str, dict[str, str]]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "PinnedManifest":
        """Read and check a pinned manifest.

        Args:
            path: A ``mriseg-pins.json`` (written by ``mriseg models import``).

        Returns:
            The manifest.

        Raises:
            ModelFolderError: the file cannot be read or is not a pinned manifest.
        """
        path = Path(path).expanduser()
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) else f"not JSON: {e}"
            raise ModelFolderError(f"the pinned model manifest {path} cannot be read ({why}); pass the "
                                   f"{PINS} that 'mriseg models import' wrote") from e
        models = doc.get("models") if isinstance(doc, dict) and doc.get("format") == PINS_FORMAT else None
        if not isinstance(models, dict) or not all(
                isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                                for k, v in files.items()) for files in models.values()):
            raise ModelFolderError(f"{path} is not a pinned model manifest (format {PINS_FORMAT}: "
                                   f'{{"models": {{"DatasetNNN_...": {{"<file>": "<sha256>"}}}}}}); pass the '
                                   f"{PINS} that 'mriseg models import' wrote")
        return cls(path, {name: dict(files) for name, files in models.items()})

    def dataset(self, sm: SubModel, dataset: str) -> dict[str, str]:
        """The pins of one dataset folder, by path inside it.

        Raises:
            ModelFolderError: the dataset folder is not pinned at all.
        """
        files = self.models.get(dataset)
        if files is None:
            raise ModelFolderError(f"{sm.name}: {dataset} is not in the pinned model manifest {self.path}, so "
                                   f"its weights are not trusted; import it with 'mriseg models import' and use "
                                   f"the {PINS} that writes")
        return files

    def for_trainer(self, sm: SubModel, dataset: str, trainer: str) -> dict[str, str]:
        """The pins of one trainer folder, by path inside it.

        Raises:
            ModelFolderError: the dataset folder is not pinned at all.
        """
        return {k[len(trainer) + 1:]: v for k, v in self.dataset(sm, dataset).items() if k.startswith(trainer + "/")}


def check_pins(sm: SubModel, trainer_folder: Path, pinned: Mapping[str, str], manifest: Path) -> None:
    """Every loadable file of the trainer folder is pinned, present and unchanged.

    Raises:
        ModelFolderError: naming the model and the first file that is not.
    """
    tf = trainer_folder
    unpinned = [p for p in loadable_files(tf) if p.relative_to(tf).as_posix() not in pinned]
    if unpinned:
        raise ModelFolderError(f"{sm.name}: {unpinned[0]} is not in the pinned model manifest {manifest}; "
                               f"import the model again (or remove the file)")
    for rel, want in sorted(pinned.items()):
        path = tf / rel
        if not path.is_file():
            raise ModelFolderError(f"{sm.name}: {path} is pinned in {manifest} but missing; import the model again")
        got = _sha256_seen(path)
        if got != want:
            raise ModelFolderError(f"{sm.name}: {path} does not match the pinned model manifest {manifest} "
                                   f"(sha256 {got[:16]}..., pinned {want[:16]}...): it changed after it was "
                                   f"pinned; import the model again")


def write_pins(root: Path, pins: Mapping[str, Mapping[str, str]]) -> Path:
    """Add (or replace) models' pins in ``root``'s ``mriseg-pins.json``; the other models' pins stay.

    Args:
        root: The model folder (``models import``'s destination).
        pins: ``{dataset folder name: pin_dataset(...)}``.

    Returns:
        The manifest's path.
    """
    path = root / PINS
    models: dict[str, dict[str, str]] = {}
    if path.is_file():
        try:
            models = PinnedManifest.read(path).models
        except ModelFolderError as e:
            log.warning("replacing a pinned manifest that cannot be read: %s", e.message)
    models.update({k: dict(v) for k, v in pins.items()})
    tmp = path.with_name(f".{PINS}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"format": PINS_FORMAT, "models": models}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
