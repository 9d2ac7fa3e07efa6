"""The public HTTP API (FastAPI), versioned under ``/v1``: the app factory.

:func:`create_app` builds one FastAPI app per ingress replica (Ray Serve's
FastAPI factory pattern), over that replica's
:class:`~serve.router.service.JobService`; nothing lives in module globals
but the route tables. The parts, one concern each:

- :mod:`serve.api.routes`: the routes, one module per resource; handlers are thin: they authenticate,
  parse, and call the job service of the app they serve (``request.app.state.api``);
- :mod:`serve.api.models`: the request and response bodies (the job a route answers is typed);
- :mod:`serve.api.deps`: the app's state, the job service and the authenticated site;
- :mod:`serve.api.guards`: body limits, authentication and rate limits before a body is read, metrics;
- :mod:`serve.api.problems`: every error is a JSON problem-details document (RFC 9457) with the status
  of the :class:`~serve.errors.MrisegError` behind it.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import FastAPI

import serve
from serve.api.deps import ApiState, EventSink
from serve.api.guards import add_guards
from serve.api.problems import add_problem_handlers
from serve.api.routes import catalogue, events, health, segmentations, uploads
from serve.router.service import JobService

#: every route table, in the order the OpenAPI document lists them
ROUTES = (health.routes, segmentations.routes, uploads.routes, events.routes, catalogue.routes)


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
    add_problem_handlers(app)
    add_guards(app)
    for table in ROUTES:
        app.include_router(table)
    return app
