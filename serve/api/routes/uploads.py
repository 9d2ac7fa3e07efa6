"""Segment an uploaded volume: a raw body or a multipart ``file``, read under the size limit."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from serve.api import idempotency
from serve.api.deps import SiteDep, Svc, split_csv
from serve.api.guards import TOO_LARGE_HINT, UPLOAD_PATH, read_capped, unbounded
from serve.api.models import DEFAULT_OUTPUTS, RESAMPLING_ORDER_DOC
from serve.api.routes.segmentations import POST_ANSWERS, finish
from serve.errors import LengthRequiredError, MrisegError, UnsupportedFormatError, VolumeTooLargeError
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.router.state import JobOptions
from serve.router.submission import check_upload_name

routes = APIRouter(tags=["segmentations"])

RAW_UPLOAD_TYPES = ("application/octet-stream", "application/gzip", "application/x-gzip",
                    "application/x-nifti", "application/nifti", "application/zip", "application/dicom")
_BODY = {"requestBody": {"content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}


@routes.post(UPLOAD_PATH, **POST_ANSWERS, openapi_extra=_BODY)
async def upload_segmentation(
        request: Request, svc: Svc, who: SiteDep, response: Response,
        filename: str | None = Query(None, max_length=255,
                                     description="name with the file's suffix (.nii.gz, .nii, .mha, .nrrd, .zip); "
                                                 "given, it wins over a multipart part's own name"),
        roi_subset: str | None = Query(None, description="comma-separated structure names"),
        fast: bool = Query(False), outputs: str | None = Query(None, description="comma-separated"),
        output_prefix: str | None = Query(None, max_length=2048),
        resampling_order: int = Query(DEFAULT_RESAMPLING_ORDER, ge=0, le=5, description=RESAMPLING_ORDER_DOC),
        wait: bool = Query(False), idempotency_key: idempotency.KeyHeader = None):
    """Segment an uploaded volume (raw body or multipart ``file``), up to the size limit (413 beyond).
    With an ``Idempotency-Key``, the same file with the same options again answers the job the first made."""
    key = idempotency.check_key(idempotency_key)
    limit = svc.settings.max_upload_bytes
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + (64 << 10):
        raise VolumeTooLargeError(f"upload of {int(declared)} bytes exceeds the {limit}-byte limit "
                                  f"(router.max_upload_bytes, which S3 inputs share); {TOO_LARGE_HINT}")
    # an empty ?outputs= names no output (400, as an empty list in the JSON route); absent means the default
    opts = JobOptions(split_csv(roi_subset), fast,
                      tuple(DEFAULT_OUTPUTS if outputs is None else split_csv(outputs)), output_prefix,
                      resampling_order)
    svc.validate_options(who, opts)  # fail fast, before reading the body
    if ctype == "multipart/form-data" and unbounded(request):
        # the form parser would spool all of it to disk before the limit applies
        raise LengthRequiredError("a multipart upload needs a Content-Length header; send it unchunked, "
                                  "or stream it as application/octet-stream")
    if ctype != "multipart/form-data" and ctype not in RAW_UPLOAD_TYPES:
        raise UnsupportedFormatError(f"content type {ctype!r} is not accepted; send the file as "
                                     f"application/octet-stream or multipart/form-data (field 'file')")
    with svc.upload_slot(who):  # 429 before the body is read when the site is at its job limit
        if ctype == "multipart/form-data":
            data, part_name = await _read_multipart(request, limit)
            filename = filename or part_name  # a browser names a Blob part "blob": ?filename= says what it is
        else:
            data = await read_capped(request, limit)
        filename = filename or "upload.nii.gz"
        if not data:
            raise MrisegError("the upload is empty")
        check_upload_name(filename)
        # the options as sent (opts' structure list is normalised by validate_options), the file as read
        fields = {"filename": filename, "roi_subset": split_csv(roi_subset), "fast": fast,
                  "outputs": split_csv(outputs), "output_prefix": output_prefix, "resampling_order": resampling_order}
        fingerprint = idempotency.upload_fingerprint(fields, data) if key else ""
        job, created = svc.submit_once(who, opts, key, fingerprint, upload=data, filename=filename)
    del data  # spooled to disk by submit: a client waiting for its result must not hold the body in memory
    return idempotency.mark_replay(await finish(svc, job, wait, response), response, not created)


async def _read_multipart(request: Request, limit: int) -> tuple[bytes, str | None]:
    form = await request.form(max_files=1, max_fields=10)
    part = form.get("file")
    if part is None or isinstance(part, str):
        raise MrisegError("multipart upload needs a file field named 'file'")
    data = await part.read(limit + 1)
    await form.close()
    if len(data) > limit:
        raise VolumeTooLargeError(f"upload exceeds the {limit}-byte limit")
    return data, part.filename or None
