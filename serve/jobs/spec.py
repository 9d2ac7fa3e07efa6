"""What a durable job is: its input object, the options that change its output, and its identity.

A job is identified by its *idempotency key*: a hash of the input object
(bucket, key, ETag or version id), the options that change the output
(``roi_subset`` sorted, ``fast``, the outputs wanted, ``resampling_order``) and
the checksums of the sub-models that would run. The same input with the same options and models
is the same job: a redelivered event or a resubmission finds the finished
record (:mod:`serve.jobs.store`) and gets the existing result without recomputing. Different options
or models make a different key and never overwrite another job's outputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from serve import __version__
from serve.errors import MrisegError
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER, check_resampling_order
from serve.storage.s3client import parse_s3_uri

OUTPUT_KINDS = ("multilabel", "per_structure", "statistics", "preview")
DEFAULT_OUTPUTS = ("multilabel", "statistics", "preview")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".zip")


def software_version() -> str:
    """This package's version (``0.0.0+source`` in a source tree that was never installed)."""
    return __version__


MAX_CASE_BYTES = 200


def case_name(key: str, input_prefix: str | None = None) -> str:
    """The output folder name of an input key: its path below the inbox prefix, volume suffix removed.

    ``input_prefix=""`` is an inbox at the bucket's root (the whole key names the
    case); ``None``, no inbox: the file name alone does.

    S3 keys are literal, but tools that sync outputs to disk are not: ``.``/``..``
    and empty segments become ``_``, and a name over ``MAX_CASE_BYTES`` bytes is
    shortened with a digest of the whole (so it stays unique and the output keys
    stay under S3's 1024-byte limit).
    """
    inside = input_prefix is not None and key.startswith(input_prefix)
    rel = key[len(input_prefix):] if inside else PurePosixPath(key).name
    low = rel.lower()
    for s in VOLUME_SUFFIXES:
        if low.endswith(s):
            rel = rel[: -len(s)]
            break
    case = "/".join("_" if p in ("", ".", "..") else p for p in rel.strip("/").split("/"))
    if len(case.encode()) > MAX_CASE_BYTES:
        digest = hashlib.sha256(case.encode()).hexdigest()[:16]
        head = case.encode()[: MAX_CASE_BYTES - 17].decode("utf-8", "ignore").rstrip("/")
        case = f"{head}~{digest}"
    return case


@dataclass(frozen=True)
class JobSpec:
    """One input object and what to make of it."""

    input_uri: str                      # s3://bucket/key
    output_root: str                    # s3://out-bucket/prefix; outputs go to {output_root}/{site}/{case}/
    site: str = "default"
    etag: str | None = None             # filled from HEAD when None
    version_id: str | None = None
    roi_subset: tuple[str, ...] | None = None
    fast: bool = False
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    input_prefix: str | None = None     # the inbox prefix (case names are relative to it; "" is the bucket root)
    resampling_order: int = DEFAULT_RESAMPLING_ORDER  # the input's spline order (TotalSegmentator's -ro, 0..5)

    def __post_init__(self) -> None:
        check_resampling_order(self.resampling_order)  # a record or rule naming another is refused, never guessed

    @property
    def case(self) -> str:
        return case_name(parse_s3_uri(self.input_uri)[1], self.input_prefix)

    @property
    def output_prefix(self) -> str:
        return f"{self.output_root.rstrip('/')}/{self.site}/{self.case}/"

    def options(self) -> dict[str, Any]:
        """The options that change the output, canonical."""
        return output_options(self.roi_subset, self.fast, self.outputs, self.resampling_order)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roi_subset"] = list(self.roi_subset) if self.roi_subset else None
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JobSpec":
        d = dict(d)
        if d.get("roi_subset") is not None:
            d["roi_subset"] = tuple(d["roi_subset"])
        d["outputs"] = tuple(d.get("outputs") or DEFAULT_OUTPUTS)
        try:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except MrisegError as e:  # a stored spec no request could have made: unreadable, as its readers expect
            raise ValueError(e.message) from None


def output_options(roi_subset: Sequence[str] | None, fast: bool, outputs: Iterable[str],
                   resampling_order: int | None) -> dict[str, Any]:
    """The options that change an output set, in the one form every job.json records (and bulk compares).

    Args:
        roi_subset: the structures asked for (None: all).
        fast: the 3 mm model.
        outputs: the output kinds.
        resampling_order: the input's spline order; None for a set that does not record one (made before
            the option existed, with another resampling), which therefore never equals a new job's options.

    Returns:
        ``{"roi_subset", "fast", "outputs", "resampling_order"}``.
    """
    return {"roi_subset": sorted(roi_subset) if roi_subset else None, "fast": bool(fast),
            "outputs": sorted(set(outputs)), "resampling_order": resampling_order}


def idempotency_key(spec: JobSpec, model_checksums: Mapping[str, str]) -> str:
    """The job's identity: input object version, output-changing options, model checksums."""
    bucket, key = parse_s3_uri(spec.input_uri)
    version = spec.version_id if spec.version_id and spec.version_id != "null" else None
    ident = {"bucket": bucket, "key": key, "version": version or (spec.etag or "").strip('"'),
             "options": spec.options(), "models": dict(sorted(model_checksums.items())),
             "output_root": spec.output_root.rstrip("/"), "site": spec.site}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
