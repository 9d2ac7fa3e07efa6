"""The formats of the records mriseg-serve writes about jobs: one vocabulary, versioned, validated.

- The **job record** (``mriseg.job/1``): a durable job's state in the jobs store
  (``<jobs>/jobs/<key>.json``, the body of a signed envelope, :mod:`serve.jobs.records`).
- The **output record** (``mriseg.output/1``): the ``job.json`` that ends every output set in S3,
  written by the job runner (signed inline: its ``mac``) and by the API's ``output_prefix`` copy.
- The **writers' metadata** (``mriseg.meta/1``): the ``mriseg.json`` of a local output set
  (``mriseg segment``, the router's results, ``GET .../files/mriseg.json``), what the job.json of an API
  output set is built from.
- The **router's journal record** (``mriseg.journal/1``): one router job on the replica's disk
  (:mod:`serve.router.journal`), what ``GET /v1/segmentations/{id}`` is a view of.
- The **held push** (``mriseg.push/1``): a pushed event job held in S3 until it settles
  (:mod:`serve.jobs.pushes`, the body of a signed envelope).

Every job state is one of the API's: ``queued | running | succeeded | failed | cancelled``. Writers
build and validate through the models here, so nothing malformed is written. Readers accept *legacy*
records, those without a ``format`` member (written before this module): their ``done`` reads as
``succeeded`` and a job.json's ``publishing`` marker as ``running``. A record naming a format this
version does not know (``mriseg.job/2``, say, from a newer server) is refused with
:class:`UnsupportedRecordFormat`, never guessed at. ``docs/formats.md`` holds the JSON Schemas and the
versioning rule; a test keeps them equal to the models'.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.errors import MrisegError

#: the job states, the API's (``GET /v1/segmentations/{id}``) and every record's
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
#: states a job never leaves
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
#: what a job.json can say: an output set is being replaced (``running``), complete, or the reason it failed
OutputStatus = Literal["running", "succeeded", "failed"]

JOB_FORMAT = "mriseg.job/1"
OUTPUT_FORMAT = "mriseg.output/1"
META_FORMAT = "mriseg.meta/1"
JOURNAL_FORMAT = "mriseg.journal/1"
PUSH_FORMAT = "mriseg.push/1"
#: legacy (format-less) states -> this vocabulary: ``done`` was success, ``publishing`` a set being replaced
LEGACY_STATES = {"done": SUCCEEDED, "publishing": RUNNING}

_HEX_MAC = r"^[0-9a-f]{64}$"


class MalformedRecord(ValueError):
    """A record that is not valid in the format it names (or, legacy, not a job record at all)."""


class UnsupportedRecordFormat(MrisegError):
    """A record in a format this version cannot read: written by a newer mriseg-serve."""

    status = 503
    retryable = True
    title = "Record format not supported"


class _Model(BaseModel):
    # strict: a stored "1" is not the number 1, nor true the number 1; forbid: a typo is an error, not lost
    model_config = ConfigDict(strict=True, extra="forbid")


class JobError(_Model):
    """Why a job failed (the API's problem details, less the type)."""

    status: int = Field(description="HTTP status of the failure: 4xx the input or request, 5xx the system")
    title: str = Field(description="short, fixed summary")
    detail: str | None = Field(None, description="what happened and what to do; never a patient's data")
    retryable: bool | None = Field(None, description="true: the same job may succeed when tried again")


class JobRecord(_Model):
    """A durable job's state in the jobs store (the body of a signed envelope)."""

    format: Literal["mriseg.job/1"] = Field(description="this record's format and version")
    key: str = Field(description="the job's idempotency key (input version, options, model checksums)")
    state: JobState = Field(description="queued -> running -> succeeded | failed")
    spec: dict[str, Any] = Field(description="the job's input and options (serve.jobs.spec.JobSpec.to_dict)")
    models: dict[str, str] = Field(description="sub-model name -> checksum of the models the job runs")
    output_prefix: str = Field(description="the s3:// folder the outputs are (or will be) published in")
    owner: str | None = Field(None, description="the worker holding a running claim")
    lease_until: float | None = Field(None, description="epoch seconds: a running claim lapses then unless renewed")
    attempts: int = Field(0, description="claims made so far")
    created: float = Field(default_factory=time.time, description="epoch seconds the record was first written")
    updated: float = Field(default_factory=time.time, description="epoch seconds of the last write")
    error: JobError | None = Field(None, description="why it failed (state failed)")
    outputs: dict[str, str] = Field(default_factory=dict, description="output name -> s3:// URI (succeeded)")


class InputRef(_Model):
    """Which version of the input object was read (``size``/``sha256`` unknown before it was read)."""

    uri: str
    etag: str | None = None
    version_id: str | None = None
    size: int | None = None
    sha256: str | None = None


class OutputOptions(_Model):
    """The options that change an output set (serve.jobs.spec.output_options): what ``mriseg bulk`` compares."""

    roi_subset: list[str] | None = Field(description="structures asked for, sorted; null: all")
    fast: bool = Field(description="the 3 mm model")
    outputs: list[str] = Field(description="output kinds, sorted")
    resampling_order: int | None = Field(description="the input's spline order; null: a set made before the option")


class Software(_Model):
    name: Literal["mriseg-serve"]
    version: str


class OutputRecord(_Model):
    """An output set's ``job.json``: written last, so a ``succeeded`` one vouches for the whole set."""

    format: Literal["mriseg.output/1"] = Field(description="this record's format and version")
    status: OutputStatus = Field(description="running: the set is being replaced; succeeded: complete; "
                                             "failed: the reason, no set")
    job_key: str | None = Field(None, description="the durable job's key (the job runner's sets)")
    site: str | None = Field(None, description="the site the set is for (the job runner's sets)")
    case: str | None = Field(None, description="the case folder name (the job runner's sets)")
    input: InputRef | None = Field(description="the input object version read; null: an uploaded volume")
    options: OutputOptions
    input_cast: str | None = Field(description="int32 where the intensities were cast as TotalSegmentator "
                                               "does, none where not; null: not known")
    software: Software
    models: dict[str, str] = Field(description="sub-model name -> checksum")
    demo_models: bool = Field(description="made by the bundled demo models: not for clinical use")
    structures: dict[str, str] = Field(description="label id -> structure name")
    unavailable: dict[str, str] = Field(description="sub-model -> why a full run skipped it")
    files: list[str] | None = Field(None, description="the set's files in the S3 layout (the API's sets)")
    timings: dict[str, float] | None = Field(None, description="seconds per stage (the job runner's sets)")
    started: float | None = Field(None, description="epoch seconds the job started")
    finished: float = Field(description="epoch seconds the record was made")
    attempt: int | None = Field(None, description="the job record's claim count")
    error: JobError | None = Field(None, description="why it failed (status failed)")
    mac: str | None = Field(None, pattern=_HEX_MAC, description="HMAC-SHA256 over the rest (serve/jobs/records.py, "
                                                                "inline layout); the job runner's sets")


class OutputMeta(_Model):
    """A local output set's ``mriseg.json`` (serve.outputs.writers.write_outputs)."""

    format: Literal["mriseg.meta/1"] = Field(description="this record's format and version")
    structures: dict[str, str] = Field(description="label id -> structure name")
    models: dict[str, str] = Field(description="sub-model name -> checksum")
    unavailable: dict[str, str] = Field(description="sub-model -> why a full run skipped it")
    fast: bool = Field(description="the 3 mm model")
    roi_subset: list[str] | None = Field(description="structures asked for, sorted; null: all")
    demo: bool = Field(description="made by the bundled demo models: not for clinical use")
    resampling_order: int = Field(ge=0, le=5, description="the input's spline order (TotalSegmentator's -ro)")
    input_cast: Literal["int32", "none"] = Field(description="whether the resampled intensities were cast to "
                                                             "int32 as TotalSegmentator does")
    files: dict[str, str] = Field(description="output kind -> file name in the folder")


class SignedEnvelope(_Model):
    """How a job record (or a held push) is stored: serve/jobs/records.py's envelope layout."""

    v: Literal[1] = Field(description="the envelope's version")
    site: str = Field(description="the site the record is for (covered by the MAC)")
    body: dict[str, Any] = Field(description="the record")
    mac: str = Field(pattern=_HEX_MAC, description="HMAC-SHA256 over bucket, key, site and body")


class JournalOptions(_Model):
    """A router job's options (serve.router.state.JobOptions)."""

    roi_subset: list[str] | None = Field(description="structures asked for; null: all")
    fast: bool = Field(description="the 3 mm model")
    outputs: list[str] = Field(description="output kinds")
    output_prefix: str | None = Field(description="the s3:// prefix the outputs are copied to")
    resampling_order: int = Field(ge=0, le=5, description="the input's spline order (TotalSegmentator's -ro)")


class JournalRecord(_Model):
    """A router job on its replica's disk (serve.router.journal): what a restarted replica resumes or answers."""

    format: Literal["mriseg.journal/1"] = Field(description="this record's format and version")
    site: str = Field(description="the site the job belongs to")
    options: JournalOptions
    input_uri: str | None = Field(description="the s3:// input; null: an upload (spooled on the replica's disk)")
    id: str = Field(description="the job's id")
    status: JobState = Field(description="a job state")
    created: float = Field(description="epoch seconds the job was accepted")
    started: float | None = Field(description="epoch seconds it got a router slot")
    finished: float | None = Field(description="epoch seconds it settled")
    start_seq: int | None = Field(description="the order in which jobs got a router slot")
    timings: dict[str, float] = Field(description="seconds per stage")
    submodels: dict[str, dict[str, Any]] = Field(description="sub-model -> its call's timings and attempts")
    outputs: dict[str, str] = Field(description="output name -> local path or s3:// URI")
    structures: dict[str, str] = Field(description="label id -> structure name")
    unavailable: dict[str, str] = Field(description="sub-model -> why a full run skipped it")
    error: JobError | None = Field(description="why it failed (status failed)")
    resumed: int = Field(ge=0, description="router restarts it was running through")
    demo: bool = Field(description="made by the bundled demo models: not for clinical use")
    input_cast: Literal["int32", "none"] | None = Field(description="int32 where the intensities were cast as "
                                                                    "TotalSegmentator does; null until prepared")
    idempotency_key: str | None = Field(description="the site's Idempotency-Key of the POST that made it")
    request_hash: str | None = Field(description="that POST's fingerprint")


class PushRecord(_Model):
    """A pushed event job held in S3 until it settles (serve.jobs.pushes; the body of a signed envelope)."""

    format: Literal["mriseg.push/1"] = Field(description="this record's format and version")
    spec: dict[str, Any] = Field(description="the job's input and options (serve.jobs.spec.JobSpec.to_dict)")
    attempts: int = Field(ge=0, description="runs that did not settle the job")
    created: float = Field(description="epoch seconds the push was held")
    not_before: float = Field(description="epoch seconds: no run before then (the backoff after a run)")


#: every model documented in docs/formats.md, by the heading it appears under
DOCUMENTED: dict[str, type[BaseModel]] = {"JobRecord": JobRecord, "OutputRecord": OutputRecord,
                                          "OutputMeta": OutputMeta, "JournalRecord": JournalRecord,
                                          "PushRecord": PushRecord, "SignedEnvelope": SignedEnvelope}
#: the kinds whose readers share one rule (validated where they name their format, legacy as they are)
VERSIONED: dict[type[BaseModel], str] = {OutputMeta: META_FORMAT, JournalRecord: JOURNAL_FORMAT,
                                         PushRecord: PUSH_FORMAT}


def format_of(doc: Any, expected: str) -> str | None:
    """The record's ``format``.

    Args:
        doc: the parsed record.
        expected: the format this version reads.

    Returns:
        ``expected``, or None for a legacy record (no ``format``); :class:`MalformedRecord` when ``doc`` is not
        a JSON object, :class:`UnsupportedRecordFormat` when it names another format.
    """
    if not isinstance(doc, Mapping):
        raise MalformedRecord("not a JSON object")
    if "format" not in doc:
        return None
    fmt = doc["format"]
    if fmt != expected:
        raise UnsupportedRecordFormat(
            f"a record has format {str(fmt)[:40]!r}; this mriseg-serve reads {expected} (and legacy records "
            f"without a format) only. A later format comes from a newer mriseg-serve: run that version on "
            f"every replica and tool that shares these records")
    return fmt


def _why(e: ValidationError) -> str:
    first = e.errors()[0]
    return f"field {'.'.join(str(p) for p in first['loc']) or '(record)'}: {first['msg']}"


def read_job_record(doc: Any) -> JobRecord:
    """A stored job record (an envelope's body), in this version's vocabulary.

    Args:
        doc: the parsed body.

    Returns:
        The record; a legacy one (no ``format``) is read with ``done`` as ``succeeded``, its missing
        optional fields at their defaults and members this version does not know left out. :class:`MalformedRecord` when it is not a valid job
        record; :class:`UnsupportedRecordFormat` when it names another format.
    """
    if format_of(doc, JOB_FORMAT) is None:
        # members this version does not know are left out, as readers before formats did
        doc = {k: v for k, v in doc.items() if k in JobRecord.model_fields}
        state, error = doc.get("state"), doc.get("error")
        doc["format"] = JOB_FORMAT
        doc["state"] = LEGACY_STATES.get(state, state) if isinstance(state, str) else state
        if isinstance(error, Mapping):
            doc["error"] = {k: v for k, v in error.items() if k in JobError.model_fields}
    try:
        return JobRecord.model_validate(doc)
    except ValidationError as e:
        raise MalformedRecord(_why(e)) from None


def read_output_record(doc: Any) -> dict[str, Any]:
    """A job.json as read, in this version's vocabulary.

    Args:
        doc: the parsed job.json (with or without its ``mac``).

    Returns:
        The document; a ``mriseg.output/1`` one validated, a legacy one (no ``format``: its members vary
        with the version that wrote it) with only its ``status`` translated (``done`` -> ``succeeded``,
        ``publishing`` -> ``running``). :class:`MalformedRecord` when it is not valid;
        :class:`UnsupportedRecordFormat` when it names another format.
    """
    if format_of(doc, OUTPUT_FORMAT) is None:
        status = doc.get("status")
        return {**doc, "status": LEGACY_STATES.get(status, status) if isinstance(status, str) else status}
    try:
        OutputRecord.model_validate(doc)
    except ValidationError as e:
        raise MalformedRecord(_why(e)) from None
    return dict(doc)


def read_output_meta(doc: Any) -> dict[str, Any]:
    """A ``mriseg.json`` as read: :func:`read_versioned` with :class:`OutputMeta`."""
    return read_versioned(doc, OutputMeta)


def read_versioned(doc: Any, model: type[BaseModel]) -> dict[str, Any]:
    """A record of one of the plainly versioned kinds (:data:`VERSIONED`) as read.

    Args:
        doc: the parsed record (a held push: the envelope's body).
        model: its kind's model: :class:`OutputMeta`, :class:`JournalRecord` or :class:`PushRecord`.

    Returns:
        The document; one naming the model's format validated, a legacy one (no ``format``) as it is (its
        reader's legacy rules apply). :class:`MalformedRecord` when it is not valid;
        :class:`UnsupportedRecordFormat` when it names another format.
    """
    if format_of(doc, VERSIONED[model]) is not None:
        try:
            model.model_validate(doc)
        except ValidationError as e:
            raise MalformedRecord(_why(e)) from None
    return dict(doc)


def versioned_doc(model: type[BaseModel], fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of a record of one of the plainly versioned kinds (:data:`VERSIONED`) to be written, validated.

    Args:
        model: its kind's model.
        fields: the record's members (``format`` may be left out).

    Returns:
        The document (``format`` first); :class:`pydantic.ValidationError` when it is not valid, so nothing
        malformed is ever stored.
    """
    # exclude_unset: a member left out (an optional error detail) stays out, so a record reads back as written
    return model.model_validate({"format": VERSIONED[model], **fields}).model_dump(mode="json", exclude_unset=True)


def output_meta_doc(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of a ``mriseg.json`` to be written: :func:`versioned_doc` with :class:`OutputMeta`."""
    return versioned_doc(OutputMeta, fields)


def job_record_doc(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of a job record to be written, validated.

    Args:
        fields: the record's members (``format`` may be left out).

    Returns:
        The document (``format`` first); :class:`pydantic.ValidationError` when it is not a valid record,
        so nothing malformed is ever stored.
    """
    rec = JobRecord.model_validate({"format": JOB_FORMAT, **fields})
    return rec.model_dump(mode="json")


def check_output_record(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` once it is a valid ``mriseg.output/1`` job.json (signed or not); for writers, just before
    writing.

    Args:
        doc: the job.json to be written.

    Returns:
        ``doc`` as a plain dict; :class:`pydantic.ValidationError` when it is not valid.
    """
    OutputRecord.model_validate(json.loads(json.dumps(dict(doc))))  # as a reader will see it: tuples are lists
    return dict(doc)


def output_record(status: str, *, options: Mapping[str, Any], input: Mapping[str, Any] | None,
                  meta: Mapping[str, Any], software_version: str, site: str | None = None,
                  case: str | None = None, job_key: str | None = None, models: Mapping[str, str] | None = None,
                  files: Sequence[str] | None = None, timings: Mapping[str, float] | None = None,
                  started: float | None = None, attempt: int | None = None,
                  error: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one builder of a job.json (unsigned: the job runner adds its ``mac`` when it writes).

    Args:
        status: ``running`` (the marker while a set is replaced), ``succeeded`` or ``failed``.
        options: :func:`serve.jobs.spec.output_options` of the set.
        input: :func:`serve.storage.staging.input_record` of the object read (None: an upload).
        meta: what the writers or the engine said of the result (``mriseg.json``'s ``structures``,
            ``models``, ``unavailable``, ``demo``, ``input_cast``; all optional).
        software_version: this mriseg-serve's version.
        site: the site (the job runner's sets).
        case: the case folder name (the job runner's sets).
        job_key: the durable job's key.
        models: model checksums where ``meta`` has none (a job that failed before it ran).
        files: the set's files in the S3 layout.
        timings: seconds per stage; ``total_s`` is added when ``started`` is given.
        started: epoch seconds the job started.
        attempt: the job record's claim count.
        error: why the job failed.

    Returns:
        The job.json, validated against :class:`OutputRecord`.
    """
    now = time.time()
    if started is not None and timings is not None:
        timings = {**timings, "total_s": now - started}
    rec = OutputRecord(
        format=OUTPUT_FORMAT, status=status, job_key=job_key, site=site, case=case,
        input=InputRef.model_validate(dict(input)) if input is not None else None,
        options=OutputOptions.model_validate(dict(options)), input_cast=meta.get("input_cast"),
        software=Software(name="mriseg-serve", version=software_version),
        models=dict(meta.get("models") or models or {}), demo_models=bool(meta.get("demo", False)),
        structures={str(k): v for k, v in (meta.get("structures") or {}).items()},
        unavailable=dict(meta.get("unavailable") or {}), files=list(files) if files is not None else None,
        timings=dict(timings) if timings is not None else None, started=started, finished=now, attempt=attempt,
        error=JobError.model_validate(dict(error)) if error is not None else None)
    return rec.model_dump(mode="json", exclude={"mac"})
