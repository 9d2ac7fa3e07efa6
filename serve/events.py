"""Parse object-created notifications into :class:`ObjectEvent` s.

Accepted shapes (one message may hold several records):

- S3's ``{"Records": [...]}`` (SQS from S3, MinIO webhooks): the object key is
  URL-encoded (``+`` for space) and is decoded with ``unquote_plus``; only
  ``ObjectCreated:*`` records count; ``s3:TestEvent`` (sent when a
  notification is configured) is recognised and ignored;
- SNS-wrapped (``{"Type": "Notification", "Message": "<json>"}``): unwrapped;
- EventBridge (``"detail-type": "Object Created"``, ``detail.bucket.name``,
  ``detail.object.key``): EventBridge keys are not URL-encoded.

Only volume files (:data:`VOLUME_SUFFIXES`) are kept; others are ignored by
suffix. Duplicate records of one object version (a multipart upload may be
announced more than once; delivery is at-least-once) collapse into one per
batch; across batches the job's idempotency key absorbs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import unquote_plus

from serve.errors import MrisegError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".zip")


class EventFormatError(MrisegError):
    """The message is not a notification format mriseg understands."""

    status = 400
    title = "Unrecognised event"


@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    key: str
    etag: str | None = None
    version_id: str | None = None
    size: int | None = None
    event_name: str = "ObjectCreated:Put"
    sequencer: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def identity(self) -> tuple:
        """One object version (what duplicates share)."""
        return (self.bucket, self.key, self.version_id or (self.etag or "").strip('"'))


def is_volume_key(key: str) -> bool:
    """A volume mriseg can read (NIfTI, .mha, .nrrd, a zip of one DICOM series); folders never are."""
    low = key.lower()
    return not key.endswith("/") and any(low.endswith(s) for s in VOLUME_SUFFIXES)


def _from_s3_record(rec: Mapping[str, Any]) -> ObjectEvent | None:
    name = str(rec.get("eventName", ""))
    if not name.startswith(("ObjectCreated:", "s3:ObjectCreated:")):
        return None
    s3 = rec.get("s3") or {}
    bucket = (s3.get("bucket") or {}).get("name")
    obj = s3.get("object") or {}
    if not bucket or "key" not in obj:
        raise EventFormatError("an S3 event record without s3.bucket.name / s3.object.key")
    etag = obj.get("eTag") or obj.get("etag")
    return ObjectEvent(bucket, unquote_plus(str(obj["key"])), etag.strip('"') if etag else None,
                       obj.get("versionId"), obj.get("size"), name.removeprefix("s3:"), obj.get("sequencer"))


def _from_eventbridge(msg: Mapping[str, Any]) -> ObjectEvent | None:
    if msg.get("detail-type") != "Object Created":
        return None
    d = msg.get("detail") or {}
    bucket = (d.get("bucket") or {}).get("name")
    obj = d.get("object") or {}
    if not bucket or "key" not in obj:
        raise EventFormatError("an EventBridge 'Object Created' event without detail.bucket.name / detail.object.key")
    etag = obj.get("etag")
    return ObjectEvent(bucket, str(obj["key"]), etag.strip('"') if etag else None, obj.get("version-id"),
                       obj.get("size"), "ObjectCreated:" + str(d.get("reason", "PutObject")), obj.get("sequencer"))


def parse_message(body: str | bytes | Mapping[str, Any]) -> list[ObjectEvent]:
    """Every object-created event in one message (any shape above); [] for test and other events."""
    if isinstance(body, (str, bytes)):
        try:
            msg = json.loads(body)
        except ValueError as e:
            raise EventFormatError("the message body is not JSON") from e
    else:
        msg = body
    if not isinstance(msg, Mapping):
        raise EventFormatError("the message body is not a JSON object")
    if msg.get("Type") == "Notification" and "Message" in msg:  # SNS envelope
        return parse_message(msg["Message"])
    if msg.get("Event") == "s3:TestEvent":
        return []
    if "Records" in msg:
        out = []
        for rec in msg.get("Records") or []:
            ev = _from_s3_record(rec)
            if ev is not None:
                out.append(ev)
        return out
    if "detail-type" in msg:
        ev = _from_eventbridge(msg)
        return [ev] if ev else []
    raise EventFormatError("expected S3 'Records', an SNS notification or an EventBridge event")


def volume_events(events: Iterable[ObjectEvent]) -> list[ObjectEvent]:
    """Volume files only, one event per object version, in arrival order."""
    seen: set[tuple] = set()
    out = []
    for ev in events:
        if not is_volume_key(ev.key) or ev.identity in seen:
            continue
        seen.add(ev.identity)
        out.append(ev)
    return out
