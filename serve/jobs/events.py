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


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EventFormatError(f"{what} must be a JSON object")
    return value


def _optional_str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise EventFormatError(f"{what} must be a string")


def _object_event(bucket: Any, obj: Mapping[str, Any], etag_key: str, version_key: str, name: str,
                  where: str) -> ObjectEvent:
    if not isinstance(bucket, str) or not bucket or not isinstance(obj.get("key"), str) or not obj["key"]:
        raise EventFormatError(f"an event without a string {where}.bucket.name and {where}.object.key")
    etag = _optional_str(obj.get(etag_key), f"{where}.object.{etag_key}")
    size = obj.get("size")
    size = size if isinstance(size, int) and not isinstance(size, bool) else None
    sequencer = _optional_str(obj.get("sequencer"), f"{where}.object.sequencer")
    return ObjectEvent(bucket, obj["key"], etag.strip('"') if etag else None,
                       _optional_str(obj.get(version_key), f"{where}.object.{version_key}"), size, name, sequencer)


def _from_s3_record(rec: Any) -> ObjectEvent | None:
    rec = _mapping(rec, "an S3 event record")
    name = rec.get("eventName", "")
    if not isinstance(name, str) or not name.startswith(("ObjectCreated:", "s3:ObjectCreated:")):
        return None
    s3 = _mapping(rec.get("s3"), "s3")
    bucket = _mapping(s3.get("bucket"), "s3.bucket").get("name")
    obj = _mapping(s3.get("object"), "s3.object")
    ev = _object_event(bucket, obj, "eTag" if "eTag" in obj else "etag", "versionId", name.removeprefix("s3:"), "s3")
    return ObjectEvent(ev.bucket, unquote_plus(ev.key), ev.etag, ev.version_id, ev.size, ev.event_name, ev.sequencer)


def _from_eventbridge(msg: Mapping[str, Any]) -> ObjectEvent | None:
    if msg.get("detail-type") != "Object Created":
        return None
    d = _mapping(msg.get("detail"), "detail")
    bucket = _mapping(d.get("bucket"), "detail.bucket").get("name")
    obj = _mapping(d.get("object"), "detail.object")
    reason = d.get("reason", "PutObject")
    return _object_event(bucket, obj, "etag", "version-id", "ObjectCreated:" + str(reason), "detail")


#: SNS wraps an S3 event once; a relay (SNS to SNS) may add a layer. Deeper is not an event.
MAX_ENVELOPES = 3


def parse_message(body: str | bytes | Mapping[str, Any], _envelopes: int = 0) -> list[ObjectEvent]:
    """Every object-created event in one message (any shape above); [] for test and other events."""
    if isinstance(body, (str, bytes)):
        try:
            msg = json.loads(body)
        except ValueError as e:
            raise EventFormatError("the message body is not JSON") from e
        except RecursionError as e:  # 60 KB of '[' is enough
            raise EventFormatError("the message body nests JSON too deeply") from e
    else:
        msg = body
    if not isinstance(msg, Mapping):
        raise EventFormatError("the message body is not a JSON object")
    if msg.get("Type") == "Notification" and "Message" in msg:  # SNS envelope
        if _envelopes >= MAX_ENVELOPES:
            raise EventFormatError(f"the message wraps more than {MAX_ENVELOPES} SNS envelopes; "
                                   f"send the S3 event record itself")
        return parse_message(msg["Message"], _envelopes + 1)
    if msg.get("Event") == "s3:TestEvent":
        return []
    if "Records" in msg:
        records = msg.get("Records") or []
        if not isinstance(records, list):
            raise EventFormatError("'Records' must be a list of S3 event records")
        out = []
        for rec in records:
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
