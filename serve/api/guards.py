"""The middleware in front of every route: body limits before a body is read, authentication and the site's
rate limit before a body or parameter is parsed, and request metrics for every answer."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request

from serve.api.deps import ApiState
from serve.api.problems import error_problem, problem
from serve.errors import LengthRequiredError, MrisegError, VolumeTooLargeError

MAX_JSON_BYTES = 64 << 10
UPLOAD_PATH = "/v1/segmentations/upload"
PUBLIC_PATHS = ("/healthz", "/readyz", "/v1/openapi.json", "/v1/docs", "/v1/docs/oauth2-redirect")


def unbounded(request: Request) -> bool:
    """A body sent in chunks, without Content-Length: no limit can be checked before it is read."""
    return "transfer-encoding" in request.headers and not request.headers.get("content-length", "").isdigit()


async def _limit_body(request: Request, call_next):
    """Only the upload route takes large bodies; anything else over 64 KiB is refused before it is read."""
    if request.url.path == UPLOAD_PATH:
        return await call_next(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        return problem(413, "Request too large", f"request bodies here are limited to {MAX_JSON_BYTES} bytes")
    if unbounded(request):
        return problem(LengthRequiredError.status, LengthRequiredError.title,
                       f"send the request body with a Content-Length header (bodies here are limited to "
                       f"{MAX_JSON_BYTES} bytes)")
    return await call_next(request)


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
            return error_problem(e)
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


def add_guards(app: FastAPI) -> None:
    """Install the middleware on ``app``.

    Args:
        app: the app.
    """
    # the last added runs first: metrics see every answer, auth comes before any body is read
    for middleware in (_limit_body, _authenticate_first, _observe):
        app.middleware("http")(middleware)


#: what a client can do about a volume over the size limit (S3 inputs have the same limit, so not "use S3")
TOO_LARGE_HINT = "crop or downsample the volume, or ask the operators to raise the limit"


async def read_capped(request: Request, limit: int) -> bytes:
    """The request's body, read as it streams in, refused (413) as soon as it passes ``limit``.

    Args:
        request: the request.
        limit: the most bytes taken.

    Returns:
        The body.
    """
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise VolumeTooLargeError(f"upload exceeds the {limit}-byte limit (router.max_upload_bytes, which "
                                      f"S3 inputs share); {TOO_LARGE_HINT}")
    return bytes(buf)
