"""What the router keeps of ``Idempotency-Key``: how long a keyed job stays, and the error for a key reused.

The key's form, the request fingerprints and the replay answers are the HTTP API's
(:mod:`serve.api.idempotency`); the router stores the key with the job it makes
(:meth:`serve.router.service.JobService.submit_once`) and answers a reused key with :func:`mismatch`.
"""

from __future__ import annotations

from serve.errors import MrisegError

#: the request header (draft-ietf-httpapi-idempotency-key-header)
KEY_HEADER = "Idempotency-Key"
#: a keyed job younger than this is evicted only when nothing else of its site can be (router._evictable)
KEEP_KEYED_S = 24 * 3600


class IdempotencyKeyReusedError(MrisegError):
    """The key was sent before with another request."""

    status = 422
    title = "Idempotency-Key reused"


def mismatch(job_id: str) -> IdempotencyKeyReusedError:
    """The error for a key sent again with another request than the one that made ``job_id``."""
    return IdempotencyKeyReusedError(f"this {KEY_HEADER} was sent before with another request, which made job "
                                     f"{job_id}; send a new key with a new request (or the same request to "
                                     f"get that job)")
