"""The API's request and response bodies as pydantic models, so the served OpenAPI document types them.

A job's body (:class:`SegmentationJob`) is a view of the router's job record (``mriseg.journal/1``,
:mod:`serve.router.journal`), not of the durable jobs' ``mriseg.job/1``: the same state vocabulary
(:data:`serve.records_schema.JobState`), less what only the router needs (the ``Idempotency-Key``, the
request fingerprint, local file paths).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.jobs.spec import OUTPUT_KINDS
from serve.records_schema import JobState

DEFAULT_OUTPUTS = ["multilabel", "statistics", "preview"]
RESAMPLING_ORDER_DOC = (f"spline order (0-5) of the input's resampling to the model spacing, TotalSegmentator's -ro "
                        f"(default {DEFAULT_RESAMPLING_ORDER}, as TotalSegmentator 2.18); integer-valued inputs are "
                        f"then cast to int32 as there, others keep float intensities")


class SegmentationRequest(BaseModel):
    """A volume already in the site's S3 prefix."""

    model_config = ConfigDict(extra="forbid")
    input: str = Field(description="s3://bucket/key of a NIfTI, .mha/.nrrd or DICOM zip inside the site's prefixes",
                       max_length=2048)
    roi_subset: list[str] | None = Field(None, description="structures wanted (default: all 80)", max_length=100)
    fast: bool = Field(False, description="3 mm total_fast model (first 50 structures only)")
    outputs: list[str] = Field(default_factory=lambda: list(DEFAULT_OUTPUTS),
                               description=f"any of {list(OUTPUT_KINDS)}")
    output_prefix: str | None = Field(None, description="s3:// prefix (inside the site's) to copy outputs to",
                                      max_length=2048)
    resampling_order: StrictInt = Field(DEFAULT_RESAMPLING_ORDER, ge=0, le=5, description=RESAMPLING_ORDER_DOC)


class JobOptionsView(BaseModel):
    """The options a job runs with, as accepted (structure names normalised)."""

    roi_subset: list[str] | None = Field(None, description="structures asked for; null: all")
    fast: bool = Field(False, description="the 3 mm total_fast model")
    outputs: list[str] = Field(default_factory=list, description=f"output kinds, any of {list(OUTPUT_KINDS)}")
    output_prefix: str | None = Field(None, description="the s3:// prefix the outputs are copied to")
    resampling_order: int = Field(DEFAULT_RESAMPLING_ORDER, description="the input's spline order (0-5)")


class JobErrorView(BaseModel):
    """Why a job failed: the problem details it would have been answered with, less the type."""

    model_config = ConfigDict(extra="allow")  # an older router's record may say more; it is shown as it is
    status: int = Field(description="HTTP status of the failure: 4xx the input or request, 5xx the system")
    title: str = Field(description="short, fixed summary")
    detail: str | None = Field(None, description="what happened and what to do")
    retryable: bool | None = Field(None, description="true: the same job may succeed when submitted again")


class SegmentationJob(BaseModel):
    """A job as its own site sees it (``GET /v1/segmentations/{id}``, and the answer to a POST or DELETE).

    ``id`` and ``status`` are always there; the router sends every other member too, and ``result_url``
    once the job has succeeded.
    """

    id: str = Field(description="the job's id")
    status: JobState = Field(description="queued -> running -> succeeded | failed | cancelled")
    site: str | None = Field(None, description="the site the job belongs to")
    input: str | None = Field(None, description="the s3:// input, or 'upload'")
    options: JobOptionsView | None = None
    input_cast: str | None = Field(None, description="int32 where the intensities were cast as TotalSegmentator "
                                                     "does, none where not; null until prepared")
    created: float | None = Field(None, description="epoch seconds the job was accepted")
    started: float | None = Field(None, description="epoch seconds it got a router slot")
    finished: float | None = Field(None, description="epoch seconds it settled")
    start_seq: int | None = Field(None, description="the order in which jobs got a router slot")
    timings: dict[str, float] | None = Field(None, description="seconds per stage")
    submodels: dict[str, dict[str, Any]] | None = Field(None, description="sub-model -> its call's timings")
    structures: dict[str, str] | None = Field(None, description="label id -> structure name")
    unavailable: dict[str, str] | None = Field(None, description="sub-model -> why a full run skipped it")
    outputs: dict[str, str] | None = Field(None, description="output name -> s3:// URI (with output_prefix)")
    error: JobErrorView | None = Field(None, description="why it failed (status failed)")
    resumed: int | None = Field(None, description="router restarts it was running through")
    demo_models: bool | None = Field(None, description="made by the bundled demo models: not for clinical use")
    result_url: str | None = Field(None, description="the multilabel NIfTI (status succeeded)")
