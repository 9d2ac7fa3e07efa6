"""The API's request bodies as pydantic models, so the served OpenAPI document types them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.jobs.store import OUTPUT_KINDS

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
