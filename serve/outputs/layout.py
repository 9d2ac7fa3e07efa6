"""Every output file's name, defined once: in a result folder and in the S3 output layout.

A result folder (:func:`serve.outputs.writers.write_outputs`) uses TotalSegmentator's names;
the S3 layout (``{site}/{case}/``, docs/s3-and-jobs.md) renames the multilabel file and the
per-structure folder, keeps ``mriseg.json`` out (``job.json`` carries its content) and ends
with ``job.json``. The HTTP API's result download is named as in S3.
"""

from __future__ import annotations

#: the multilabel map with the label table (TotalSegmentator's ``--ml`` output)
MULTILABEL = "segmentations.nii.gz"
#: one binary mask per structure, ``<structure>.nii.gz`` inside
PER_STRUCTURE_DIR = "segmentations"
STATISTICS = "statistics.json"
PREVIEW = "preview.png"
#: what the writers did (structures, models, options, files); never uploaded
METADATA = "mriseg.json"
#: the job record; in S3 the completion marker, written last
JOB_RECORD = "job.json"

#: the multilabel file's name in S3 and in the API's download
S3_MULTILABEL = "segmentation.nii.gz"
#: the per-structure folder's name in S3
S3_PER_STRUCTURE_DIR = "structures"

#: result-folder names -> S3 layout names (a folder's files keep their names inside it)
S3_NAMES = {MULTILABEL: S3_MULTILABEL, PER_STRUCTURE_DIR: S3_PER_STRUCTURE_DIR}
#: result-folder files that are not uploaded
NOT_UPLOADED = (METADATA,)

#: the file of each output kind (the keys of ``write_outputs``'s answer and of ``mriseg.json``'s ``files``)
FILE_OF_KIND = {"multilabel": MULTILABEL, "per_structure": PER_STRUCTURE_DIR, "statistics": STATISTICS,
                "preview": PREVIEW, "metadata": METADATA}


def s3_name(rel: str) -> str | None:
    """The S3 layout name of a file in a result folder.

    Args:
        rel: Its path relative to the folder, ``/``-separated (``segmentations/liver.nii.gz``).

    Returns:
        Its name in the S3 layout (``structures/liver.nii.gz``), or None when it is not uploaded.
    """
    first, _, rest = rel.partition("/")
    if first in NOT_UPLOADED:
        return None
    first = S3_NAMES.get(first, first)
    return f"{first}/{rest}" if rest else first
