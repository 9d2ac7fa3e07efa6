"""``Idempotency-Key`` on the API's POSTs: the key's form, the request's fingerprint, replay answers.

A client sends a key of its choosing with ``POST /v1/segmentations`` or
``/v1/segmentations/upload``. The router stores it, with a fingerprint of the
request, on the job it makes (:class:`~serve.router.state.Job`, and so
in the journal), and answers a later POST of the same site with the same key
with that job instead of making another: a client whose answer was lost can
send the request again without running it twice. Keys are per site, so one
site's key never finds another site's job. The lookup and the job's creation
run in one stretch of the ingress's event loop with no ``await`` between them,
so concurrent duplicates make one job.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Mapping

from fastapi import Header, Response

from serve.errors import MrisegError
from serve.router.idempotency import KEY_HEADER

#: the answer header that says a POST found the job an earlier POST made (Stripe's name for it)
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
#: UUIDs, ULIDs, base64 and hex digests all fit; nothing that needs quoting or escaping in a log or a header
KEY_CHARS = "A-Za-z0-9._~+/=:-"
KEY_PATTERN = f"^[{KEY_CHARS}]{{1,{MAX_KEY_LENGTH}}}$"
_KEY = re.compile(KEY_PATTERN)
KEY_DOC = (f"a key of the client's choosing (1-{MAX_KEY_LENGTH} characters of {KEY_CHARS}, e.g. a UUID; the "
           f"structured-field form in double quotes is accepted too): a POST of the same site with the same key "
           f"and the same request answers the job the first one made (200, {REPLAYED_HEADER}: true) instead of "
           f"making another; with another request it is a 422")

# documented with its form (schemathesis sends valid and invalid ones) but checked by check_key, for a 400
# that says what a key may be rather than the schema's generic 422
KeyHeader = Annotated[str, Header(alias=KEY_HEADER, description=KEY_DOC,
                                  json_schema_extra={"maxLength": MAX_KEY_LENGTH, "pattern": KEY_PATTERN})]
#: the 200 of ``?wait=true`` and of a replay, beside the 202 of a new job
POST_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "the job, settled (``?wait=true``), or the job an earlier POST with this Idempotency-Key made",
    "headers": {REPLAYED_HEADER: {"description": "true where an earlier POST with this Idempotency-Key made the job",
                                  "schema": {"type": "string", "enum": ["true"]}}}}}


class IdempotencyKeyError(MrisegError):
    """The ``Idempotency-Key`` header is not a key this API takes."""

    status = 400
    title = "Invalid Idempotency-Key"


def check_key(value: str | None) -> str | None:
    """The key of an ``Idempotency-Key`` header, or None where the request has none.

    Args:
        value: the header as sent; a structured-field string (``"abc"``) is unquoted first.

    Returns:
        The key, or None for no header.

    Raises:
        IdempotencyKeyError: 400 for an empty key, one over 255 characters, or one with other characters.
    """
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _KEY.fullmatch(key):
        # the key itself is not quoted back: a client that put data there should not see it echoed into logs
        why = (f"is {len(key)} characters long" if len(key) > MAX_KEY_LENGTH
               else "is empty" if not key else "holds other characters")
        raise IdempotencyKeyError(f"the {KEY_HEADER} header must be 1-{MAX_KEY_LENGTH} characters of "
                                  f"{KEY_CHARS} (e.g. a UUID); this one {why}")
    return key


def json_fingerprint(body: Mapping[str, Any]) -> str:
    """The fingerprint of a JSON request: sha256 of its fields as parsed, in a canonical form.

    Args:
        body: the request's fields, defaults filled in (``SegmentationRequest.model_dump()``), so that
            key order, whitespace and a default sent or left out make no difference.

    Returns:
        A hex digest.
    """
    return hashlib.sha256(_canonical(body)).hexdigest()


def upload_fingerprint(fields: Mapping[str, Any], data: bytes) -> str:
    """The fingerprint of an upload: sha256 over its option fields (canonical JSON) and the file's bytes.

    Args:
        fields: the upload's options as parsed (file name, structures, outputs, ...), ``wait`` left out.
        data: the uploaded file.

    Returns:
        A hex digest.
    """
    h = hashlib.sha256(_canonical(fields))
    h.update(b"\0")  # JSON never holds a NUL byte: the fields end here whatever the file starts with
    h.update(data)
    return h.hexdigest()


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def mark_replay(answer: Any, response: Response, replayed: bool) -> Any:
    """Turn the answer to a POST that found an earlier job into a replay: 200 instead of 202, and the header.

    Args:
        answer: what the route returns (the job document, or a problem response for a failed job under
            ``?wait=true``).
        response: the route's response, whose status and headers a returned document gets.
        replayed: whether the job was found rather than made.

    Returns:
        ``answer``.
    """
    if replayed:
        target = answer if isinstance(answer, Response) else response
        target.headers[REPLAYED_HEADER] = "true"
        if target.status_code == 202:  # not accepted now: the job exists, as it is now
            target.status_code = 200
    return answer
