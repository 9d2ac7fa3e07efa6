"""The structures the cluster segments and whether each sub-model is available."""

from __future__ import annotations

from fastapi import APIRouter, Query

from serve.api.deps import SiteDep, Svc, split_csv

routes = APIRouter(tags=["catalogue"])


@routes.get("/v1/structures")
async def structures(svc: Svc, who: SiteDep,
                     probe: str | None = Query(None, description="comma-separated sub-models to ask even if "
                                               "scaled to zero (starts them; gives their checksums)")) -> dict:
    """The 80 structures, their sub-models and whether each sub-model is available."""
    avail = await svc.availability(split_csv(probe) or ())
    cat = svc.catalogue
    subs = []
    for sm in list(cat.submodels) + list(cat.fast_variants):
        subs.append({"name": sm.name, "task_id": sm.task_id, "spacing_mm": sm.spacing_mm, "licence": sm.licence,
                     "fast_variant": sm.is_fast_variant, "structures": list(sm.labels), **avail[sm.name]})
    owner = {n: sm.name for sm in cat.submodels for n in sm.labels}
    return {"structures": [{"id": gid, "name": name, "submodel": owner[name],
                            "available": avail[owner[name]]["state"] in ("ready", "cold")}
                           for gid, name in cat.structures.items()],
            "submodels": subs}
