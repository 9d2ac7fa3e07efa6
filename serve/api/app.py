"""The public HTTP API (FastAPI), versioned under ``/v1``.

:func:`create_app` builds one FastAPI app per ingress replica (Ray Serve's
FastAPI factory pattern), over that replica's
:class:`~serve.router.service.JobService`; nothing lives in module globals
but the route table. Route handlers are thin: they authenticate, parse, and
call the job service of the app they serve (``request.app.state.api``). Every
error is a JSON problem-details document (RFC 9457) with the status of the
:class:`~serve.errors.MrisegError` behind it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Awaitable, Callable, Protocol

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

import serve
from serve.api import idempotency
from serve.api.ratelimit import RateLimiter
from serve.errors import (LengthRequiredError, MrisegError, NotFoundError, ServiceUnavailableError,
                          UnsupportedFormatError, VolumeTooLargeError)
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.jobs.rules import specs_for_events
from serve.jobs.events import parse_message
from serve.jobs.store import OUTPUT_KINDS
from serve.outputs import layout
from serve.router.service import JobService
from serve.router.state import JobOptions
from serve.router.submission import check_upload_name
from serve.router.tenancy import Site

log = logging.getLogger(__name__)

PROBLEM_TYPE = "https://github.com/mriseg-serve/problems/"
RAW_UPLOAD_TYPES = ("application/octet-stream", "application/gzip", "application/x-gzip",
                    "application/x-nifti", "application/nifti", "application/zip", "application/dicom")
DEFAULT_OUTPUTS = ["multilabel", "statistics", "preview"]
#: what a client can do about a volume over the size limit (S3 inputs have the same limit, so not "use S3")
_TOO_LARGE_HINT = "crop or downsample the volume, or ask the operators to raise the limit"


class EventSink(Protocol):
    """Where pushed events go (the ingress wires the EventIntake deployment's handle in)."""

    def rules_for(self, site: str) -> list: ...

    async def submit(self, specs: list[dict]) -> int: ...


@dataclass
class ApiState:
    """What one app's routes serve: the replica's job service, its readiness probe, the event sink."""

    service: JobService | None = None
    readiness: Callable[[], Awaitable[dict]] | None = None
    events: EventSink | None = None
    limiter: RateLimiter = field(default_factory=RateLimiter)


#: the routes; :func:`create_app` adds them to each app it builds
routes = APIRouter()


# -- problem details ----------------------------------------------------------
def problem(status: int, title: str, detail: str, retry_after: int = 5, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
    body = {"type": f"{PROBLEM_TYPE}{status}", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


PROBLEM_SCHEMA = {
    "title": "Problem", "type": "object", "description": "RFC 9457 problem details; every error has this shape.",
    "required": ["type", "title", "status", "detail"], "additionalProperties": True,
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "retryable": {"type": "boolean"},
                   "errors": {"type": "array", "items": {"type": "object"}}, "job_id": {"type": "string"}},
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with the error responses the API really sends: problem+json for 4XX/5XX."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        problem_ref = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)  # FastAPI's HTTPValidationError is not what is sent
                public = op.get("tags") == ["health"]
                responses["4XX"] = {"description": "client error (e.g. 401 without a key, 404, 413, 422, 429)",
                                    "content": problem_ref}
                responses["5XX"] = {"description": ("not ready" if public else "a sub-model or S3 unavailable, "
                                                    "retry later (503)"), "content": problem_ref}
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas["Problem"] = PROBLEM_SCHEMA
        app.openapi_schema = doc
    return app.openapi_schema


async def _mriseg_error(_request: Request, exc: MrisegError) -> JSONResponse:
    return problem(exc.status, exc.title, exc.message, retryable=exc.retryable,
                   retry_after=getattr(exc, "retry_after", 5))


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    return problem(422, "Invalid request", "the request does not match the API schema; see 'errors'",
                   errors=errors)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    response = problem(exc.status_code, "HTTP error", str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. a 405's Allow
    return response


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return problem(500, "Internal error", "unexpected server error; the operators have the log")


MAX_JSON_BYTES = 64 << 10


UPLOAD_PATH = "/v1/segmentations/upload"


def _unbounded(request: Request) -> bool:
    """A body sent in chunks, without Content-Length: no limit can be checked before it is read."""
    return "transfer-encoding" in request.headers and not request.headers.get("content-length", "").isdigit()


async def _limit_body(request: Request, call_next):
    """Only the upload route takes large bodies; anything else over 64 KiB is refused before it is read."""
    if request.url.path == UPLOAD_PATH:
        return await call_next(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        return problem(413, "Request too large", f"request bodies here are limited to {MAX_JSON_BYTES} bytes")
    if _unbounded(request):
        return problem(LengthRequiredError.status, LengthRequiredError.title,
                       f"send the request body with a Content-Length header (bodies here are limited to "
                       f"{MAX_JSON_BYTES} bytes)")
    return await call_next(request)


PUBLIC_PATHS = ("/healthz", "/readyz", "/v1/openapi.json", "/v1/docs", "/v1/docs/oauth2-redirect")


async def _authenticate_first(request: Request, call_next):
    """Refuse requests without a valid key before their body or parameters are parsed."""
    state: ApiState = request.app.state.api
    if request.url.path not in PUBLIC_PATHS and state.service is not None:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
        try:
            who = state.service.tenancy.authenticate(key)
            state.limiter.check(who.name, who.requests_per_second, who.burst)
        except MrisegError as e:
            return problem(e.status, e.title, e.message, retryable=e.retryable,
                           retry_after=getattr(e, "retry_after", 5))
    return await call_next(request)


async def _observe(request: Request, call_next):
    t = time.perf_counter()
    response = await call_next(request)
    svc = request.app.state.api.service
    if svc is not None:
        route = request.scope.get("route")
        svc.metrics.requests.labels(request.method, getattr(route, "path", "unmatched"),
                                    str(response.status_code)).observe(time.perf_counter() - t)
    return response


# -- dependencies ---------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <site API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The site's API key")


def api_state(request: Request) -> ApiState:
    """The state of the app serving this request (one per ingress replica)."""
    return request.app.state.api


async def service(state: Annotated[ApiState, Depends(api_state)]) -> JobService:
    if state.service is None:
        raise ServiceUnavailableError("the router is starting; retry shortly")
    return state.service


def site(svc: Annotated[JobService, Depends(service)],
         bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
         api_key: Annotated[str | None, Depends(_api_key)]) -> Site:
    """The authenticated site (401 without a valid key)."""
    key = bearer.credentials if bearer is not None else api_key
    return svc.tenancy.authenticate(key)


StateDep = Annotated[ApiState, Depends(api_state)]
Svc = Annotated[JobService, Depends(service)]
SiteDep = Annotated[Site, Depends(site)]


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


# -- models ---------------------------------------------------------------------
_RESAMPLING_ORDER_DOC = (f"spline order (0-5) of the input's resampling to the model spacing, TotalSegmentator's -ro "
                         f"(default {DEFAULT_RESAMPLING_ORDER}, as TotalSegmentator 2.18); integer-valued inputs are "
                         f"then cast to int32 as there, others keep float intensities")


class SegmentationRequest(BaseModel):
    """A volume already in the site's S3 prefix."""

    model_config = ConfigDict(extra="forbid")
    input: str = Field(description="s3://bucket/key of a NIfTI, .mha/.nrrd or DICOM zip inside the site's prefixes",
                       max_length=2048)
    roi_subset: list[str] | None = Field(None, description="structures wanted (default: all 80)", max_length=100)
    fast: bool = Field(False, description="3 mm total_fast model (first 50 structures only)")
    outputs: list[str] = Field(default_factory=lambda: list(DEFAULT_OUTPUTS),
                               description=f"any of {list(OUTPUT_KINDS)}")
    output_prefix: str | None = Field(None, description="s3:// prefix (inside the site's) to copy outputs to",
                                      max_length=2048)
    resampling_order: StrictInt = Field(DEFAULT_RESAMPLING_ORDER, ge=0, le=5, description=_RESAMPLING_ORDER_DOC)


def _job_response(job, status_code: int, response: Response) -> dict:
    url = f"/v1/segmentations/{job.id}"
    response.status_code = status_code
    response.headers["Location"] = url
    return job.public(result_url=f"{url}/result")


async def _finish(svc: JobService, job, wait: bool, response: Response):
    if not wait:
        return _job_response(job, 202, response)
    await svc.wait(job)
    if job.status == "failed":
        e = job.error
        return problem(e["status"], e["title"], e["detail"], retryable=e["retryable"], job_id=job.id)
    return _job_response(job, 200, response)


# -- routes ---------------------------------------------------------------------
@routes.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """Liveness: the ingress event loop answers. No authentication."""
    return {"status": "ok"}


@routes.get("/readyz", tags=["health"])
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when the router is up and every sub-model runs or may scale from zero. No authentication."""
    if state.readiness is None or state.service is None:
        return problem(503, "Not ready", "the router is starting")
    report = await state.readiness()
    if not report["ready"]:
        return problem(503, "Not ready", report.get("detail", "sub-models not ready"), submodels=report["submodels"])
    return JSONResponse(report)


@routes.post("/v1/segmentations", status_code=202, tags=["segmentations"], responses=idempotency.POST_RESPONSES)
async def create_segmentation(body: SegmentationRequest, svc: Svc, who: SiteDep, response: Response,
                              wait: bool = Query(False, description="answer when the job has finished"),
                              idempotency_key: idempotency.KeyHeader = None):
    """Segment a volume from S3. 202 with a job id; ``?wait=true`` answers when done. With an
    ``Idempotency-Key``, the same request again answers the job the first one made (200)."""
    key = idempotency.check_key(idempotency_key)
    opts = JobOptions(body.roi_subset, body.fast, tuple(body.outputs), body.output_prefix, body.resampling_order)
    job, created = svc.submit_once(who, opts, key, idempotency.json_fingerprint(body.model_dump(mode="json")),
                                   input_uri=body.input)
    return idempotency.mark_replay(await _finish(svc, job, wait, response), response, not created)


@routes.post("/v1/segmentations/upload", status_code=202, tags=["segmentations"], responses=idempotency.POST_RESPONSES,
          openapi_extra={"requestBody": {"content": {
              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
              "multipart/form-data": {"schema": {"type": "object", "properties": {
                  "file": {"type": "string", "format": "binary"}}}}}}})
async def upload_segmentation(
        request: Request, svc: Svc, who: SiteDep, response: Response,
        filename: str | None = Query(None, max_length=255,
                                     description="name with the file's suffix (.nii.gz, .nii, .mha, .nrrd, .zip); "
                                                 "given, it wins over a multipart part's own name"),
        roi_subset: str | None = Query(None, description="comma-separated structure names"),
        fast: bool = Query(False), outputs: str | None = Query(None, description="comma-separated"),
        output_prefix: str | None = Query(None, max_length=2048),
        resampling_order: int = Query(DEFAULT_RESAMPLING_ORDER, ge=0, le=5, description=_RESAMPLING_ORDER_DOC),
        wait: bool = Query(False), idempotency_key: idempotency.KeyHeader = None):
    """Segment an uploaded volume (raw body or multipart ``file``), up to the size limit (413 beyond).
    With an ``Idempotency-Key``, the same file with the same options again answers the job the first made."""
    key = idempotency.check_key(idempotency_key)
    limit = svc.settings.max_upload_bytes
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + (64 << 10):
        raise VolumeTooLargeError(f"upload of {int(declared)} bytes exceeds the {limit}-byte limit "
                                  f"(router.max_upload_bytes, which S3 inputs share); {_TOO_LARGE_HINT}")
    # an empty ?outputs= names no output (400, as an empty list in the JSON route); absent means the default
    opts = JobOptions(_split(roi_subset), fast, tuple(DEFAULT_OUTPUTS if outputs is None else _split(outputs)),
                      output_prefix, resampling_order)
    svc.validate_options(who, opts)  # fail fast, before reading the body
    if ctype == "multipart/form-data" and _unbounded(request):
        # the form parser would spool all of it to disk before the limit applies
        raise LengthRequiredError("a multipart upload needs a Content-Length header; send it unchunked, "
                                  "or stream it as application/octet-stream")
    if ctype != "multipart/form-data" and ctype not in RAW_UPLOAD_TYPES:
        raise UnsupportedFormatError(f"content type {ctype!r} is not accepted; send the file as "
                                     f"application/octet-stream or multipart/form-data (field 'file')")
    with svc.upload_slot(who):  # 429 before the body is read when the site is at its job limit
        if ctype == "multipart/form-data":
            data, part_name = await _read_multipart(request, limit)
            filename = filename or part_name  # a browser names a Blob part "blob": ?filename= says what it is
        else:
            data = await _read_capped(request, limit)
        filename = filename or "upload.nii.gz"
        if not data:
            raise MrisegError("the upload is empty")
        check_upload_name(filename)
        # the options as sent (opts' structure list is normalised by validate_options), the file as read
        fields = {"filename": filename, "roi_subset": _split(roi_subset), "fast": fast, "outputs": _split(outputs),
                  "output_prefix": output_prefix, "resampling_order": resampling_order}
        fingerprint = idempotency.upload_fingerprint(fields, data) if key else ""
        job, created = svc.submit_once(who, opts, key, fingerprint, upload=data, filename=filename)
    del data  # spooled to disk by submit: a client waiting for its result must not hold the body in memory
    return idempotency.mark_replay(await _finish(svc, job, wait, response), response, not created)


@routes.post("/v1/events", status_code=202, tags=["events"])
async def push_events(request: Request, who: SiteDep, state: StateDep) -> dict:
    """S3 object-created events pushed instead of polled: an S3 ``Records[]`` body (MinIO webhook,
    AWS), an SNS notification wrapping one, or an EventBridge ``Object Created`` event.

    Each volume in one of the caller's own inboxes becomes a durable, idempotent job (its
    ``job.json`` lands in the inbox's output prefix); other objects are counted as ignored.
    """
    if state.events is None:
        raise NotFoundError("event intake is not deployed on this cluster (the 'events' app arg)")
    body = await _read_capped(request, MAX_JSON_BYTES)
    events = parse_message(body)
    specs, ignored = specs_for_events(events, state.events.rules_for(who.name))
    accepted = await state.events.submit([s.to_dict() for s in specs]) if specs else 0
    log.info("site %s pushed %d event(s): %d job(s) accepted, %d ignored", who.name, len(events), accepted, ignored)
    return {"accepted": accepted, "ignored": ignored,
            "jobs": [{"input": s.input_uri, "output_prefix": s.output_prefix} for s in specs]}


async def _read_capped(request: Request, limit: int) -> bytes:
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise VolumeTooLargeError(f"upload exceeds the {limit}-byte limit (router.max_upload_bytes, which "
                                      f"S3 inputs share); {_TOO_LARGE_HINT}")
    return bytes(buf)


async def _read_multipart(request: Request, limit: int) -> tuple[bytes, str | None]:
    form = await request.form(max_files=1, max_fields=10)
    part = form.get("file")
    if part is None or isinstance(part, str):
        raise MrisegError("multipart upload needs a file field named 'file'")
    data = await part.read(limit + 1)
    await form.close()
    if len(data) > limit:
        raise VolumeTooLargeError(f"upload exceeds the {limit}-byte limit")
    return data, part.filename or None


@routes.get("/v1/segmentations/{job_id}", tags=["segmentations"])
async def get_segmentation(job_id: str, svc: Svc, who: SiteDep) -> dict:
    """Status, per-stage and per-sub-model timings, result locations."""
    job = svc.get(who, job_id)
    return job.public(result_url=f"/v1/segmentations/{job.id}/result")


@routes.get("/v1/segmentations/{job_id}/result", tags=["segmentations"],
         responses={200: {"content": {"application/gzip": {}}}})
async def get_result(job_id: str, svc: Svc, who: SiteDep) -> FileResponse:
    """The multilabel NIfTI (``segmentation.nii.gz``); 409 until the job has succeeded."""
    path = svc.result_path(who, job_id)
    if not path.is_file():
        raise ServiceUnavailableError("the result file is not on this router replica any more; "
                                      "read it from the job's output prefix")
    return FileResponse(path, media_type="application/gzip", filename=layout.S3_MULTILABEL)


FILES = {layout.STATISTICS: ("statistics", "application/json"), layout.PREVIEW: ("preview", "image/png"),
         layout.METADATA: ("metadata", "application/json")}


@routes.get("/v1/segmentations/{job_id}/files/{name}", tags=["segmentations"])
async def get_file(job_id: str, name: str, svc: Svc, who: SiteDep) -> FileResponse:
    """Other outputs of a succeeded job: ``statistics.json``, ``preview.png``, ``mriseg.json``."""
    if name not in FILES:
        raise MrisegError(f"unknown output file {name!r}; available: {sorted(FILES)}")
    kind, media = FILES[name]
    path = svc.result_path(who, job_id, kind)
    if not path.is_file():
        raise ServiceUnavailableError("the file is not on this router replica any more; "
                                      "read it from the job's output prefix")
    return FileResponse(path, media_type=media, filename=name)


@routes.delete("/v1/segmentations/{job_id}", tags=["segmentations"])
async def cancel_segmentation(job_id: str, svc: Svc, who: SiteDep) -> dict:
    """Cancel a queued or running job; 409 if it has already finished."""
    job = svc.cancel(who, job_id)
    return job.public()


@routes.get("/v1/structures", tags=["catalogue"])
async def structures(svc: Svc, who: SiteDep,
                     probe: str | None = Query(None, description="comma-separated sub-models to ask even if "
                                               "scaled to zero (starts them; gives their checksums)")) -> dict:
    """The 80 structures, their sub-models and whether each sub-model is available."""
    avail = await svc.availability(_split(probe) or ())
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


def create_app(service: JobService | None = None, readiness: Callable[[], Awaitable[dict]] | None = None,
               events: EventSink | None = None) -> FastAPI:
    """The HTTP API over one job service: what each ingress replica serves (Ray Serve's app factory pattern).

    Args:
        service: the replica's job service; None: every route but the health checks answers 503.
        readiness: the replica's readiness probe (``/readyz``).
        events: where pushed events go; None: ``POST /v1/events`` answers 404.

    Returns:
        A new FastAPI app with the routes, auth, body limits, metrics and problem-details errors.
    """
    app = FastAPI(
        title="mriseg-serve",
        version=getattr(serve, "__version__", "0.1.0"),
        description="TotalSegmentator MRI's 80 structures from six nnU-Net sub-models on Ray Serve.",
        openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None,
        swagger_ui_oauth2_redirect_url="/v1/docs/oauth2-redirect",  # one of PUBLIC_PATHS, beside the docs page
    )
    app.state.api = ApiState(service, readiness, events)
    app.openapi = lambda: _openapi(app)
    app.add_exception_handler(MrisegError, _mriseg_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    # the last added runs first: metrics see every answer, auth comes before any body is read
    for middleware in (_limit_body, _authenticate_first, _observe):
        app.middleware("http")(middleware)
    app.include_router(routes)
    return app
