"""What a route depends on: the state of the app serving it (one per ingress replica), its job service, the
authenticated site."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Awaitable, Callable, Protocol

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from serve.api.ratelimit import RateLimiter
from serve.errors import ServiceUnavailableError
from serve.router.service import JobService
from serve.router.tenancy import Site


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


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <site API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The site's API key")


def api_state(request: Request) -> ApiState:
    """The state of the app serving this request (one per ingress replica)."""
    return request.app.state.api


async def service(state: Annotated[ApiState, Depends(api_state)]) -> JobService:
    """The replica's job service (503 while the router starts)."""
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


def split_csv(value: str | None) -> list[str] | None:
    """A comma-separated query parameter as a list (None where it is absent; empty items dropped).

    Args:
        value: the parameter as sent.

    Returns:
        Its items, or None.
    """
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]
