"""A small client for the /v1 API, used by ``mriseg demo`` through a running stack."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
    url: str
    api_key: str
    timeout_s: float = 900

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
        with self._session() as c:
            return self._check(c.post("/v1/segmentations/upload", params=params, content=data,
                                      headers={"Content-Type": "application/octet-stream"})).json()

    def job(self, job_id: str) -> dict:
        with self._session() as c:
            return self._check(c.get(f"/v1/segmentations/{job_id}")).json()

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
