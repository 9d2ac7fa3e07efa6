"""What segments a durable job's input: the :class:`Engine` contract, and :class:`SegmenterEngine` in process.

The Ray cluster's engine (:class:`serve.cluster.router_engine.RouterEngine`) hands each job to the Router instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from serve.imaging.sandbox import decode_untrusted
from serve.jobs.spec import JobSpec
from serve.outputs.writers import write_outputs


class Engine(Protocol):
    """What segments: in process (:class:`SegmenterEngine`) or through the Ray cluster."""

    def model_checksums(self, roi_subset: Sequence[str] | None, fast: bool, site: str) -> dict[str, str]:
        """Checksums of the sub-models a job with these options would run, asked for as ``site``."""
        ...

    def segment_file(self, path: Path, spec: JobSpec, outdir: Path) -> dict[str, Any]:
        """Write the outputs of ``path`` into ``outdir`` (serve.outputs' writers' names), its input resampled
        with ``spec.resampling_order``; return ``{"timings": ..., "structures": ..., "models": ..., "demo": ...,
        "input_cast": ...}``."""
        ...


class SegmenterEngine:
    """:class:`serve.inference.pipeline.Segmenter` in this process."""

    def __init__(self, segmenter, max_voxels: int | None = None, sandbox=None):
        self.segmenter = segmenter
        self.max_voxels = max_voxels
        self.sandbox = sandbox  # a serve.imaging.sandbox.SandboxPolicy; None: its defaults
        self.calls = 0  # segmentations actually computed (idempotency is observable)

    def model_checksums(self, roi_subset, fast, site: str = "default") -> dict[str, str]:
        sms, _ = self.segmenter.plan(list(roi_subset) if roi_subset else None, fast)
        return {sm.name: self.segmenter.model(sm.name).checksum for sm in sms}

    def segment_file(self, path: Path, spec: JobSpec, outdir: Path) -> dict[str, Any]:
        volume = decode_untrusted(path, self.max_voxels, self.sandbox)
        self.calls += 1
        result = self.segmenter.segment(volume, list(spec.roi_subset) if spec.roi_subset else None, spec.fast,
                                        resampling_order=spec.resampling_order)
        write_outputs(result, volume, outdir, multilabel="multilabel" in spec.outputs,
                      per_structure="per_structure" in spec.outputs, statistics="statistics" in spec.outputs,
                      preview="preview" in spec.outputs, roi_subset=spec.roi_subset)
        return {"timings": result.timings, "structures": {str(k): v for k, v in result.structures.items()},
                "models": result.models, "unavailable": result.unavailable, "demo": result.demo,
                "input_cast": result.input_cast}
