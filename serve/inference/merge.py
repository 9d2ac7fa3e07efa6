"""Merge the sub-models' local label maps into the catalogue's 80 global ids.

Labels are mapped by *name* from each model's dataset.json, so auxiliary
classes (e.g. brain and liver in the face model) simply have no global id and
vanish. The single-label map applies the catalogue's precedence: where masks
of two sub-models overlap, the higher-ranked sub-model wins (specific
structures beat coarse tissue classes). ``per_model`` keeps every
sub-model's map, which is lossless because one model's labels never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from serve.catalogue import Catalogue, load_catalogue
from serve.inference.modelload import LoadedModel


@dataclass
class MergedSegmentation:
    labels: np.ndarray                 # uint8, global ids, precedence applied
    per_model: dict[str, np.ndarray]   # sub-model -> uint8 map in global ids
    structures: dict[int, str]         # global ids this result covers (roi_subset applied)

    def mask(self, structure: str) -> np.ndarray:
        """The whole mask of one structure, from the lossless per-model form."""
        for gid, name in self.structures.items():
            if name == structure:
                for m in self.per_model.values():
                    if np.any(m == gid):
                        return m == gid
                return np.zeros(self.labels.shape, dtype=bool)
        raise KeyError(structure)


def local_to_global_lut(model: LoadedModel, wanted: set[str] | None,
                        catalogue: Catalogue | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """A lookup table local id -> global id (0 for auxiliary or unwanted labels)."""
    catalogue = catalogue or load_catalogue()
    ids = catalogue.structure_ids
    size = max([0, *model.label_names]) + 1
    lut = np.zeros(max(size, 256), dtype=np.uint8)
    covered: dict[int, str] = {}
    for local, name in model.label_names.items():
        if name in model.submodel.labels and name in ids and (wanted is None or name in wanted):
            lut[local] = ids[name]
            covered[ids[name]] = name
    return lut, covered


def merge(local_maps: Mapping[str, np.ndarray], models: Mapping[str, LoadedModel],
          roi_subset: Sequence[str] | None = None, catalogue: Catalogue | None = None) -> MergedSegmentation:
    """Global-id maps per sub-model and one precedence-merged 80-label map."""
    catalogue = catalogue or load_catalogue()
    wanted = set(catalogue.validate_structures(roi_subset)) if roi_subset is not None else None
    if not local_maps:
        raise ValueError("nothing to merge")
    shapes = {m.shape for m in local_maps.values()}
    if len(shapes) != 1:
        raise ValueError(f"label maps differ in shape: {shapes}")
    shape = shapes.pop()
    per_model: dict[str, np.ndarray] = {}
    structures: dict[int, str] = {}
    for name, local in local_maps.items():
        lut, covered = local_to_global_lut(models[name], wanted, catalogue)
        top = max([0, *models[name].label_names])  # the lut is padded to 256: check the model's own ids
        if local.size and int(local.max()) > top:
            raise ValueError(f"{name}: label id {int(local.max())} is not in its dataset.json")
        per_model[name] = lut[local]
        structures.update(covered)
    labels = np.zeros(shape, dtype=np.uint8)
    for name in sorted(per_model, key=catalogue.precedence_rank):
        m = per_model[name]
        np.copyto(labels, m, where=m > 0)
    return MergedSegmentation(labels, per_model, dict(sorted(structures.items())))
