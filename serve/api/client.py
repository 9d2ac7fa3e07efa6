"""The one client of the /v1 API: ``mriseg demo`` and ``mriseg bulk`` use it.

A job is submitted without ``?wait=true`` and then polled. Every POST carries
an ``Idempotency-Key`` (a new UUID per job, the same on each of its retries),
so one retry rule covers every call: an answer that says to retry (429,
502-504, a problem document with ``retryable: true``) or none at all (a
refused, dropped or timed-out connection) is waited out, honouring
``Retry-After``, otherwise doubling the pause from ``poll_s`` up to 30 s, until
``timeout_s`` has passed. A POST whose answer was lost is therefore sent again,
and the router answers it with the job the first one made rather than a second
job.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import httpx

from serve.api.idempotency import KEY_HEADER
from serve.errors import MrisegError
from serve.outputs import layout
from serve.router.state import TERMINAL

T = TypeVar("T")
#: the longest pause between two tries of one call
MAX_PAUSE_S = 30.0


class ApiError(MrisegError):
    """A problem-details answer from the API, re-raised with its status."""

    #: statuses worth retrying when the answer does not say (a proxy's own error page, say)
    TRANSIENT = (429, 502, 503, 504)

    def __init__(self, status: int, title: str, detail: str, retryable: bool | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title = status, title
        self.retryable = status in self.TRANSIENT if retryable is None else bool(retryable)
        self.retry_after = retry_after  # the answer's Retry-After, in seconds


@dataclass
class ApiClient:
    """A site's client of one cluster's /v1 API.

    ``timeout_s`` bounds how long one call is retried (:meth:`retrying`) and how long :meth:`wait` polls a
    job; ``request_timeout_s`` bounds one HTTP request (default: ``timeout_s``). ``poll_s`` is the first
    pause between polls and between retries.
    """

    url: str
    api_key: str
    timeout_s: float = 900
    poll_s: float = 0.5
    request_timeout_s: float | None = None

    def _client(self):
        return httpx.Client(base_url=self.url, timeout=self.request_timeout_s or self.timeout_s,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    @contextlib.contextmanager
    def _session(self):
        """An HTTP client whose connection failures are a retryable 503 :class:`ApiError`, not httpx's own."""
        try:
            with self._client() as c:
                yield c
        except httpx.TransportError as e:  # refused, dropped or timed out: the cluster is down or restarting
            raise ApiError(503, "Cluster unreachable", f"no answer from {self.url} ({type(e).__name__}); is the "
                                                       f"stack running ('mriseg up')?", retryable=True) from e

    @staticmethod
    def _check(r) -> Any:
        if r.status_code >= 400:
            retry_after = r.headers.get("Retry-After", "")
            after = float(retry_after) if retry_after.isdigit() else None
            try:
                p = r.json()
                if not isinstance(p, dict):  # a proxy's JSON, not a problem document
                    raise ValueError
            except ValueError:
                raise ApiError(r.status_code, "error", r.text[:200], retry_after=after) from None
            raise ApiError(r.status_code, p.get("title", "error"), p.get("detail", r.text), p.get("retryable"),
                           retry_after=after)
        return r

    def retrying(self, call: Callable[[], T], deadline: float | None = None) -> T:
        """``call()``'s result, trying again while it raises a retryable :class:`ApiError` (the one retry rule).

        Args:
            call: one try (e.g. one HTTP request through :meth:`_session` and :meth:`_check`).
            deadline: ``time.monotonic()`` after which the last error is raised (default: ``timeout_s`` on).

        Returns:
            What ``call`` returned.

        Raises:
            ApiError: one that is not retryable at once, or the last one once waiting would pass the deadline.
        """
        deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
        pause = self.poll_s
        while True:
            try:
                return call()
            except ApiError as e:
                wait = e.retry_after if e.retry_after is not None else pause
                if not e.retryable or time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)
                pause = min(pause * 2, MAX_PAUSE_S)

    def _post(self, path: str, key: str | None, **request: Any) -> dict:
        """POST with an ``Idempotency-Key`` (a new one unless given), retried by :meth:`retrying`."""
        headers = {**request.pop("headers", {}), KEY_HEADER: key or uuid.uuid4().hex}

        def once() -> dict:
            with self._session() as c:
                return self._check(c.post(path, headers=headers, **request)).json()

        return self.retrying(once)

    def submit(self, body: dict[str, Any], key: str | None = None) -> dict:
        """``POST /v1/segmentations``: a job for a volume already in S3, retried until it is taken.

        Args:
            body: the request (``input``, ``roi_subset``, ``outputs``, ``output_prefix``, ...; docs/api.md).
            key: the ``Idempotency-Key`` (default: a new UUID).

        Returns:
            The job document (queued, or as it is now where the key found an earlier job).
        """
        return self._post("/v1/segmentations", key, json=body, params={"wait": "false"})

    def segment_upload(self, data: bytes, filename: str, roi_subset: Sequence[str] | None = None,
                       fast: bool = False, outputs: Sequence[str] = ("multilabel", "statistics", "preview"),
                       wait: bool = True, key: str | None = None) -> dict:
        """``POST /v1/segmentations/upload`` (retried like :meth:`submit`), then :meth:`wait` unless told not to.

        Args:
            data: the file's bytes.
            filename: its name, whose suffix selects the reader.
            roi_subset: structures wanted (default: all).
            fast: the 3 mm model.
            outputs: output kinds.
            wait: poll until the job has succeeded.
            key: the ``Idempotency-Key`` (default: a new UUID).

        Returns:
            The job document, succeeded where ``wait``.
        """
        params = {"filename": filename, "fast": str(fast).lower(), "outputs": ",".join(outputs),
                  "wait": "false"}  # waited for by polling, below
        if roi_subset:
            params["roi_subset"] = ",".join(roi_subset)
        job = self._post("/v1/segmentations/upload", key, params=params, content=data,
                         headers={"Content-Type": "application/octet-stream"})
        return self.wait(job["id"]) if wait else job

    def job(self, job_id: str) -> dict:
        with self._session() as c:
            return self._check(c.get(f"/v1/segmentations/{job_id}")).json()

    def cancel(self, job_id: str) -> dict:
        with self._session() as c:
            return self._check(c.delete(f"/v1/segmentations/{job_id}")).json()

    def wait(self, job_id: str) -> dict:
        """Poll until the job has succeeded; its failure is raised as the API would answer it.

        Polls that meet a retryable answer (a restarting cluster, a proxy's 502)
        are repeated by :meth:`retrying`. A job still unfinished after ``timeout_s`` is cancelled,
        so that a caller that retries does not leave it running beside the retry.
        """
        deadline, delay, last = time.monotonic() + self.timeout_s, self.poll_s, None
        while True:
            try:
                job = self.retrying(lambda: self.job(job_id), deadline)
            except ApiError as e:
                if e.status == 404:  # the router lost it (a new pod, its journal gone): submitting again is right
                    raise ApiError(503, "Job lost", f"the cluster no longer knows job {job_id}; submit it "
                                                    f"again", retryable=True) from e
                if not e.retryable:
                    raise
                job, last = None, e  # retried until the deadline
            if job is not None and job["status"] in TERMINAL:
                if job["status"] == "succeeded":
                    return job
                err = job.get("error") or {"status": 409, "title": "Cancelled",
                                           "detail": f"job {job_id} was cancelled", "retryable": False}
                raise ApiError(err["status"], err["title"], err["detail"], err.get("retryable"))
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)  # a running job's polls: not a retry, so no Retry-After to honour
        with contextlib.suppress(ApiError):
            self.cancel(job_id)
        why = f"; last poll: {last}" if job is None and last else ""
        raise ApiError(504, "Job timed out", f"job {job_id} did not finish within {self.timeout_s:.0f}s and was "
                                             f"cancelled{why}", retryable=True)

    def check_reachable(self, timeout_s: float = 15.0) -> None:
        """Fail at once on an API that cannot be reached, rather than wait for it call by call.

        Args:
            timeout_s: how long ``/healthz`` may take.

        Raises:
            MrisegError: no answer, or an answer that is not from an mriseg-serve API.
        """
        try:
            r = httpx.get(self.url.rstrip("/") + "/healthz", timeout=timeout_s)
        except httpx.TransportError as e:
            raise MrisegError(f"cannot reach the cluster API at {self.url} ({type(e).__name__}); check --api "
                              f"(or $MRISEG_API) and that the cluster is up") from e
        if r.status_code == 404:
            raise MrisegError(f"{self.url} answers, but not as an mriseg-serve API (no /healthz); check --api")

    def download(self, job_id: str, dest: Path, name: str | None = None) -> Path:
        """The multilabel result (``name=None``) or another output file into ``dest``."""
        path = f"/v1/segmentations/{job_id}/result" if name is None else f"/v1/segmentations/{job_id}/files/{name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._session() as c:
            dest.write_bytes(self._check(c.get(path)).content)
        return dest


def segment_file(client: ApiClient, path: Path, outdir: Path, **options) -> dict:
    """Upload ``path``, wait, and save segmentations.nii.gz, statistics.json, preview.png into ``outdir``."""
    job = client.segment_upload(path.read_bytes(), path.name, **options)
    written = {"multilabel": client.download(job["id"], outdir / layout.MULTILABEL)}
    for name, kind in ((layout.STATISTICS, "statistics"), (layout.PREVIEW, "preview")):
        if kind in job["options"]["outputs"]:
            written[kind] = client.download(job["id"], outdir / name, name)
    return {"job": job, "written": written}
