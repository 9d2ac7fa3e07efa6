"""S3 connection settings and a boto3 client built from them.

Works against any S3 endpoint (AWS, MinIO, SeaweedFS, Ceph). Credentials
come from boto3's standard chain (environment, profile, IRSA/workload
identity) unless explicit keys are given, which only the embedded server and
tests do.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Mapping

import boto3
from botocore.config import Config
from pydantic import BaseModel, Field, StrictBool

from serve.errors import MrisegError
from serve.settings_checks import STRICT_FROZEN, Says, check, number, whole


_URL = r"^https?://[^/]"


class S3Settings(BaseModel):
    """Where and how to reach S3 (the ``s3`` app arg, or a site's keys in ``mriseg up``)."""

    model_config = STRICT_FROZEN

    endpoint_url: Annotated[str, Field(pattern=_URL), Says("an http:// or https:// URL")] | None = None
    region: Annotated[str, Field(min_length=1), Says("a region name")] = "us-east-1"
    path_style: Annotated[StrictBool, Says("true or false")] = False  # "false" would be truthy
    access_key_id: Annotated[str, Says("a string")] | None = Field(default=None, repr=False)
    secret_access_key: Annotated[str, Says("a string", secret=True)] | None = Field(default=None, repr=False)
    max_attempts: Annotated[whole(1), Says("an integer >= 1")] = 5
    connect_timeout_s: number(0, above=True, says="a finite number > 0") = 5.0
    read_timeout_s: number(0, above=True, says="a finite number > 0") = 60.0

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "S3Settings":
        """The settings from an ``s3`` mapping.

        Args:
            d: the mapping; None: every default (boto3's credential chain, AWS).

        Returns:
            The checked settings.

        Raises:
            MrisegError: "S3 setting {key} must be ...", the secret key never shown.
        """
        return check(cls, d, "s3", unknown_what="S3 setting")


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
