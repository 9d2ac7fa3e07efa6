"""``mriseg bulk``: segment every volume under an S3 prefix, resumably, with a report.

Each volume ``s3://bucket/prefix/<rel>.nii.gz`` gets its outputs under
``{--out}/{site}/<rel>/`` (the S3 layout of docs/s3-and-jobs.md). An input
whose ``job.json`` there says ``succeeded`` (a legacy one ``done``), made with the same options
(resampling order included) from the same object (URI and ETag), is skipped, so an interrupted run is resumed by
running the same command again, and a replaced input runs again. Inputs that
map to one output folder (``scan.nii`` and ``scan.nii.gz``) all fail unrun. Jobs go through the cluster's
HTTP API (``POST /v1/segmentations`` with ``output_prefix``, then polling
``GET /v1/segmentations/{id}``), or with ``--local-models`` through
:class:`serve.jobs.runner.JobRunner` in this process (no cluster needed).

The report (``--report x.json`` or ``x.csv``) lists every input once with its ``outcome``:
succeeded or failed (with the reason), the job's final state, or skipped (already done: no job ran).
``skipped`` is an outcome of the report only, never a job state.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from tqdm import tqdm

from serve.api.client import ApiClient, ApiError
from serve.errors import MrisegError
from serve.inference.pipeline import Segmenter
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER, add_resampling_order_arg
from serve.jobs.events import is_volume_key
from serve.jobs.engine import SegmenterEngine
from serve.jobs.runner import JobRunner
from serve.jobs.spec import DEFAULT_OUTPUTS, JobSpec
from serve.jobs.store import JobStore
from serve.outputs import layout
from serve.records_schema import FAILED, RUNNING, SUCCEEDED, UnsupportedRecordFormat, read_output_record
from serve.storage import staging
from serve.storage.models import open_model_store
from serve.storage.s3client import S3Settings, parse_s3_uri

log = logging.getLogger(__name__)

#: the report's own outcome: the input's set was already done, so no job ran (not a job state)
SKIPPED = "skipped"
#: an input's outcome in the report: the final state of its job, or skipped
OUTCOMES = (SUCCEEDED, FAILED, SKIPPED)
REPORT_FIELDS = ("input", "output_prefix", "outcome", "reason", "job_id", "seconds")


@dataclass
class Item:
    input: str
    output_prefix: str
    outcome: str = ""                   # one of OUTCOMES ("" until settled)
    reason: str = ""
    job_id: str = ""
    seconds: float = 0.0


class Listed(NamedTuple):
    """One input object as the listing showed it."""

    uri: str
    etag: str


def list_volumes(prefix_uri: str, settings: S3Settings) -> list[Listed]:
    """Every volume object under the prefix with its ETag (other files are ignored by suffix)."""
    bucket, prefix = parse_s3_uri(prefix_uri)
    c = staging.client_for(settings)

    def once() -> list[Listed]:
        pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [Listed(f"s3://{bucket}/{o['Key']}", o.get("ETag", "")) for p in pages for o in p.get("Contents", [])
                if is_volume_key(o["Key"])]

    return staging.with_retries(once, bucket=bucket, action="list objects")


def already_done(output_prefix: str, settings: S3Settings, options: dict | None = None,
                 source: Listed | None = None) -> bool:
    """The output set is complete: its job.json (always written last) says succeeded (a legacy one: done),
    and, where ``options`` (:meth:`JobSpec.options`) are given, was made with them: a run with other options
    is not done.

    Where ``source`` is given, the set must also have been made from that object as listed (its ``input``
    names the same URI and ETag): an input replaced since (a corrected re-upload) is not done, and neither
    is a set whose job.json does not say what it was made from (written before it did): rerunning those
    is the safe way, keeping labels of another scan is not.

    A job.json of a format this version does not know (a newer mriseg-serve's) raises
    :class:`serve.records_schema.UnsupportedRecordFormat`: neither taken for done nor written over.
    """
    uri = output_prefix + layout.JOB_RECORD
    if staging.object_exists(uri, settings) is None:
        return False
    try:
        doc = read_output_record(json.loads(staging.download_bytes(uri, settings=settings)))
    except UnsupportedRecordFormat:
        raise
    except (ValueError, MrisegError):  # MalformedRecord is a ValueError
        return False
    return (doc.get("status") == SUCCEEDED
            and (options is None or doc.get("options") == options)
            and (source is None or _made_from(doc.get("input"), source)))


def _made_from(record: Any, source: Listed) -> bool:
    """A job.json's ``input`` is ``source``: same URI, same ETag (quotes aside: stores differ in them)."""
    if not isinstance(record, dict) or not isinstance(record.get("etag"), str) or not source.etag:
        return False
    return record.get("uri") == source.uri and record["etag"].strip('"') == source.etag.strip('"')


class Outcome(NamedTuple):
    """What a backend did with one input (an outcome of :data:`OUTCOMES`); ``output_prefix`` where it differs
    from the spec's."""

    outcome: str
    reason: str
    job_id: str
    output_prefix: str = ""


Backend = Callable[[JobSpec], tuple]  # spec -> Outcome, or an (outcome, reason, job id) tuple


def api_backend(url: str, api_key: str, poll_s: float = 2.0, timeout_s: float = 24 * 3600) -> Backend:
    """Submit through the cluster API and poll until the job settles (:class:`serve.api.client.ApiClient`).

    Every POST carries an ``Idempotency-Key``, so the client's one retry rule covers it: an answer that
    says to retry (429, 502-504, ``retryable: true``) or none at all (a refused or dropped connection, a
    timeout) is waited out, honouring ``Retry-After``, and the POST sent again, for as long as ``timeout_s``
    allows; the cluster answers a POST whose first answer was lost with the job it made then, so no input
    runs twice into its output folder. Polls are retried the same way: the job is still queued or running,
    so none of those answers is the job's failure.

    Args:
        url: the API's base URL.
        api_key: the site's key.
        poll_s: the pause between polls, and the first pause between retries.
        timeout_s: how long the POST is retried, and then how long its job is polled (then cancelled).

    Returns:
        The backend: a spec in, ``(status, reason, job id)`` out.
    """
    def run(spec: JobSpec) -> tuple[str, str, str]:
        body: dict[str, Any] = {"input": spec.input_uri, "output_prefix": spec.output_prefix,
                                "fast": spec.fast, "outputs": list(spec.outputs),
                                "resampling_order": spec.resampling_order}
        if spec.roi_subset:
            body["roi_subset"] = list(spec.roi_subset)
        # one client per input: its deadline (timeout_s) is the input's own
        client = ApiClient(url, api_key, timeout_s=timeout_s, poll_s=poll_s, request_timeout_s=60)
        try:
            job = client.submit(body)
        except ApiError as e:
            return FAILED, e.message, ""
        try:
            return SUCCEEDED, "", client.wait(job["id"])["id"]
        except ApiError as e:
            return FAILED, e.message, job["id"]

    return run


def local_backend(models: Sequence[str], jobs_uri: str, settings: S3Settings, threads: int = 1,
                  lease_s: float = 60.0) -> Backend:
    """Run jobs in this process through :class:`serve.jobs.runner.JobRunner` (idempotent, durable).

    A job another (possibly dead) worker holds is waited for: it finishes there, or
    its lease runs out (``lease_s`` after its last renewal) and it runs here. The job records are
    signed with the key ``$MRISEG_RECORD_KEY_FILE`` names (serve/jobs/records.py)."""
    store = JobStore(jobs_uri, settings, lease_s=lease_s)  # first: without a record key, stop before loading models
    seg = Segmenter(open_model_store(list(models), s3=settings), device="auto", threads=threads)
    runner = JobRunner(store, SegmenterEngine(seg), settings)
    lock = threading.Lock()  # one Segmenter: one job at a time (torch uses the threads)

    def run(spec: JobSpec) -> tuple[str, str, str]:
        while True:
            with lock:
                out = runner.run(spec)
            if out.state != RUNNING:
                break
            time.sleep(min(5.0, lease_s / 2))
        if out.state == SUCCEEDED:  # under runs/<key>/ where a set made with other options (or input) was there
            if not out.computed:  # done before (a replaced input's earlier rerun, another worker): nothing ran now
                return Outcome(SKIPPED, "already done", out.key, out.output_prefix)
            return Outcome(SUCCEEDED, "", out.key, out.output_prefix)
        err = out.error or {}
        return FAILED, f"{err.get('status', '')} {err.get('title', out.state)}: {err.get('detail', '')}".strip(), \
            out.key

    return run


def run_bulk(inputs_uri: str, out_uri: str, backend: Backend, settings: S3Settings, *, site: str = "default",
             concurrency: int = 4, roi_subset: Sequence[str] | None = None, fast: bool = False,
             outputs: Sequence[str] = DEFAULT_OUTPUTS, progress: bool = True,
             resampling_order: int = DEFAULT_RESAMPLING_ORDER) -> list[Item]:
    """Segment every volume under ``inputs_uri``; returns one :class:`Item` per input.

    ``resampling_order`` (TotalSegmentator's ``-ro``) is one of the options a done set must have been made with.
    """
    prefix = parse_s3_uri(inputs_uri)[1]
    listed = {v.uri: v for v in list_volumes(inputs_uri, settings)}
    specs = [JobSpec(uri, out_uri, site, roi_subset=tuple(roi_subset) if roi_subset else None, fast=fast,
                     outputs=tuple(outputs), input_prefix=prefix, resampling_order=resampling_order)
             for uri in listed]
    items: dict[str, Item] = {}
    for s in specs:
        try:
            items[s.input_uri] = Item(s.input_uri, s.output_prefix)
        except MrisegError as e:  # a key that cannot name an output folder fails alone, in the report
            items[s.input_uri] = Item(s.input_uri, "", FAILED, f"{e.status} {e.title}: {e.message}")
    _fail_shared_folders([items[s.input_uri] for s in specs])
    todo = []
    for s in specs:
        item = items[s.input_uri]
        if item.outcome:  # failed above
            continue
        try:
            done = already_done(s.output_prefix, settings, s.options(), listed[s.input_uri])
        except UnsupportedRecordFormat as e:  # a newer version's set: this one can neither judge nor replace it
            item.outcome, item.reason = FAILED, f"{e.status} {e.title}: {e.message}"
            continue
        if done:
            item.outcome, item.reason = SKIPPED, "already done"
        else:
            todo.append(s)
    bar = tqdm(total=len(todo), unit="vol", desc="segmenting", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    counts = {outcome: sum(i.outcome == outcome for i in items.values()) for outcome in OUTCOMES}
    bar.set_postfix(counts)

    def one(spec: JobSpec) -> Item:
        item = items[spec.input_uri]
        t = time.monotonic()
        try:
            done = Outcome(*backend(spec))
            item.outcome, item.reason, item.job_id = done.outcome, done.reason, done.job_id
            item.output_prefix = done.output_prefix or item.output_prefix
        except MrisegError as e:
            item.outcome, item.reason = FAILED, f"{e.status} {e.title}: {e.message}"
        except Exception as e:  # one broken input must not stop the batch; the report says what happened
            item.outcome, item.reason = FAILED, f"{type(e).__name__}: {e}"
        item.seconds = round(time.monotonic() - t, 3)
        return item

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for fut in as_completed([pool.submit(one, s) for s in todo]):
            counts[fut.result().outcome] += 1
            bar.set_postfix(counts)
            bar.update(1)
    bar.close()
    return [items[s.input_uri] for s in specs]


def _fail_shared_folders(items: Sequence[Item]) -> None:
    """Fail every input whose output folder another input maps to (``p1/scan.nii`` and ``p1/scan.nii.gz``
    are both case ``p1/scan``), before anything runs: their jobs would write over each other in one folder
    and both pass for done. All of them fail, not all but one, because which is the right scan (a
    duplicate, a DICOM original, a corrected file) is for the data's owner to say, not for a sort order."""
    by_folder: dict[str, list[Item]] = {}
    for it in items:
        if it.output_prefix:
            by_folder.setdefault(it.output_prefix, []).append(it)
    for folder, shared in by_folder.items():
        if len(shared) < 2:
            continue
        for it in shared:
            others = ", ".join(o.input for o in shared if o is not it)
            it.outcome, it.reason = FAILED, (f"409 Output folder shared: {folder} is also the output folder of "
                                            f"{others}; none of them was run. Rename or move all but one so each "
                                            f"input has its own case folder")


def summary(items: Sequence[Item]) -> dict[str, int]:
    out = {outcome: 0 for outcome in OUTCOMES}
    for it in items:
        out[it.outcome] += 1
    out["total"] = len(items)
    return out


def write_report(items: Sequence[Item], path: str | os.PathLike) -> Path:
    """JSON (``{"summary", "items"}``) or CSV (one row per input), chosen by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
            w.writeheader()
            for it in items:
                w.writerow(asdict(it))
    else:
        path.write_text(json.dumps({"summary": summary(items), "items": [asdict(i) for i in items]}, indent=1))
    return path


def settings_from_args(args) -> S3Settings:
    """Endpoint/region from flags or the environment; credentials from boto3's standard chain."""
    endpoint = args.s3_endpoint or os.environ.get("MRISEG_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    region = args.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Settings(endpoint_url=endpoint, region=region, path_style=bool(endpoint) or args.s3_path_style)


def _check_report_path(path: Path) -> None:
    """Before the run, not after it: a report that cannot be written would lose the per-input outcomes."""
    folder = path.absolute().parent
    while not folder.exists():  # write_report creates missing folders
        folder = folder.parent
    try:
        if path.is_dir() or not folder.is_dir():
            raise IsADirectoryError if path.is_dir() else NotADirectoryError
        with tempfile.TemporaryFile(dir=folder):  # os.access says yes to root even where writes fail
            pass
    except OSError as e:
        raise MrisegError(f"cannot write the report {path}: it is a folder, or {folder} is not a writable "
                          f"folder") from e


def _print_failures(items: Sequence[Item], report: str | None) -> None:
    """Failed inputs by position in the report and a digest, never by name: object keys may name patients,
    and stderr ends up in CI logs and terminals. The report (a file the operator chose) has the URIs."""
    failed = [(n, it) for n, it in enumerate(items, 1) if it.outcome == FAILED]
    if not failed:
        return
    where = f"see the report {report}" if report else "rerun with --report FILE to list them"
    print(f"{len(failed)} input(s) failed; {where} (inputs are not named here: their keys may hold patient data)",
          file=sys.stderr)
    for n, it in failed:
        digest = hashlib.sha256(it.input.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        # the reason's status and title only: a detail may quote other inputs' URIs
        print(f"  failed: #{n} (sha256 {digest}): {it.reason.split(':', 1)[0][:80]}", file=sys.stderr)


def cmd_bulk(args) -> int:
    settings = settings_from_args(args)
    if not args.out.startswith("s3://"):
        raise MrisegError("--out must be an s3:// prefix")
    if args.local_models:
        if not args.jobs:
            raise MrisegError("--local-models needs --jobs s3://bucket/prefix for the durable job records")
        backend = local_backend(args.local_models, args.jobs, settings, lease_s=args.lease_s)
    else:
        key = os.environ.get("MRISEG_API_KEY", "")
        if args.api_key_file:
            try:
                key = Path(args.api_key_file).read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise MrisegError(f"cannot read the API key file {args.api_key_file} "
                                  f"({getattr(e, 'strerror', None) or 'not text'})") from e
        if not key:
            raise MrisegError("no API key: pass --api-key-file FILE or set MRISEG_API_KEY")
        backend = api_backend(args.api, key)
    if args.report:
        _check_report_path(Path(args.report))
    if not args.local_models:  # after the local checks: a typo in a path is found without the network

        ApiClient(args.api, key).check_reachable()
    items = run_bulk(args.prefix, args.out, backend, settings, site=args.site, concurrency=args.concurrency,
                     roi_subset=args.roi_subset.split(",") if args.roi_subset else None, fast=args.fast,
                     outputs=args.outputs.split(","), progress=not args.no_progress,
                     resampling_order=args.resampling_order)
    s = summary(items)
    print(f"{s['total']} volumes: {s[SUCCEEDED]} succeeded, {s[FAILED]} failed, {s[SKIPPED]} skipped"
          + (f"; report: {args.report}" if args.report else ""))
    unwritten = None
    if args.report:
        try:
            write_report(items, args.report)
        except OSError as e:
            unwritten = e
    _print_failures(items, None if unwritten else args.report)
    if unwritten is not None:  # the failures are printed above; the job records keep the outcomes too
        raise MrisegError(f"the report {args.report} could not be written ({unwritten.strerror})") from unwritten
    return 1 if s[FAILED] else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", help="s3://bucket/prefix/ holding the volumes (.nii, .nii.gz, .mha, .nrrd, .zip)")
    p.add_argument("--out", required=True, help="s3://bucket/prefix/ for outputs ({site}/{case}/ below it)")
    p.add_argument("--site", default="default", help="site name (the folder below --out)")
    p.add_argument("--concurrency", type=int, default=4, help="jobs in flight at once")
    p.add_argument("--api", default=os.environ.get("MRISEG_API", "http://127.0.0.1:8000"), help="cluster API URL")
    p.add_argument("--api-key-file", help="file holding the site's API key (else $MRISEG_API_KEY)")
    p.add_argument("--report", help="write a report to this .json or .csv file")
    p.add_argument("--roi-subset", help="comma-separated structures (default: all)")
    p.add_argument("--fast", action="store_true", help="the 3 mm model (first 50 structures)")
    p.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS),
                   help="comma-separated: multilabel, per_structure, statistics, preview")
    add_resampling_order_arg(p)
    p.add_argument("--local-models", nargs="+", metavar="SOURCE",
                   help="run jobs in this process with these model sources instead of the cluster")
    p.add_argument("--jobs", help="s3:// prefix for durable job records (with --local-models)")
    p.add_argument("--lease-s", type=float, default=60.0,
                   help="with --local-models: a job claim expires this long after its worker died")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (else $MRISEG_S3_ENDPOINT / $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--s3-region", help="S3 region (else $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)")
    p.add_argument("--s3-path-style", action="store_true", help="path-style addressing (implied by an endpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bulk)


def register(subparsers) -> None:
    """Add ``mriseg bulk`` to serve/cli/main.py's parser."""
    add_arguments(subparsers.add_parser("bulk", help="segment every volume under an S3 prefix (resumable)",
                                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serve.cli.bulk ...`` (the same as ``mriseg bulk ...``)."""
    p = argparse.ArgumentParser(prog="mriseg bulk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except MrisegError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
