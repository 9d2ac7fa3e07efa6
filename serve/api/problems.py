"""Problem details (RFC 9457): the one shape of every error the API sends, and the OpenAPI document that says so.

Every error answer is ``application/problem+json`` with the status of the :class:`~serve.errors.MrisegError`
behind it; :func:`add_problem_handlers` installs the handlers that make it so, and :func:`openapi_document`
declares it for every operation (FastAPI's own 422 model is not what is sent).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.errors import MrisegError

log = logging.getLogger(__name__)

PROBLEM_TYPE = "https://github.com/mriseg-serve/problems/"

PROBLEM_SCHEMA = {
    "title": "Problem", "type": "object", "description": "RFC 9457 problem details; every error has this shape.",
    "required": ["type", "title", "status", "detail"], "additionalProperties": True,
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "retryable": {"type": "boolean"},
                   "errors": {"type": "array", "items": {"type": "object"}}, "job_id": {"type": "string"}},
}


def problem(status: int, title: str, detail: str, retry_after: int = 5, **extra: Any) -> JSONResponse:
    """A problem-details answer.

    Args:
        status: the HTTP status.
        title: a short, fixed summary.
        detail: what happened and what to do.
        retry_after: seconds, sent as ``Retry-After`` with a 429 or 503.
        extra: further members (``retryable``, ``errors``, ``job_id``...).

    Returns:
        The ``application/problem+json`` response.
    """
    headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
    body = {"type": f"{PROBLEM_TYPE}{status}", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def error_problem(e: MrisegError) -> JSONResponse:
    """The problem-details answer of a user or system error.

    Args:
        e: the error.

    Returns:
        The response, with the error's status, title, message and ``retryable``.
    """
    return problem(e.status, e.title, e.message, retryable=e.retryable, retry_after=getattr(e, "retry_after", 5))


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document, with the error responses the API really sends: problem+json for 4XX/5XX.

    Args:
        app: the app whose document it is (built once, then kept on the app).

    Returns:
        The OpenAPI document.
    """
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
    return error_problem(exc)


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


def add_problem_handlers(app: FastAPI) -> None:
    """Make every error ``app`` answers a problem-details document, and its OpenAPI document say so.

    Args:
        app: the app.
    """
    app.openapi = lambda: openapi_document(app)
    app.add_exception_handler(MrisegError, _mriseg_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
