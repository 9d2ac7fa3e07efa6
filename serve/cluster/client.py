"""A small client for the /v1 API, used by ``mriseg demo``.

A job is submitted without ``?wait=true`` and then polled: a poll that times
out or meets a restarting cluster is simply repeated, where a long-held
``wait=true`` request that timed out would leave the job running and tempt the
caller into submitting it a second time.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from serve.cluster.jobs_state import TERMINAL
from serve.errors import MrisegError


class ApiError(MrisegError):
    """A problem-details answer from the API, re-raised with its status."""

    #: statuses worth retrying when the answer does not say (a proxy's own error page, say)
    TRANSIENT = (429, 502, 503, 504)

    def __init__(self, status: int, title: str, detail: str, retryable: bool | None = None):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title = status, title
        self.retryable = status in self.TRANSIENT if retryable is None else bool(retryable)


@dataclass
class ApiClient:
    """``timeout_s`` bounds one HTTP request and, separately, how long :meth:`wait` polls a job."""

    url: str
    api_key: str
    timeout_s: float = 900
    poll_s: float = 0.5

    def _client(self):
        import httpx

        return httpx.Client(base_url=self.url, timeout=self.timeout_s,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    @contextlib.contextmanager
    def _session(self):
        """An HTTP client whose connection failures are a retryable 503 :class:`ApiError`, not httpx's own."""
        import httpx

        try:
            with self._client() as c:
                yield c
        except httpx.TransportError as e:  # refused, dropped or timed out: the cluster is down or restarting
            raise ApiError(503, "Cluster unreachable", f"no answer from {self.url} ({type(e).__name__}); is the "
                                                       f"stack running ('mriseg up')?", retryable=True) from e

    @staticmethod
    def _check(r) -> Any:
        if r.status_code >= 400:
            try:
                p = r.json()
                if not isinstance(p, dict):  # a proxy's JSON, not a problem document
                    raise ValueError
                raise ApiError(r.status_code, p.get("title", "error"), p.get("detail", r.text), p.get("retryable"))
            except ValueError:
                raise ApiError(r.status_code, "error", r.text[:200]) from None
        return r

    def segment_upload(self, data: bytes, filename: str, roi_subset: Sequence[str] | None = None,
                       fast: bool = False, outputs: Sequence[str] = ("multilabel", "statistics", "preview"),
                       wait: bool = True) -> dict:
        params = {"filename": filename, "fast": str(fast).lower(), "wait": str(wait).lower(),
                  "outputs": ",".join(outputs)}
        if roi_subset:
            params["roi_subset"] = ",".join(roi_subset)
        params["wait"] = "false"  # waited for by polling, below
        with self._session() as c:
            job = self._check(c.post("/v1/segmentations/upload", params=params, content=data,
                                     headers={"Content-Type": "application/octet-stream"})).json()
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
        are repeated. A job still unfinished after ``timeout_s`` is cancelled,
        so that a caller that retries does not leave it running beside the retry.
        """
        deadline, delay, last = time.monotonic() + self.timeout_s, self.poll_s, None
        while True:
            try:
                job = self.job(job_id)
            except ApiError as e:
                if e.status == 404:  # the router lost it (a new pod, its journal gone): submitting again is right
                    raise ApiError(503, "Job lost", f"the cluster no longer knows job {job_id}; submit it "
                                                    f"again", retryable=True) from e
                if not e.retryable:
                    raise
                job, last = None, e
            if job is not None and job["status"] in TERMINAL:
                if job["status"] == "succeeded":
                    return job
                err = job.get("error") or {"status": 409, "title": "Cancelled",
                                           "detail": f"job {job_id} was cancelled", "retryable": False}
                raise ApiError(err["status"], err["title"], err["detail"], err.get("retryable"))
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0)
        with contextlib.suppress(ApiError):
            self.cancel(job_id)
        why = f"; last poll: {last}" if job is None and last else ""
        raise ApiError(504, "Job timed out", f"job {job_id} did not finish within {self.timeout_s:.0f}s and was "
                                             f"cancelled{why}", retryable=True)

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
    written = {"multilabel": client.download(job["id"], outdir / "segmentations.nii.gz")}
    for name, kind in (("statistics.json", "statistics"), ("preview.png", "preview")):
        if kind in job["options"]["outputs"]:
            written[kind] = client.download(job["id"], outdir / name, name)
    return {"job": job, "written": written}
