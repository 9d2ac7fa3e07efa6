"""The six TotalSegmentator MRI sub-models and the merged 80-label map.

The data lives in ``serve/data/catalogue.json`` so that names and IDs can be
checked against TotalSegmentator's class maps without reading code. This
module only loads and indexes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable, Mapping

from serve.errors import UnknownStructureError


@dataclass(frozen=True)
class SubModel:
    """One nnU-Net v2 model and the global label IDs it produces."""

    name: str
    task_id: int
    folder_prefix: str
    trainer: str
    plans: str
    configuration: str
    spacing_mm: float
    tile_step_size: float
    licence: str
    global_id_start: int
    labels: tuple[str, ...]
    replaces: tuple[str, ...] = ()

    @property
    def global_ids(self) -> dict[str, int]:
        """Structure name -> merged (global) label ID."""
        return {n: self.global_id_start + i for i, n in enumerate(self.labels)}

    @property
    def trainer_folder(self) -> str:
        """nnU-Net's ``Trainer__Plans__Configuration`` folder name."""
        return f"{self.trainer}__{self.plans}__{self.configuration}"

    @property
    def is_fast_variant(self) -> bool:
        return bool(self.replaces)


@dataclass(frozen=True)
class Catalogue:
    submodels: tuple[SubModel, ...]
    fast_variants: tuple[SubModel, ...]
    precedence: tuple[str, ...]

    # -- lookups -----------------------------------------------------------
    @property
    def structures(self) -> dict[int, str]:
        """Global label ID -> structure name, for the full 80-label map."""
        out: dict[int, str] = {}
        for sm in self.submodels:
            out.update({gid: name for name, gid in sm.global_ids.items()})
        return dict(sorted(out.items()))

    @property
    def structure_ids(self) -> dict[str, int]:
        return {name: gid for gid, name in self.structures.items()}

    def submodel(self, name: str) -> SubModel:
        for sm in self.submodels + self.fast_variants:
            if sm.name == name:
                return sm
        raise KeyError(f"no sub-model named {name!r}")

    def by_task_id(self, task_id: int) -> SubModel:
        for sm in self.submodels + self.fast_variants:
            if sm.task_id == task_id:
                return sm
        raise KeyError(f"no sub-model with task id {task_id}")

    def owner(self, structure: str) -> SubModel:
        """The (non-fast) sub-model that produces ``structure``."""
        for sm in self.submodels:
            if structure in sm.labels:
                return sm
        raise UnknownStructureError([structure], sorted(self.structure_ids))

    def validate_structures(self, names: Iterable[str]) -> list[str]:
        """Return ``names`` de-duplicated in catalogue order; unknown names raise."""
        names = list(names)
        known = self.structure_ids
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UnknownStructureError(unknown, sorted(known))
        wanted = set(names)
        return [n for n in known if n in wanted]

    def plan(self, roi_subset: Iterable[str] | None = None, fast: bool = False) -> list[SubModel]:
        """The sub-models needed for ``roi_subset`` (all structures if None).

        With ``fast``, the 3 mm model replaces the models it covers; only the
        first 50 labels are available in that mode.
        """
        if fast:
            fv = self.fast_variants[0]
            names = self.validate_structures(roi_subset) if roi_subset else list(fv.labels)
            missing = [n for n in names if n not in fv.labels]
            if missing:
                raise UnknownStructureError(
                    missing, list(fv.labels),
                    hint="fast mode only covers the first 50 structures (total_mr)")
            return [fv]
        if roi_subset is None:
            return list(self.submodels)
        names = self.validate_structures(roi_subset)
        needed = {self.owner(n).name for n in names}
        return [sm for sm in self.submodels if sm.name in needed]

    def precedence_rank(self, submodel: str) -> int:
        """Higher ranks overwrite lower ones in the single-label map."""
        if submodel in self.precedence:
            return self.precedence.index(submodel)
        return len(self.precedence)


def _submodel(d: Mapping) -> SubModel:
    return SubModel(
        name=d["name"], task_id=int(d["task_id"]), folder_prefix=d["folder_prefix"],
        trainer=d["trainer"], plans=d["plans"], configuration=d["configuration"],
        spacing_mm=float(d["spacing_mm"]), tile_step_size=float(d["tile_step_size"]),
        licence=d["licence"], global_id_start=int(d["global_id_start"]),
        labels=tuple(d["labels"]), replaces=tuple(d.get("replaces", ())),
    )


@lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    """The catalogue shipped with the package."""
    raw = json.loads(resources.files("serve.data").joinpath("catalogue.json").read_text())
    return Catalogue(
        submodels=tuple(_submodel(d) for d in raw["submodels"]),
        fast_variants=tuple(_submodel(d) for d in raw["fast_variants"]),
        precedence=tuple(raw["precedence"]["order_low_to_high"]),
    )
