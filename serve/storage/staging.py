"""Move volumes and outputs between S3 and local disk, safely.

- Downloads stream to disk (or memory) and stop as soon as the object is
  larger than the caller's limit (:class:`VolumeTooLargeError`).
- Uploads carry ``x-amz-checksum-sha256`` (the server verifies it on receipt)
  and an ``x-amz-meta-sha256`` of the whole file. Large files go multipart.
- Downloads are verified: a whole-object SHA-256 checksum is compared with
  the bytes received. A multipart upload's checksum is *composite* (a hash of
  the part hashes, shown as ``<b64>-<parts>``) and cannot be compared with the
  whole file; then the ``sha256`` metadata written by our uploads is used, and
  for foreign multipart objects only the size is checked (logged at debug).
  ETags are never treated as MD5s (multipart and KMS ETags are not).
- Transient failures (throttling, 5xx, connection refused/reset, timeouts) are
  retried: botocore's "standard" mode per request, and a bounded backoff
  around the whole transfer for outages longer than that. 4xx answers are
  never retried; they become a :class:`S3RequestError` naming the bucket
  (never the key: keys may carry patient data).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, ReadTimeoutError)

from serve.errors import MrisegError, StorageError, VolumeTooLargeError
from serve.outputs import layout
from serve.storage.s3client import S3Settings, make_client, parse_s3_uri

log = logging.getLogger(__name__)

T = TypeVar("T")

CHUNK = 1 << 20
MULTIPART_THRESHOLD = 16 << 20
MULTIPART_CHUNK = 8 << 20
SHA256_META = "sha256"



class S3RequestError(StorageError):
    """S3 answered 4xx: not retried. ``status`` is S3's (403, 404, 400...)."""

    retryable = False
    title = "Object storage refused the request"

    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.status = status
        self.code = code


class S3UnavailableError(StorageError):
    """S3 kept failing with 5xx/throttling/connection errors after all retries (502)."""

    status = 502
    retryable = True
    title = "Object storage unavailable"


class IntegrityError(StorageError):
    """The bytes received do not match the checksum S3 holds (502: retry the job)."""

    status = 502
    retryable = True
    title = "Checksum mismatch"


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None
    sha256: str | None        # hex digest of the bytes received/sent
    verified: str             # "sha256" | "sha256-metadata" | "size"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


# -- clients, errors, retries --------------------------------------------------
def resolve_settings(settings: S3Settings | Mapping[str, Any] | None) -> S3Settings:
    if isinstance(settings, S3Settings):
        return settings
    return S3Settings.from_mapping(settings)


_clients: dict[S3Settings, Any] = {}


def client_for(settings: S3Settings | Mapping[str, Any] | None):
    """A cached boto3 client per settings (boto3 clients are thread-safe)."""
    s = resolve_settings(settings)
    c = _clients.get(s)
    if c is None:
        c = _clients[s] = make_client(s)
    return c


TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}


def _client_error_status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: connection trouble, timeouts, throttling, 5xx."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # boto3's S3UploadFailedError hides the cause in __context__
        seen.add(id(exc))
        if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
                            ConnectionError)):
            return True
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            return _client_error_status(exc) >= 500 or code in TRANSIENT_CODES
        if isinstance(exc, BotoCoreError) and "connect" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def storage_error(exc: BaseException, bucket: str, action: str) -> StorageError:
    """A clear job error for a failed S3 call; names the bucket, never the key."""
    inner: BaseException | None = exc
    while inner is not None and not isinstance(inner, ClientError):
        inner = inner.__cause__ or inner.__context__
    if isinstance(inner, ClientError) and not is_transient(inner):
        status = _client_error_status(inner) or 400
        code = inner.response.get("Error", {}).get("Code", "Unknown")
        hint = {
            403: "check the S3 credentials and the bucket policy of this deployment",
            404: "check that the bucket and object exist",
        }.get(status, "the request was refused; it is not retried")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = "the access key or secret key is wrong"
        return S3RequestError(f"S3 refused to {action} in bucket '{bucket}': {status} {code} ({hint})", status, code)
    return S3UnavailableError(f"S3 unavailable while trying to {action} in bucket '{bucket}': "
                              f"{type(exc).__name__}; retried and gave up, try again later")


def with_retries(fn: Callable[[], T], *, bucket: str, action: str, deadline_s: float = 60.0,
                 first_delay_s: float = 0.5, max_delay_s: float = 8.0) -> T:
    """Run ``fn`` again with exponential backoff while it fails transiently, up to ``deadline_s``."""
    give_up = time.monotonic() + deadline_s
    delay = first_delay_s
    attempt = 1
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:  # classified below; anything not transient is raised as a job error
            if not is_transient(e):
                if isinstance(e, (ClientError, BotoCoreError)) or _wraps_client_error(e):
                    raise storage_error(e, bucket, action) from e
                raise
            if time.monotonic() + delay > give_up:
                raise storage_error(e, bucket, action) from e
            log.warning("S3 %s in bucket %s failed transiently (attempt %d, %s); retrying in %.1fs",
                        action, bucket, attempt, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
            attempt += 1


def _wraps_client_error(e: BaseException) -> bool:
    inner = e.__cause__ or e.__context__
    return isinstance(inner, ClientError)


# -- checksums --------------------------------------------------------------------
def b64_sha256(hexdigest: str) -> str:
    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_download(head: Mapping[str, Any], digest: str, size: int, bucket: str) -> str:
    """Compare what was received with what S3 holds; returns how it was verified."""
    expected_size = head.get("ContentLength")
    if expected_size is not None and int(expected_size) != size:
        raise IntegrityError(f"object in bucket '{bucket}' was truncated: received {size} of {expected_size} bytes")
    remote = head.get("ChecksumSHA256")
    whole = remote and "-" not in remote and head.get("ChecksumType", "FULL_OBJECT") != "COMPOSITE"
    if whole:
        if b64_sha256(digest) != remote:
            raise IntegrityError(f"SHA-256 of an object in bucket '{bucket}' does not match its x-amz-checksum")
        return "sha256"
    meta = (head.get("Metadata") or {}).get(SHA256_META)
    if meta:
        if meta != digest:
            raise IntegrityError(f"SHA-256 of an object in bucket '{bucket}' does not match its sha256 metadata")
        return "sha256-metadata"
    # A composite (multipart) checksum or none at all: the size is all we can compare honestly.
    log.debug("object in bucket %s has no whole-object checksum; verified by size only", bucket)
    return "size"


# -- downloads ----------------------------------------------------------------------
REPLACED_RETRIES = 2  # an object rewritten faster than it can be read still fails, as a 412
def _download(uri: str, sink: Callable[[bytes], None], reset: Callable[[], None], max_bytes: int | None,
              settings, deadline_s: float, version_id: str | None = None) -> ObjectInfo:
    bucket, key = parse_s3_uri(uri)
    # "null" is what a bucket without versioning reports: there, the current object is the only one
    pinned = {"VersionId": version_id} if version_id and version_id != "null" else {}
    if not key or key.endswith("/"):
        raise MrisegError(f"s3://{bucket}/{key} names a bucket or a folder, not an object; give the volume's key")
    c = client_for(settings)

    def once() -> ObjectInfo:
        for replaced in range(REPLACED_RETRIES + 1):
            try:
                return read()
            except ClientError as e:  # 412: a new version landed between HEAD and GET; read that one instead
                if _client_error_status(e) != 412 or replaced == REPLACED_RETRIES:
                    raise
                log.info("an object in bucket %s was replaced while it was being read; reading it again", bucket)
        raise AssertionError("unreachable")

    def read() -> ObjectInfo:
        reset()
        head = c.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED", **pinned)
        size = int(head["ContentLength"])
        if max_bytes is not None and size > max_bytes:
            raise VolumeTooLargeError(f"the object is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB. "
                                      f"Crop or downsample the volume, or raise the server's size limit.")
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        # pin the version read to the one checked above (an overwrite in between must not mix)
        if head.get("VersionId") and head["VersionId"] != "null":
            kwargs["VersionId"] = head["VersionId"]
        else:
            kwargs["IfMatch"] = head["ETag"]
        resp = c.get_object(**kwargs)
        h = hashlib.sha256()
        received = 0
        for chunk in resp["Body"].iter_chunks(CHUNK):
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:  # the object grew after HEAD
                resp["Body"].close()
                raise VolumeTooLargeError(f"the object is larger than the limit of {max_bytes / 1e6:.1f} MB")
            h.update(chunk)
            sink(chunk)
        digest = h.hexdigest()
        how = verify_download(head, digest, received, bucket)
        return ObjectInfo(bucket, key, received, head["ETag"], head.get("VersionId"), digest, how)

    return with_retries(once, bucket=bucket, action="read an object", deadline_s=deadline_s)


def download_bytes(uri: str, max_bytes: int | None = None,
                   settings: S3Settings | Mapping[str, Any] | None = None, deadline_s: float = 60.0) -> bytes:
    """The whole object in memory, verified; :class:`VolumeTooLargeError` past ``max_bytes``."""
    return download_object(uri, max_bytes, settings, deadline_s)[0]


def download_object(uri: str, max_bytes: int | None = None, settings: S3Settings | Mapping[str, Any] | None = None,
                    deadline_s: float = 60.0) -> tuple[bytes, ObjectInfo]:
    """:func:`download_bytes`, and which version of the object the bytes are (ETag, version id, SHA-256)."""
    buf = bytearray()
    info = _download(uri, buf.extend, buf.clear, max_bytes, settings, deadline_s)
    return bytes(buf), info


def download_file(uri: str, dest: str | os.PathLike, max_bytes: int | None = None,
                  settings: S3Settings | Mapping[str, Any] | None = None, deadline_s: float = 60.0,
                  version_id: str | None = None) -> ObjectInfo:
    """Stream the object to ``dest`` (via a ``.part`` file), verified; returns what was read.

    ``version_id`` reads that version of a versioned object, not whichever is current.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    f = open(tmp, "wb")

    def reset() -> None:
        f.seek(0)
        f.truncate()

    try:
        info = _download(uri, f.write, reset, max_bytes, settings, deadline_s, version_id)
        f.close()
        os.replace(tmp, dest)
        return info
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


# -- uploads ------------------------------------------------------------------------
def _transfer_config():
    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                          max_concurrency=4, use_threads=True)


CONTENT_TYPES = {".json": "application/json", ".png": "image/png", ".gz": "application/gzip",
                 ".nii": "application/octet-stream"}


def upload_file(path: str | os.PathLike, uri: str, settings: S3Settings | Mapping[str, Any] | None = None,
                deadline_s: float = 120.0) -> ObjectInfo:
    """Upload with an SHA-256 checksum (multipart above 16 MB), retried through outages."""
    path = Path(path)
    bucket, key = parse_s3_uri(uri)
    c = client_for(settings)
    digest = sha256_file(path)
    size = path.stat().st_size
    extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {SHA256_META: digest},
             "ContentType": CONTENT_TYPES.get(path.suffix, "application/octet-stream")}

    def once() -> ObjectInfo:
        if size < MULTIPART_THRESHOLD:
            with open(path, "rb") as f:
                resp = c.put_object(Bucket=bucket, Key=key, Body=f, ChecksumSHA256=b64_sha256(digest), **extra)
            if resp.get("ChecksumSHA256") not in (None, b64_sha256(digest)):
                raise IntegrityError(f"S3 stored a different SHA-256 for an object in bucket '{bucket}'")
            return ObjectInfo(bucket, key, size, resp["ETag"], resp.get("VersionId"), digest, "sha256")
        c.upload_file(str(path), bucket, key, ExtraArgs=extra, Config=_transfer_config())
        head = c.head_object(Bucket=bucket, Key=key)
        if int(head["ContentLength"]) != size:
            raise IntegrityError(f"multipart upload to bucket '{bucket}' stored {head['ContentLength']} of {size} bytes")
        return ObjectInfo(bucket, key, size, head["ETag"], head.get("VersionId"), digest, "sha256-parts")

    return with_retries(once, bucket=bucket, action="write an object", deadline_s=deadline_s)


def put_bytes(data: bytes, uri: str, settings: S3Settings | Mapping[str, Any] | None = None,
              content_type: str = "application/octet-stream", deadline_s: float = 60.0, **conditions: str) -> dict:
    """A single PUT with SHA-256 checksum; ``conditions`` are IfNoneMatch/IfMatch (not retried on 412)."""
    bucket, key = parse_s3_uri(uri)
    c = client_for(settings)
    digest = hashlib.sha256(data).hexdigest()

    def once() -> dict:
        return c.put_object(Bucket=bucket, Key=key, Body=data, ChecksumSHA256=b64_sha256(digest),
                            Metadata={SHA256_META: digest}, ContentType=content_type, **conditions)

    return with_retries(once, bucket=bucket, action="write an object", deadline_s=deadline_s)


def put_json(obj: Any, uri: str, settings=None, **conditions: str) -> dict:
    return put_bytes(json.dumps(obj, indent=1, sort_keys=True).encode(), uri, settings, "application/json",
                     **conditions)


def input_record(source: ObjectInfo | None) -> dict | None:
    """The ``input`` of a job.json: which object version was read (``None``: not an S3 input)."""
    if source is None:
        return None
    return {"uri": source.uri, "etag": source.etag, "version_id": source.version_id, "size": source.size,
            "sha256": source.sha256}


def upload_dir(outdir: str | os.PathLike, prefix: str, settings: S3Settings | Mapping[str, Any] | None = None,
               on_uploaded: Callable[[str], None] | None = None,
               last: tuple[str, ...] = (layout.JOB_RECORD,)) -> dict[str, str]:
    """Upload a result folder under ``prefix`` in the S3 layout; files named in ``last`` go last.

    Returns ``{layout name: s3 URI}``. ``on_uploaded(name)`` is called after each file.
    """
    outdir = Path(outdir)
    bucket, key_prefix = parse_s3_uri(prefix.rstrip("/") + "/")
    files = sorted((p for p in outdir.rglob("*") if p.is_file() and not p.name.endswith(".part")),
                   key=lambda p: (p.relative_to(outdir).as_posix() in last, p.relative_to(outdir).as_posix()))
    if layout.JOB_RECORD in last and (outdir / layout.JOB_RECORD).is_file():
        # an earlier set's completion marker must not vouch for files this upload is replacing
        delete(f"s3://{bucket}/{key_prefix}{layout.JOB_RECORD}", settings)
    out: dict[str, str] = {}
    for p in files:
        name = layout.s3_name(p.relative_to(outdir).as_posix())
        if name is None:
            continue
        uri = f"s3://{bucket}/{key_prefix}{name}"
        upload_file(p, uri, settings)
        out[name] = uri
        if on_uploaded:
            on_uploaded(name)
    return out


def delete(uri: str, settings=None) -> None:
    """Delete one object; deleting what is not there is not an error in S3."""
    bucket, key = parse_s3_uri(uri)
    c = client_for(settings)
    with_retries(lambda: c.delete_object(Bucket=bucket, Key=key), bucket=bucket, action="delete an object")


def object_exists(uri: str, settings=None) -> dict | None:
    """HEAD of the object, or None when it does not exist."""
    bucket, key = parse_s3_uri(uri)
    c = client_for(settings)

    def once():
        try:
            return c.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _client_error_status(e) == 404:
                return None
            raise

    return with_retries(once, bucket=bucket, action="read an object")
