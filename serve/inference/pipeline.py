"""Segment one volume with the sub-models a request needs (no Ray here).

Preprocessing runs once per distinct target spacing and is shared; each
sub-model predicts on the shared array; the local maps are merged into global
ids; the result goes back to the input grid. The serving layer composes the
same steps (:func:`serve.inference.preprocess.prepare`, :func:`serve.inference.predict.predict_labels`,
:func:`serve.inference.merge.merge`, :func:`serve.inference.restore.to_input_grid`) across replicas.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from serve.catalogue import Catalogue, SubModel
from serve.errors import ModelSourceUnreachableError, ModelUnavailableError
from serve.imaging.volume import Volume
from serve.inference.merge import MergedSegmentation, merge
from serve.inference.modelload import LoadedModel, configure_threads
from serve.inference.modelstore import ModelStatus, ModelStore
from serve.inference.predict import predict_labels
from serve.inference.preprocess import CAST_INT32, CAST_NONE, DEFAULT_RESAMPLING_ORDER, PreparedVolume, prepare
from serve.inference.resampling import check_resampling_order
from serve.inference.restore import to_input_grid

log = logging.getLogger(__name__)

#: progress(step_name, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class SegmentationResult:
    """Labels on the input's exact grid (shape and ``affine`` of the input)."""

    labels: np.ndarray                     # uint8 global ids, precedence applied
    per_model: dict[str, np.ndarray]       # sub-model -> uint8 global ids (lossless per structure)
    structures: dict[int, str]             # global ids covered by this result
    affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)        # sub-model -> checksum
    unavailable: dict[str, str] = field(default_factory=dict)   # sub-model not run -> why
    fast: bool = False
    demo: bool = False  # produced by demo models (not for clinical use)
    resampling_order: int = DEFAULT_RESAMPLING_ORDER  # the input's spline order (TotalSegmentator's -ro)
    input_cast: str = CAST_NONE  # "int32" where the resampled intensities were cast (serve.inference.preprocess)

    def mask(self, structure: str) -> np.ndarray:
        return MergedSegmentation(self.labels, self.per_model, self.structures).mask(structure)


def unavailable_error(absent: Iterable[tuple[SubModel, ModelStatus]],
                      roi_subset: Sequence[str] | None) -> ModelUnavailableError:
    """A clear error naming each absent model and the requested structures it owns."""
    problems, unreachable = [], False
    for sm, st in absent:
        unreachable |= st.state == "unreachable"
        owned = [n for n in (roi_subset or sm.labels) if n in sm.labels]
        shown = ", ".join(owned[:6]) + (f" and {len(owned) - 6} more" if len(owned) > 6 else "")
        problems.append(f"{shown} need(s) sub-model {sm.name} (Dataset{sm.task_id}, {sm.licence} licence), "
                        f"which is {st.state}: {st.detail}")
    if unreachable:  # the weights may well be there: nothing to install, only to wait for
        return ModelSourceUnreachableError("; ".join(problems) + ". Nothing was segmented; try again once the "
                                           "model source can be read.")
    return ModelUnavailableError("; ".join(problems) + ". Install the weights with 'mriseg models import "
                                 "--totalseg-home DIR' or point --models at a folder/bucket that has them.")


def merge_to_input_grid(shape, sms: Sequence[SubModel], prepared: Mapping[float, PreparedVolume],
                        local_maps: Mapping[str, np.ndarray], models: Mapping[str, LoadedModel],
                        roi_subset: Sequence[str] | None, catalogue: Catalogue):
    """Merge local maps per spacing, restore each to the input grid, apply precedence there.

    Returns ``(labels, per_model, structures)`` on the input grid. Sub-models at
    different spacings can only meet on the input grid; order-0 restoring
    commutes with the per-voxel merge, so the result equals merging first.
    """
    per_model: dict[str, np.ndarray] = {}
    structures: dict[int, str] = {}
    for spacing, prep in prepared.items():
        names = [sm.name for sm in sms if sm.spacing_mm == spacing and sm.name in local_maps]
        if not names:
            continue
        merged = merge({n: local_maps[n] for n in names}, {n: models[n] for n in names}, roi_subset, catalogue)
        for n in names:
            per_model[n] = to_input_grid(merged.per_model[n], prep)
        structures.update(merged.structures)
    labels = np.zeros(tuple(shape), dtype=np.uint8)
    for n in sorted(per_model, key=catalogue.precedence_rank):
        np.copyto(labels, per_model[n], where=per_model[n] > 0)
    return labels, per_model, dict(sorted(structures.items()))


def input_cast(prepared: Iterable[PreparedVolume]) -> str:
    """``"int32"`` where any prepared grid had TotalSegmentator's int32 cast, else ``"none"``.

    Args:
        prepared: the grids one segmentation used.

    Returns:
        The ``input_cast`` that mriseg.json and job.json record.
    """
    return CAST_INT32 if any(p.input_cast == CAST_INT32 for p in prepared) else CAST_NONE


def is_demo_model(model: LoadedModel) -> bool:
    """Demo models say so in their dataset.json description (see serve/demo.py)."""
    return "demo model" in str(model.dataset_json.get("description", "")).lower()


class Segmenter:
    """Loads sub-models lazily from a :class:`ModelStore` and segments volumes."""

    def __init__(self, store: ModelStore, device: str = "auto", threads: int | None = None,
                 tile_step_size: float | None = None, precision: str = "fp32"):
        self.store = store
        self.catalogue = store.catalogue
        self.device = device
        self.threads = configure_threads(threads) if threads else None
        self.tile_step_size = tile_step_size
        self.precision = precision
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def model(self, name: str) -> LoadedModel:
        """The loaded sub-model ``name`` (loaded once, then cached)."""
        with self._lock:
            if name not in self._models:
                sm = self.catalogue.submodel(name)
                self._models[name] = self.store.load(sm, device=self.device, tile_step_size=self.tile_step_size)
            return self._models[name]

    def plan(self, roi_subset: Sequence[str] | None = None, fast: bool = False) -> tuple[list[SubModel], dict[str, str]]:
        """Sub-models to run and those skipped because they are not installed.

        An explicit ``roi_subset`` (or ``fast``) needs every model it names and
        raises :class:`ModelUnavailableError` otherwise; a full run uses
        whatever is installed (raising if nothing is) and reports the rest as
        unavailable. A model already loaded is used as is; for any other, a
        model source that cannot be read raises either way, since skipping its
        models would pass off a partial segmentation as a full one.
        """
        sms = self.catalogue.plan(roi_subset, fast=fast)
        # A loaded model is present whatever its source says now: an S3 model
        # source that cannot be listed for a moment must not drop it from a run.
        statuses = [(sm, self.store.inspect(sm)) for sm in sms if sm.name not in self._models]
        absent = [(sm, st) for sm, st in statuses if st.state != "present"]
        strict = roi_subset is not None or fast
        if absent and (strict or len(absent) == len(sms) or any(st.state == "unreachable" for _, st in absent)):
            raise unavailable_error(absent, roi_subset)
        skipped = {sm.name: f"{st.state}: {st.detail}" for sm, st in absent}
        return [sm for sm in sms if sm.name not in skipped], skipped

    def segment(self, volume: Volume, roi_subset: Sequence[str] | None = None, fast: bool = False,
                progress: Progress | None = None,
                resampling_order: int = DEFAULT_RESAMPLING_ORDER) -> SegmentationResult:
        """Segment ``volume``; labels come back on its exact grid.

        Args:
            volume: the decoded input.
            roi_subset: the structures wanted (None: all the installed models give).
            fast: the 3 mm model.
            progress: called after each step.
            resampling_order: the spline order of the input's resampling (TotalSegmentator's ``-ro``, 0..5).

        Returns:
            The labels, per-model maps and what made them.
        """
        resampling_order = check_resampling_order(resampling_order)  # before any model loads
        if roi_subset is not None:
            roi_subset = self.catalogue.validate_structures(roi_subset)
        sms, skipped = self.plan(roi_subset, fast)
        timings: dict[str, float] = {}
        steps = len({sm.spacing_mm for sm in sms}) + len(sms) + 1
        done = 0

        def tick(name: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(name, done, steps)

        prepared: dict[float, PreparedVolume] = {}
        local_maps: dict[str, np.ndarray] = {}
        models: dict[str, LoadedModel] = {}
        for sm in sms:
            if sm.spacing_mm not in prepared:
                t = time.perf_counter()
                prepared[sm.spacing_mm] = prepare(volume, sm.spacing_mm, resampling_order=resampling_order)
                timings[f"prepare_{sm.spacing_mm:g}mm_s"] = time.perf_counter() - t
                tick(f"prepare {sm.spacing_mm:g} mm")
            t = time.perf_counter()
            models[sm.name] = self.model(sm.name)
            timings[f"load_{sm.name}_s"] = time.perf_counter() - t
            t = time.perf_counter()
            local_maps[sm.name] = predict_labels(models[sm.name], prepared[sm.spacing_mm].data, sm.spacing_mm,
                                                 self.precision)
            timings[f"predict_{sm.name}_s"] = time.perf_counter() - t
            tick(f"predict {sm.name}")

        t = time.perf_counter()
        labels, per_model, structures = merge_to_input_grid(volume.shape, sms, prepared, local_maps, models,
                                                            roi_subset, self.catalogue)
        timings["merge_restore_s"] = time.perf_counter() - t
        tick("merge")
        return SegmentationResult(labels, per_model, structures,
                                  np.array(volume.affine, copy=True), timings,
                                  {n: m.checksum for n, m in models.items()}, skipped, fast,
                                  demo=any(is_demo_model(m) for m in models.values()),
                                  resampling_order=resampling_order, input_cast=input_cast(prepared.values()))
