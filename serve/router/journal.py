"""The router's job records on disk, so a restarted router replica still knows its jobs.

Each job is one JSON file, ``{journal_dir}/{id}.json`` (``router.journal_dir``,
by default ``{results_dir}/.jobs``), replaced atomically on every state change
(queued, running, settled). Its format is ``mriseg.journal/1``
(:mod:`serve.records_schema`, docs/formats.md); a record without a format
(written before formats) is read by the rules before them, and one of a format
this version does not know is left where it is, unread. A new router replica reads them back: settled jobs
answer status and result calls as before; jobs that were queued or running are
resumed where their input is still at hand (an ``s3://`` input, or an upload
still spooled on disk) and failed with a reason otherwise. Nothing accepted is
silently forgotten.

The journal holds job ids, sites, options, outcomes and each job's
``Idempotency-Key`` with its request's fingerprint (so a restarted router still
answers a repeated POST with the job it made), never voxel data. It
survives what its folder survives: a replica restart on the same node, or a pod
restart where the folder is a persistent volume. A folder on a volume of its own
(as in the k8s overlays) keeps it apart from the spooled uploads and the
results, so a flood of those cannot fill the journal's disk. The journal counts
the bytes of its records (:attr:`JobJournal.total_bytes`) so the router can
bound it by size as well as by job count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from serve.router.state import Job, JobOptions
from serve.errors import MrisegError
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER, check_resampling_order
from serve.records_schema import (JOURNAL_FORMAT, JournalRecord, UnsupportedRecordFormat, format_of, read_versioned,
                                  versioned_doc)

log = logging.getLogger(__name__)


def job_to_record(job: Job) -> dict[str, Any]:
    """A ``mriseg.journal/1`` record of every field of ``job``, validated (nothing malformed is written).

    Args:
        job: the job.

    Returns:
        The JSON-able record; :class:`pydantic.ValidationError` when the job would not make a valid one.
    """
    rec = asdict(job)
    rec["options"]["outputs"] = list(job.options.outputs)
    rec["structures"] = {str(k): v for k, v in job.structures.items()}
    return versioned_doc(JournalRecord, rec)


_NUM = (int, float)
_NONE = type(None)
#: field -> accepted JSON types; a record with anything else is set aside, not half-loaded
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "site": (str,), "id": (str,), "status": (str,), "input_uri": (str, _NONE), "created": _NUM,
    "started": (*_NUM, _NONE), "finished": (*_NUM, _NONE), "start_seq": (int, _NONE), "timings": (dict,),
    "submodels": (dict,), "outputs": (dict,), "structures": (dict,), "unavailable": (dict,),
    "error": (dict, _NONE), "resumed": (int,), "options": (dict, _NONE), "input_cast": (str, _NONE),
    "idempotency_key": (str, _NONE), "request_hash": (str, _NONE)}
_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def job_from_record(rec: dict[str, Any]) -> Job:
    """The inverse of :func:`job_to_record`. A legacy record (no ``format``, written before formats) is read
    with unknown fields dropped, as before.

    Raises TypeError/ValueError for a record this version cannot trust (:meth:`JobJournal.load` sets it aside),
    :class:`~serve.records_schema.UnsupportedRecordFormat` for one of another format (a newer version's).
    """
    if not isinstance(rec, dict):
        raise TypeError("a job record is a JSON object")
    versioned = format_of(rec, JOURNAL_FORMAT) is not None
    for name, types in _FIELD_TYPES.items():
        v = rec.get(name)
        if (name in rec or name in ("site", "id")) and (not isinstance(v, types) or isinstance(v, bool)):
            raise TypeError(f"field {name!r} has the wrong type")
    if not isinstance(rec.get("demo", False), bool):
        raise TypeError("field 'demo' has the wrong type")
    if rec.get("status", "queued") not in _STATUSES:
        raise ValueError("unknown status")
    known = {f.name for f in fields(Job)}
    opts = dict(rec.get("options") or {})
    try:  # a record from before the option ran at the default once resumed; any other value is refused
        order = check_resampling_order(opts.get("resampling_order", DEFAULT_RESAMPLING_ORDER))
    except MrisegError as e:
        raise ValueError(e.message) from None
    options = JobOptions(opts.get("roi_subset"), bool(opts.get("fast", False)),
                         tuple(opts.get("outputs") or JobOptions().outputs), opts.get("output_prefix"), order)
    if versioned:  # the whole record: within mriseg.journal/1 a missing or unknown member is an error too
        read_versioned(rec, JournalRecord)
    kw = {k: v for k, v in rec.items() if k in known and k != "options"}
    kw["structures"] = {int(k): v for k, v in (rec.get("structures") or {}).items()}
    return Job(options=options, **kw)


class JournalUnhealthyError(RuntimeError):
    """The journal's folder cannot take records: the router replica is unhealthy (Ray Serve replaces it)."""


class JobJournal:
    """Job records in one directory; each write is atomic (write a temporary file, then rename)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # job id -> bytes of its record; saves come from worker threads as well as the event loop
        self._sizes: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def _account(self, job_id: str, size: int) -> None:
        with self._lock:
            self._total += size - self._sizes.pop(job_id, 0)
            if size:
                self._sizes[job_id] = size

    @property
    def total_bytes(self) -> int:
        """The bytes of every record this journal holds (what ``router.journal_max_bytes`` bounds)."""
        return self._total

    def size(self, job_id: str) -> int:
        """The bytes of the job's record (0 when it has none)."""
        return self._sizes.get(job_id, 0)

    def save(self, job: Job) -> None:
        """Record the job's current state."""
        data = json.dumps(job_to_record(job)).encode()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(job.id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._account(job.id, len(data))

    def probe(self, min_free_bytes: int) -> None:
        """Check that the folder still takes a record: a file can be written and synced, and space is left.

        Args:
            min_free_bytes: the least free space on the folder's file system.

        Raises:
            JournalUnhealthyError: naming what is wrong (the folder gone or read-only, the disk full).
        """
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-probe-", suffix=".json")  # load() sweeps leftovers
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(b"{}")
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                Path(tmp).unlink(missing_ok=True)
            free = shutil.disk_usage(self.root).free
        except OSError as e:
            raise JournalUnhealthyError(f"the job journal's folder {self.root} cannot take a record "
                                        f"({e.strerror or type(e).__name__}); jobs accepted now could not be resumed "
                                        f"after a restart: fix or remount the volume") from e
        if free < min_free_bytes:
            raise JournalUnhealthyError(f"the job journal's folder {self.root} has {free} bytes free, under "
                                        f"router.journal_min_free_bytes ({min_free_bytes}); free space on its volume")

    def remove(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)
        self._account(job_id, 0)

    def load(self) -> list[Job]:
        """Every recorded job, oldest first. An unreadable record is logged and set aside, not fatal; one of a
        format this version does not know (a newer version's) is logged and left where it is."""
        jobs = []
        for p in self.root.glob("*.json"):
            if p.name.startswith(".tmp-"):
                p.unlink(missing_ok=True)  # a write that never finished
                continue
            try:
                data = p.read_bytes()
                job = job_from_record(json.loads(data))
                jobs.append(job)
                self._account(job.id, len(data))
            except UnsupportedRecordFormat as e:
                # a newer version's record (a downgraded replica): kept as it is for that version, not guessed at
                log.error("job record %s is left as it is, not loaded: %s", p.name, e.message)
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                log.error("job record %s is unreadable (%s); moved aside", p.name, type(e).__name__)
                p.rename(p.with_suffix(".unreadable"))
        return sorted(jobs, key=lambda j: j.created)
