"""Liveness and readiness: public, for the load balancer and Kubernetes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve.api.deps import StateDep
from serve.api.problems import problem

routes = APIRouter(tags=["health"])


@routes.get("/healthz")
async def healthz() -> dict:
    """Liveness: the ingress event loop answers. No authentication."""
    return {"status": "ok"}


@routes.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when the router is up and every sub-model runs or may scale from zero. No authentication."""
    if state.readiness is None or state.service is None:
        return problem(503, "Not ready", "the router is starting")
    report = await state.readiness()
    if not report["ready"]:
        return problem(503, "Not ready", report.get("detail", "sub-models not ready"), submodels=report["submodels"])
    return JSONResponse(report)
