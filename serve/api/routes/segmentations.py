"""Segmentation jobs: submit one for a volume in S3, read its state and outputs, cancel it.

Every answer that is a job is a :class:`~serve.api.models.SegmentationJob` (its OpenAPI schema says so).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from serve.api import idempotency
from serve.api.deps import SiteDep, Svc
from serve.api.models import SegmentationJob, SegmentationRequest
from serve.api.problems import problem
from serve.errors import MrisegError, ServiceUnavailableError
from serve.outputs import layout
from serve.router.service import JobService
from serve.router.state import Job, JobOptions

routes = APIRouter(tags=["segmentations"])

#: what a route answering a job declares: the body's model, and no member the job does not have (result_url)
JOB_ANSWER: dict[str, Any] = {"response_model": SegmentationJob, "response_model_exclude_unset": True}
#: a POST's answers: 202 a new job, 200 a settled (?wait=true) or replayed one, both a job
POST_ANSWERS: dict[str, Any] = {**JOB_ANSWER, "status_code": 202, "responses": {
    **idempotency.POST_RESPONSES, 200: {**idempotency.POST_RESPONSES[200], "model": SegmentationJob}}}

FILES = {layout.STATISTICS: ("statistics", "application/json"), layout.PREVIEW: ("preview", "image/png"),
         layout.METADATA: ("metadata", "application/json")}


def _job_answer(job: Job, status_code: int, response: Response) -> dict:
    url = f"/v1/segmentations/{job.id}"
    response.status_code = status_code
    response.headers["Location"] = url
    return job.public(result_url=f"{url}/result")


async def finish(svc: JobService, job: Job, wait: bool, response: Response) -> Any:
    """The answer to a POST that made or found ``job``.

    Args:
        svc: the job service.
        job: the job.
        wait: answer once the job has settled (``?wait=true``).
        response: the route's response (its status and ``Location`` are set).

    Returns:
        The job's body (202, or 200 when waited for), or the problem details of the job's failure.
    """
    if not wait:
        return _job_answer(job, 202, response)
    await svc.wait(job)
    if job.status == "failed":
        e = job.error
        return problem(e["status"], e["title"], e["detail"], retryable=e["retryable"], job_id=job.id)
    return _job_answer(job, 200, response)


@routes.post("/v1/segmentations", **POST_ANSWERS)
async def create_segmentation(body: SegmentationRequest, svc: Svc, who: SiteDep, response: Response,
                              wait: bool = Query(False, description="answer when the job has finished"),
                              idempotency_key: idempotency.KeyHeader = None):
    """Segment a volume from S3. 202 with a job id; ``?wait=true`` answers when done. With an
    ``Idempotency-Key``, the same request again answers the job the first one made (200)."""
    key = idempotency.check_key(idempotency_key)
    opts = JobOptions(body.roi_subset, body.fast, tuple(body.outputs), body.output_prefix, body.resampling_order)
    job, created = svc.submit_once(who, opts, key, idempotency.json_fingerprint(body.model_dump(mode="json")),
                                   input_uri=body.input)
    return idempotency.mark_replay(await finish(svc, job, wait, response), response, not created)


@routes.get("/v1/segmentations/{job_id}", **JOB_ANSWER)
async def get_segmentation(job_id: str, svc: Svc, who: SiteDep) -> dict:
    """Status, per-stage and per-sub-model timings, result locations."""
    job = svc.get(who, job_id)
    return job.public(result_url=f"/v1/segmentations/{job.id}/result")


@routes.get("/v1/segmentations/{job_id}/result", responses={200: {"content": {"application/gzip": {}}}})
async def get_result(job_id: str, svc: Svc, who: SiteDep) -> FileResponse:
    """The multilabel NIfTI (``segmentation.nii.gz``); 409 until the job has succeeded."""
    path = svc.result_path(who, job_id)
    if not path.is_file():
        raise ServiceUnavailableError("the result file is not on this router replica any more; "
                                      "read it from the job's output prefix")
    return FileResponse(path, media_type="application/gzip", filename=layout.S3_MULTILABEL)


@routes.get("/v1/segmentations/{job_id}/files/{name}")
async def get_file(job_id: str, name: str, svc: Svc, who: SiteDep) -> FileResponse:
    """Other outputs of a succeeded job: ``statistics.json``, ``preview.png``, ``mriseg.json``."""
    if name not in FILES:
        raise MrisegError(f"unknown output file {name!r}; available: {sorted(FILES)}")
    kind, media = FILES[name]
    path = svc.result_path(who, job_id, kind)
    if not path.is_file():
        raise ServiceUnavailableError("the file is not on this router replica any more; "
                                      "read it from the job's output prefix")
    return FileResponse(path, media_type=media, filename=name)


@routes.delete("/v1/segmentations/{job_id}", **JOB_ANSWER)
async def cancel_segmentation(job_id: str, svc: Svc, who: SiteDep) -> dict:
    """Cancel a queued or running job; 409 if it has already finished."""
    job = svc.cancel(who, job_id)
    return job.public()
