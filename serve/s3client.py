"""S3 connection settings and a boto3 client built from them.

Works against any S3 endpoint (AWS, MinIO, SeaweedFS, Ceph). Credentials
come from boto3's standard chain (environment, profile, IRSA/workload
identity) unless explicit keys are given, which only the embedded server and
tests do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import boto3
from botocore.config import Config

from serve.errors import MrisegError
from serve.settings_checks import is_number


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str = "us-east-1"
    path_style: bool = False
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "S3Settings":
        d = dict(d or {})
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise MrisegError(f"unknown S3 setting(s): {sorted(unknown)}; allowed: {sorted(allowed)}")
        for name, ok, what in (
                ("endpoint_url", lambda v: v is None or (isinstance(v, str) and re.match(r"https?://[^/]", v)),
                 "an http:// or https:// URL"),
                ("region", lambda v: isinstance(v, str) and v, "a region name"),
                ("path_style", lambda v: isinstance(v, bool), "true or false"),  # "false" would be truthy
                ("access_key_id", lambda v: v is None or isinstance(v, str), "a string"),
                ("secret_access_key", lambda v: v is None or isinstance(v, str), "a string"),
                ("max_attempts", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 "an integer >= 1"),
                ("connect_timeout_s", lambda v: is_number(v, 0, above=True), "a finite number > 0"),
                ("read_timeout_s", lambda v: is_number(v, 0, above=True), "a finite number > 0")):
            if name in d and not ok(d[name]):
                shown = "(hidden)" if name == "secret_access_key" else repr(d[name])[:80]
                raise MrisegError(f"S3 setting {name} must be {what}, not {shown}")
        return cls(**d)


def make_client(settings: S3Settings | None = None):
    """A boto3 S3 client with retries ("standard" mode backs off on 5xx and throttling only)."""
    s = settings or S3Settings()
    cfg = Config(
        region_name=s.region,
        retries={"max_attempts": s.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if s.path_style else "auto"},
        connect_timeout=s.connect_timeout_s,
        read_timeout=s.read_timeout_s,
        request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    kwargs: dict[str, Any] = {"config": cfg}
    if s.endpoint_url:
        kwargs["endpoint_url"] = s.endpoint_url
    if s.access_key_id:
        kwargs["aws_access_key_id"] = s.access_key_id
        kwargs["aws_secret_access_key"] = s.secret_access_key
    return boto3.session.Session().client("s3", **kwargs)


def has_dot_segments(key: str) -> bool:
    """A ``.`` or ``..`` path segment: S3 keeps it literally, but a server or a path join may resolve it."""
    return any(part in (".", "..") for part in key.split("/"))


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MAX_KEY_BYTES = 1024  # S3's limit


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). Anything else is a clear error.

    The key is taken literally: ``?`` and ``#`` are legal in S3 keys, not a query or fragment.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise MrisegError(f"expected an s3://bucket/key URI, got {str(uri)[:200]!r}")
    bucket, _, key = uri[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise MrisegError(f"expected an s3://bucket/key URI with a valid bucket name, got {uri[:200]!r}")
    key = key.lstrip("/")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise MrisegError(f"the key of an s3:// URI is at most {MAX_KEY_BYTES} bytes (S3's limit); this one is longer")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in key):
        raise MrisegError("the key of this s3:// URI holds control characters or unpaired surrogates; "
                          "rename the object")
    return bucket, key
