"""The router's record of one segmentation job, as the API reports it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve.errors import MrisegError
from serve.records_schema import TERMINAL
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER


@dataclass
class JobOptions:
    roi_subset: list[str] | None = None
    fast: bool = False
    outputs: tuple[str, ...] = ("multilabel", "statistics", "preview")
    output_prefix: str | None = None
    resampling_order: int = DEFAULT_RESAMPLING_ORDER  # the input's spline order (TotalSegmentator's -ro, 0..5)


@dataclass
class Job:
    site: str
    options: JobOptions
    input_uri: str | None = None          # s3:// input, or None for an upload
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"                # queued | running | succeeded | failed | cancelled (serve.records_schema)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    start_seq: int | None = None          # order in which jobs got a router slot
    timings: dict[str, float] = field(default_factory=dict)
    submodels: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)    # output name -> local path or s3:// URI
    structures: dict[int, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    resumed: int = 0                      # router restarts it was running through (what max_resumes bounds)
    demo: bool = False                    # made by demo models (NOT FOR CLINICAL USE)
    input_cast: str | None = None         # "int32" | "none" once prepared (serve.inference.preprocess), else None
    idempotency_key: str | None = None    # the site's Idempotency-Key of the POST that made it (serve.api.idempotency)
    request_hash: str | None = None       # that POST's fingerprint: the same key with another request is a 422

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def fail(self, exc: BaseException) -> None:
        self.status, self.finished = "failed", time.time()
        if isinstance(exc, MrisegError):
            self.error = {"status": exc.status, "title": exc.title, "detail": exc.message,
                          "retryable": exc.retryable}
        else:
            self.error = {"status": 500, "title": "Internal error", "retryable": False,
                          "detail": f"unexpected {type(exc).__name__}; the operators have the log"}

    def public(self, result_url: str | None = None) -> dict[str, Any]:
        """The job as ``GET /v1/segmentations/{id}`` shows it to its own site."""
        out = {
            "id": self.id, "status": self.status, "site": self.site,
            "input": self.input_uri or "upload",
            "options": {"roi_subset": self.options.roi_subset, "fast": self.options.fast,
                        "outputs": list(self.options.outputs), "output_prefix": self.options.output_prefix,
                        "resampling_order": self.options.resampling_order},
            "input_cast": self.input_cast,
            "created": self.created, "started": self.started, "finished": self.finished,
            "start_seq": self.start_seq,
            "timings": self.timings, "submodels": self.submodels,
            "structures": {str(k): v for k, v in self.structures.items()},
            "unavailable": self.unavailable,
            "outputs": {k: v for k, v in self.outputs.items() if v.startswith("s3://")},
            "error": self.error,
            "resumed": self.resumed, "demo_models": self.demo,
        }
        if self.status == "succeeded" and result_url:
            out["result_url"] = result_url
        return out
