"""Writing a job's results: the output files on the router's disk, then (where asked) their upload to S3.

The writer and the uploader are the steps a job's write stage runs in a worker thread; both can be
passed in (:class:`ResultWriter`), so a caller can slow or record them without patching this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from serve.errors import ServiceUnavailableError
from serve.inference.pipeline import SegmentationResult, is_demo_model
from serve.inference.resampling import CAST_NONE
from serve.jobs import results
from serve.outputs import layout
from serve.outputs.writers import write_outputs
from serve.router.metrics import JobMetrics
from serve.router.state import Job
from serve.storage.staging import ObjectInfo

if TYPE_CHECKING:  # the settings class lives with the facade that composes this part
    from serve.router.service import RouterSettings

# (result, volume, folder, output kinds, roi_subset) -> output kind -> local path
WriteStep = Callable[..., dict[str, str]]
# (local folder, s3:// prefix) -> {"s3:<kind>": s3:// URI}
UploadStep = Callable[[Path, str], dict[str, str]]


def write_result(result: SegmentationResult, volume: Any, outdir: Path, outputs: Sequence[str],
                 roi_subset: Sequence[str] | None = None) -> dict[str, str]:
    """serve.outputs' writers, with the output kinds named as the API names them.

    Args:
        result: the segmentation.
        volume: the input volume (its grid and header).
        outdir: the folder written into (made where missing).
        outputs: the output kinds asked for.
        roi_subset: the structures asked for, None for all.

    Returns:
        Output kind -> the local path written.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    written = write_outputs(result, volume, outdir, multilabel="multilabel" in outputs,
                            per_structure="per_structure" in outputs, statistics="statistics" in outputs,
                            preview="preview" in outputs, roi_subset=roi_subset)
    return {str(k): str(v) for k, v in written.items()}


class ResultWriter:
    """A job's outputs: written on the router's disk, and uploaded to its ``output_prefix`` unless cancelled."""

    def __init__(self, settings: RouterSettings, metrics: JobMetrics, write: WriteStep | None = None,
                 upload: UploadStep | None = None):
        """Args:
            settings: the router's settings (``s3``).
            metrics: where staged bytes are counted.
            write: writes the output files (default :func:`write_result`).
            upload: uploads an output folder to a prefix (default: :func:`serve.jobs.results.upload_results`,
                counted in ``bytes_staged``).
        """
        self.settings, self.metrics = settings, metrics
        self.write_files = write or write_result
        self.upload = upload or self._upload

    def write(self, job: Job, volume: Any, labels: np.ndarray, per_model: dict, structures: dict, outdir: Path,
              models: dict, source: ObjectInfo | None = None) -> dict[str, str]:
        """Write the job's outputs into ``outdir``, then upload them to its ``output_prefix`` unless cancelled.

        Args:
            job: the job (its options; its ``demo`` flag is set here).
            volume: the input volume.
            labels: the merged label map on the input grid.
            per_model: each sub-model's label map.
            structures: label -> structure name.
            outdir: the job's local results folder.
            models: sub-model name -> its model (checksums, demo or not).
            source: the S3 object version read, named in the upload's ``job.json`` (None: an upload).

        Returns:
            Output kind -> local path, and ``s3:<kind>`` -> URI for what was uploaded.

        Raises:
            ServiceUnavailableError: the results disk failed.
        """
        job.demo = any(is_demo_model(m) for m in models.values())
        result = SegmentationResult(labels, per_model, structures, np.array(volume.affine, copy=True),
                                    dict(job.timings), {n: m.checksum for n, m in models.items()},
                                    dict(job.unavailable), job.options.fast, demo=job.demo,
                                    resampling_order=job.options.resampling_order,
                                    input_cast=job.input_cast or CAST_NONE)
        try:
            outputs = self.write_files(result, volume, outdir, job.options.outputs, job.options.roi_subset)
        except OSError as e:  # a full or failing results disk
            raise ServiceUnavailableError(f"the router could not write the results of job {job.id} "
                                          f"({e.strerror or type(e).__name__}); resubmit it") from e
        if job.options.output_prefix and job.status != "cancelled":
            if source is not None and (outdir / layout.METADATA).is_file():
                # the completion marker names the object version read, so ``mriseg bulk`` reruns a
                # replaced input instead of taking these outputs for its
                (outdir / layout.JOB_RECORD).write_text(json.dumps(results.completion_doc(outdir, source), indent=1,
                                                                     sort_keys=True))
            outputs.update(self.upload(outdir, job.options.output_prefix))
        return outputs

    def _upload(self, outdir: Path, prefix: str) -> dict[str, str]:
        uploaded = results.upload_results(outdir, prefix, settings=self.settings.s3)
        self.metrics.bytes_staged.labels("out").inc(sum(p.stat().st_size for p in outdir.rglob("*") if p.is_file()))
        return {f"s3:{k}": v for k, v in uploaded.items()}
