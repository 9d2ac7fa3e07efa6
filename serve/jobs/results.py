"""The completion marker of an output set: the succeeded ``job.json`` that S3 readers and ``mriseg bulk`` trust.

Every output set in S3 ends with one, uploaded last, also when the caller (the API's router) did
not write one: :func:`upload_results` adds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from serve.jobs.spec import OUTPUT_KINDS, output_options, software_version
from serve.outputs import layout
from serve.records_schema import SUCCEEDED, output_record, read_output_meta
from serve.storage import staging
from serve.storage.s3client import S3Settings
from serve.storage.staging import ObjectInfo


def completion_doc(outdir: Path, source: ObjectInfo | None = None) -> dict:
    """A succeeded job.json (``mriseg.output/1``) from the writers' ``mriseg.json`` (structures, models,
    options, files), built by :func:`serve.records_schema.output_record` as a job's own is.

    Its ``options`` take the form of :meth:`serve.jobs.spec.JobSpec.options`, and its ``input`` (``source``, the
    object read) the form of a job's own job.json, so ``mriseg bulk`` can tell a replaced input from this one.
    """
    meta = read_output_meta(json.loads((outdir / layout.METADATA).read_text()))
    options = output_options(meta.get("roi_subset"), meta.get("fast", False),
                             set(meta.get("files", {})) & set(OUTPUT_KINDS), meta.get("resampling_order"))
    return output_record(SUCCEEDED, options=options, input=staging.input_record(source), meta=meta,
                         software_version=software_version(),
                         files=sorted(n for n in (layout.s3_name(k) for k in meta.get("files", {}).values()) if n))


def upload_results(outdir: str | os.PathLike, prefix: str, settings: S3Settings | Mapping[str, Any] | None = None,
                   on_uploaded: Callable[[str], None] | None = None) -> dict[str, str]:
    """Upload the writers' output folder under ``prefix``, ending with a succeeded ``job.json``.

    Args:
        outdir: The folder :func:`serve.outputs.writers.write_outputs` filled (its ``mriseg.json`` included).
        prefix: The ``s3://`` prefix of the output set.
        settings: S3 client settings.
        on_uploaded: Called with each layout name once uploaded.

    Returns:
        ``{layout name: s3 URI}``, ``job.json`` last.
    """
    outdir = Path(outdir)
    if not (outdir / layout.JOB_RECORD).exists() and (outdir / layout.METADATA).is_file():
        (outdir / layout.JOB_RECORD).write_text(json.dumps(completion_doc(outdir), indent=1, sort_keys=True))
    return staging.upload_dir(outdir, prefix, settings, on_uploaded=on_uploaded)
