"""S3 object-created events pushed to the API instead of polled."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from serve.api.deps import SiteDep, StateDep
from serve.api.guards import MAX_JSON_BYTES, read_capped
from serve.errors import NotFoundError
from serve.jobs.rules import specs_for_events
from serve.jobs.events import parse_message

log = logging.getLogger(__name__)

routes = APIRouter(tags=["events"])


@routes.post("/v1/events", status_code=202)
async def push_events(request: Request, who: SiteDep, state: StateDep) -> dict:
    """S3 object-created events pushed instead of polled: an S3 ``Records[]`` body (MinIO webhook,
    AWS), an SNS notification wrapping one, or an EventBridge ``Object Created`` event.

    Each volume in one of the caller's own inboxes becomes a durable, idempotent job (its
    ``job.json`` lands in the inbox's output prefix); other objects are counted as ignored.
    """
    if state.events is None:
        raise NotFoundError("event intake is not deployed on this cluster (the 'events' app arg)")
    body = await read_capped(request, MAX_JSON_BYTES)
    events = parse_message(body)
    specs, ignored = specs_for_events(events, state.events.rules_for(who.name))
    accepted = await state.events.submit([s.to_dict() for s in specs]) if specs else 0
    log.info("site %s pushed %d event(s): %d job(s) accepted, %d ignored", who.name, len(events), accepted, ignored)
    return {"accepted": accepted, "ignored": ignored,
            "jobs": [{"input": s.input_uri, "output_prefix": s.output_prefix} for s in specs]}
