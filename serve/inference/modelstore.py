"""Find nnU-Net v2 model folders for the catalogue's sub-models.

A *source* is a local directory or an ``s3://bucket/prefix``. Either holds
``DatasetNNN_*/<Trainer>__<Plans>__<config>/`` folders exactly as nnU-Net
(and TotalSegmentator, under ``~/.totalsegmentator/nnunet/results``) lays
them out. S3 sources are downloaded once into a local cache and verified.

A *pinned manifest* (``mriseg-pins.json``, written by ``mriseg models import``) holds the sha256
of every checkpoint, ``plans.json`` and ``dataset.json`` of each model. The operator's manifest
(``pins``, else ``$MRISEG_MODEL_PINS``) applies to every source; without one a local folder's own
``mriseg-pins.json`` applies, a local folder without either is loaded as it is (the operator put
it there) with a warning, and an S3 source is refused. A file that differs from its pin, or a
loadable file without one, makes the model ``mismatched``; :meth:`ModelStore.load` checks the
bytes it loads against the pins once more. The S3 cache's ``.mriseg-manifest.json`` only records
what was downloaded (to spare a second download) and proves nothing about the weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

from serve.cachedir import cache_root
from serve.catalogue import Catalogue, SubModel, load_catalogue
from serve.errors import ModelFolderError, ModelSourceUnreachableError, ModelUnavailableError
from serve.inference.modelload import LoadedModel, check_labels, load_model
from serve.inference.pins import PINS, PINS_ENV, PinnedManifest, check_pins, pin_dataset, write_pins

log = logging.getLogger(__name__)

MANIFEST = ".mriseg-manifest.json"


@dataclass
class ModelStatus:
    """What the store knows about one sub-model."""

    submodel: str
    task_id: int
    state: str  # "present" | "missing" | "mismatched" | "unreachable" (its source cannot be read now)
    path: str | None = None
    detail: str = ""
    extra_labels: list[str] = field(default_factory=list)
    #: sha256 of each loadable file, by its path in the trainer folder; None for an unpinned local folder
    pinned: dict[str, str] | None = None


def find_trainer_folder(dataset_dir: Path, sm: SubModel) -> Path | None:
    """The ``Trainer__Plans__config`` folder; the catalogue's trainer wins, any other trainer is accepted."""
    preferred = dataset_dir / sm.trainer_folder
    if (preferred / "plans.json").is_file():
        return preferred
    candidates = sorted(
        p for p in dataset_dir.iterdir()
        if p.is_dir() and (p / "plans.json").is_file() and (p / "dataset.json").is_file()
        and p.name.endswith(f"__{sm.configuration}")
    )
    return candidates[0] if candidates else None


def find_dataset_dir(root: Path, sm: SubModel) -> Path | None:
    if not root.is_dir():
        return None
    hits = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(sm.folder_prefix))
    return hits[0] if hits else None


class ModelSource(Protocol):
    """A remote model source (``s3://``): copies a sub-model's dataset folder into a local cache.

    Implemented in :mod:`serve.storage.models`, so that this module needs no S3 client.
    """

    def fetch(self, sm: SubModel, pins: "PinnedManifest | None" = None) -> Path | None:
        """The local copy of ``sm``'s dataset folder, or None when the source has none.

        Raises:
            ModelSourceUnreachableError: the source cannot be read.
            ModelFolderError: a downloaded file is damaged or differs from its pin.
        """


class ModelStore:
    """Resolves each sub-model to a verified local nnU-Net trainer folder."""

    def __init__(self, sources: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                 catalogue: Catalogue | None = None, pins: str | os.PathLike | None = None,
                 remote: Mapping[str, ModelSource] | None = None):
        """
        Args:
            sources: Local folders and ``s3://bucket/prefix`` URIs, searched in order.
            cache_dir: Where S3 sources are copied (default ``$MRISEG_CACHE/models``).
            catalogue: The sub-model catalogue (default the packaged one).
            pins: The operator's pinned manifest for every source, else ``$MRISEG_MODEL_PINS``;
                an S3 source needs one.
            remote: The reader of each ``s3://`` source (:func:`serve.storage.models.open_model_store`
                builds them).

        Raises:
            ModelFolderError: ``pins`` names a file that is not a readable pinned manifest, or an
                ``s3://`` source has no reader in ``remote``.
        """
        self.catalogue = catalogue or load_catalogue()
        self.cache_dir = Path(cache_dir or cache_root() / "models")
        self.sources = [str(s) for s in sources]
        self._caches = dict(remote or {})
        unread = [s for s in self.sources if s.startswith("s3://") and s not in self._caches]
        if unread:
            raise ModelFolderError(f"model source {unread[0]} is in S3: build the model store with "
                                   f"serve.storage.models.open_model_store, which reads S3 sources")
        pins = pins if pins is not None else (os.environ.get(PINS_ENV) or None)
        self.pins = PinnedManifest.read(pins) if pins else None

    def _pins_of(self, src: str) -> PinnedManifest | None:
        """The pins that apply to ``src``: the operator's, else a local folder's own ``mriseg-pins.json``."""
        if self.pins is not None:
            return self.pins
        if src in self._caches:
            raise ModelFolderError(f"model source {src} has no pinned manifest, so nothing in it is trusted: pass "
                                   f"the {PINS} that 'mriseg models import' wrote (--model-pins, the serve "
                                   f"config's model_pins, or ${PINS_ENV})")
        own = Path(src).expanduser() / PINS
        return PinnedManifest.read(own) if own.is_file() else None

    def _dataset_dir(self, sm: SubModel) -> tuple[Path, PinnedManifest | None] | None:
        for src in self.sources:
            pins = self._pins_of(src)
            if src in self._caches:
                found = self._caches[src].fetch(sm, pins)
            else:
                found = find_dataset_dir(Path(src).expanduser(), sm)
                if found is not None and pins is None:
                    _warn_unpinned(src)
            if found is not None:
                return found, pins
        return None

    def inspect(self, sm: SubModel) -> ModelStatus:
        """Present, missing or mismatched; never raises for a missing model."""
        st = ModelStatus(sm.name, sm.task_id, "missing")
        try:
            found = self._dataset_dir(sm)
        except ModelUnavailableError as e:
            st.state, st.detail = "unreachable", e.message
            return st
        except ModelFolderError as e:
            st.state, st.detail = "mismatched", e.message
            return st
        if found is None:
            st.detail = f"no {sm.folder_prefix}* folder in {', '.join(self.sources) or '(no sources)'}"
            return st
        ds, pins = found
        tf = find_trainer_folder(ds, sm)
        if tf is None:
            st.state, st.path = "mismatched", str(ds)
            st.detail = f"{ds} has no <trainer>__<plans>__{sm.configuration} folder with plans.json and dataset.json"
            return st
        st.path = str(tf)
        try:
            st.extra_labels = check_labels(sm, json.loads((tf / "dataset.json").read_text()))
            checkpoints = (sorted(tf.glob("fold_*/checkpoint_final.pth"))
                           or sorted(tf.glob("fold_*/checkpoint_best.pth")))
            if not checkpoints:
                raise ModelFolderError(f"{tf} has no fold_*/checkpoint_final.pth")
            for ckpt in checkpoints:
                with open(ckpt, "rb") as f:
                    if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
                        raise ModelFolderError(f"{ckpt} is not a PyTorch checkpoint (a zip archive); the file is "
                                               f"damaged or truncated: import the model again")
            if pins is not None:
                pinned = pins.for_trainer(sm, ds.name, tf.name)
                check_pins(sm, tf, pinned, pins.path)
                st.pinned = pinned
        except ModelFolderError as e:
            st.state, st.detail = "mismatched", e.message
            return st
        except (OSError, ValueError) as e:
            st.state, st.detail = "mismatched", f"cannot read {tf}/dataset.json: {e}"
            return st
        st.state = "present"
        notes = [f"non-standard trainer folder {tf.name}"] if sm.trainer_folder != tf.name else []
        if pins is None:
            notes.append(f"unpinned: no {PINS}, the folder's files are trusted as they are")
        st.detail = "; ".join(notes)
        return st

    def status(self, include_fast: bool = True) -> list[ModelStatus]:
        sms = list(self.catalogue.submodels) + (list(self.catalogue.fast_variants) if include_fast else [])
        return [self.inspect(sm) for sm in sms]

    def locate(self, sm: SubModel | str, status: ModelStatus | None = None) -> Path:
        """The trainer folder of a usable model; raises a clear error otherwise.

        Pass the ``status`` that :meth:`inspect` just gave to spare an S3 source a second listing.
        """
        if isinstance(sm, str):
            sm = self.catalogue.submodel(sm)
        st = status if status is not None and status.submodel == sm.name else self.inspect(sm)
        if st.state == "unreachable":
            raise ModelSourceUnreachableError(f"sub-model {sm.name}: {st.detail}")
        if st.state == "missing":
            raise ModelUnavailableError(
                f"sub-model {sm.name} (Dataset{sm.task_id}, {sm.licence} licence) is not installed: {st.detail}. "
                f"Import it with 'mriseg models import'.")
        if st.state == "mismatched":
            raise ModelFolderError(st.detail)
        return Path(st.path)

    def load(self, sm: SubModel | str, status: ModelStatus | None = None, **load_kwargs) -> LoadedModel:
        """Locate and load a sub-model, its files checked against their pins as they are read.

        Args:
            sm: The sub-model or its name.
            status: What :meth:`inspect` just gave for it, if anything (spares a second look).
            **load_kwargs: Passed to :func:`serve.inference.modelload.load_model` (device, tile_step_size, ...).

        Returns:
            The loaded model.

        Raises:
            ModelUnavailableError: the model is missing or its source cannot be read.
            ModelFolderError: the model is mismatched, or a file changed since it was inspected.
        """
        if isinstance(sm, str):
            sm = self.catalogue.submodel(sm)
        st = status if status is not None and status.submodel == sm.name else self.inspect(sm)
        return load_model(self.locate(sm, st), sm, pinned=st.pinned, **load_kwargs)

    def available(self, names: Iterable[str] | None = None) -> dict[str, Path]:
        out = {}
        for st in self.status():
            if st.state == "present" and (names is None or st.submodel in names):
                out[st.submodel] = Path(st.path)
        return out


_WARNED_UNPINNED: set[str] = set()


def _warn_unpinned(src: str) -> None:
    if src not in _WARNED_UNPINNED:
        _WARNED_UNPINNED.add(src)
        log.warning("model source %s has no %s: its weights are loaded as they are, unverified; "
                    "'mriseg models import' writes one", src, PINS)


def import_totalseg_home(totalseg_home: Path, dest: Path, catalogue: Catalogue | None = None,
                         link: bool = False, skipped: dict[str, str] | None = None) -> list[str]:
    """Copy (or symlink) ``DIR/nnunet/results/DatasetNNN_*`` of catalogue models into ``dest`` and pin them.

    Each imported model's checkpoints, plans.json and dataset.json are pinned (sha256) in
    ``dest/mriseg-pins.json``; the store refuses them once they differ.

    Returns the sub-models imported; broken folders are left out, with the reason in ``skipped``.
    """
    skipped = {} if skipped is None else skipped
    catalogue = catalogue or load_catalogue()
    results = Path(totalseg_home).expanduser() / "nnunet" / "results"
    if not results.is_dir():
        raise ModelFolderError(f"{results} does not exist; pass the folder TotalSegmentator downloaded into "
                               f"(usually ~/.totalsegmentator)")
    dest.mkdir(parents=True, exist_ok=True)
    imported = []
    for sm in list(catalogue.submodels) + list(catalogue.fast_variants):
        ds = find_dataset_dir(results, sm)
        if ds is None:
            continue
        tf = find_trainer_folder(ds, sm)
        try:  # one broken folder must not stop the others: it is reported and skipped
            if tf is None:
                raise ModelFolderError(f"{ds}: no trainer folder with plans.json/dataset.json")
            try:
                dataset_json = json.loads((tf / "dataset.json").read_text())
            except (OSError, ValueError) as e:
                raise ModelFolderError(f"{tf}/dataset.json cannot be read ({type(e).__name__})") from e
            check_labels(sm, dataset_json)
        except ModelFolderError as e:
            log.warning("skipped %s: %s", sm.name, e.message)
            skipped[sm.name] = e.message
            continue
        try:
            _install_beside(ds, dest / ds.name, link)
        except OSError as e:  # shutil.Error included: a dangling link or unreadable file in the download
            log.warning("skipped %s: copying %s failed (%s)", sm.name, ds.name, type(e).__name__)
            skipped[sm.name] = f"copying {ds} failed ({e.__class__.__name__}: {str(e)[:200]}); an earlier import " \
                               f"of it, if any, is kept"
            continue
        try:  # pinned as installed: these are the bytes the store will load
            write_pins(dest, {ds.name: pin_dataset(dest / ds.name)})
        except OSError as e:  # the copy stays, refused by its old pins (if any) until an import pins it
            log.warning("skipped %s: pinning %s failed (%s)", sm.name, ds.name, type(e).__name__)
            skipped[sm.name] = f"pinning {dest / ds.name} failed ({e.__class__.__name__}: {str(e)[:200]}); " \
                               f"import it again"
            continue
        imported.append(sm.name)
    return imported


def _install_beside(source: Path, target: Path, link: bool) -> None:
    """Put a copy of (or link to) ``source`` at ``target``, replacing what is there only once the new one is whole.

    The new folder is built under a hidden name beside ``target`` (the store
    only reads ``Dataset*`` names) and renamed into place, so a copy that fails
    half-way leaves the earlier import as it was.
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new, old = target.with_name(f".{target.name}.new-{tag}"), target.with_name(f".{target.name}.old-{tag}")
    try:
        if link:
            new.symlink_to(source.resolve(), target_is_directory=True)
        else:
            shutil.copytree(source, new)
    except BaseException:
        _remove(new)
        raise
    had_old = target.exists() or target.is_symlink()
    if had_old:
        os.replace(target, old)
    os.replace(new, target)
    if had_old:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
