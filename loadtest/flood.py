"""Destructive inputs against a live local stack: one site floods, another site's work must go on.

    python -m loadtest.flood --concurrency 4 --label cpu-2core     # the full-size manual run (minutes)

Starts the local cluster (``loadtest.localcluster``: demo models, the router's
default memory budget and sandbox), then site-a uploads every destructive input
``--concurrency`` times at once (full size: a 2 MB gzip of 2 GiB of float64, a
zip declaring 1.5 GiB, the hostile corpus's bombs, the MetaIO tricks of issue
#33) while the router's RSS and the decoder scratch folder are sampled. Each
upload must end in a 4xx, the router process must stay the same, and site-b's
ordinary job must succeed afterwards. Writes ``loadtest/results/flood-<label>.json``.

The CI-sized variant of the same inputs runs in ``tests/cluster/test_hostile.py``
(``destructive_inputs(full=False)`` under a small router budget).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import io
import json
import os
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

MB = 1 << 20


def _write_zeros(f, nbytes: int) -> None:
    """Write ``nbytes`` zero bytes to ``f`` in 16 MiB pieces (never all in memory at once)."""
    chunk = bytes(16 * MB)
    while nbytes:
        n = min(nbytes, len(chunk))
        f.write(chunk[:n])
        nbytes -= n


def _gzip_zeros(prefix: bytes, nbytes: int) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as g:
        g.write(prefix)
        _write_zeros(g, nbytes)
    return buf.getvalue()


def float64_bomb(shape: tuple[int, int, int]) -> bytes:
    """A gzipped float64 NIfTI of zeros: 8 bytes a voxel once decoded, about 1/1000 of that as sent."""
    import nibabel as nib
    import numpy as np

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float64)
    hdr.set_sform(np.eye(4), 1)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_xyzt_units("mm")
    hdr.set_data_offset(352)
    return _gzip_zeros(hdr.binaryblock + bytes(4), 8 * shape[0] * shape[1] * shape[2])


def zip_of_zeros(nbytes: int) -> bytes:
    """A legal zip whose one slice truly expands to ``nbytes`` (and says so)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, z.open("a.dcm", "w") as f:
        _write_zeros(f, nbytes)
    return buf.getvalue()


def destructive_inputs(full: bool) -> list[tuple[str, str, bytes, tuple[int, ...]]]:
    """(name, upload file name, bytes, acceptable statuses) for each destructive input of issue #33.

    Args:
        full: full size (a 2 GiB float64 volume, a zip declaring 1.5 GiB) for a stack with default budgets;
            else CI size (800 MB of float64, a 200 MB zip) for the test stack's 512 MiB router budget and
            64 MiB zip budget.

    Returns:
        The inputs, each under 2 MiB as sent.
    """
    base = "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n"
    return [
        # a lower-case decoy before the exact-case key MetaIO uses: /etc/passwd read into the voxels
        ("mha_case_decoy_reads_a_file", "scan.mha",
         (base + "elementdatafile = LOCAL\nElementDataFile = /etc/passwd\n").encode() + bytes(512), (415, 422)),
        # HeaderSize reads any offset of the named file
        ("mha_header_size_offset", "scan.mha",
         (base + "HeaderSize = -1\nElementDataFile = LOCAL\n").encode() + bytes(512), (415, 422)),
        # the decoy hiding a header MetaIO crashes on (NDims past its fixed arrays)
        ("mha_decoy_hides_a_crashing_header", "scan.mha",
         b"ObjectType = Image\nndims = 3\nNDims = 4000\nDimSize = 8 8 8\nElementType = MET_UCHAR\n"
         b"ElementDataFile = LOCAL\n" + bytes(512), (415, 422)),
        # a compressed stream that does not inflate: MetaIO says "Uncompress failed" and returns heap bytes
        ("mha_corrupt_compressed_data", "scan.mha",
         (base + "CompressedData = True\nCompressedDataSize = 64\nElementDataFile = LOCAL\n").encode()
         + zlib.compress(bytes(512))[:20] + bytes(44), (422,)),
        # a legal zip past the decoder's extraction budget
        ("zip_past_the_extraction_budget", "series.zip", zip_of_zeros((1536 if full else 200) * MB), (413,)),
        # a small gzip of float64, over the decoder's memory (full) or the router's budget (CI)
        ("nifti_float64_memory_bomb", "scan.nii.gz",
         float64_bomb((512, 512, 1024) if full else (512, 512, 400)), (413,)),
    ]


class DiskPeak:
    """The most bytes ever seen under ``root`` while the block runs (sampled every ``interval_s``)."""

    def __init__(self, root: Path, interval_s: float = 0.01):
        self.root, self.interval_s, self.peak = Path(root), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for folder, _dirs, files in os.walk(self.root):  # a folder removed while it is walked is skipped
                for name in files:
                    try:
                        total += os.lstat(os.path.join(folder, name)).st_size
                    except OSError:
                        pass  # removed while we looked
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "DiskPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _upload(url: str, headers: dict, filename: str, data: bytes, wait: bool) -> tuple[int, dict]:
    import httpx

    with httpx.Client(base_url=url, timeout=900) as c:
        r = c.post("/v1/segmentations/upload", params={"filename": filename, "roi_subset": "liver", "wait": wait},
                   content=data, headers={**headers, "content-type": "application/octet-stream"})
        if r.status_code != 202:
            return r.status_code, r.json()
        job_id = r.json()["id"]
        while True:
            body = c.get(f"/v1/segmentations/{job_id}", headers=headers).json()
            if body["status"] in ("succeeded", "failed", "cancelled"):
                return (body["error"]["status"] if body["status"] == "failed" else 200), body
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="serve/demo_models")
    ap.add_argument("--concurrency", type=int, default=4, help="copies of each input in flight at once")
    ap.add_argument("--label", default="cpu-2core")
    ap.add_argument("--out", default="loadtest/results")
    args = ap.parse_args(argv)

    from loadtest import localcluster
    from loadtest.soak import RssRecorder, role
    from tests.helpers.stack import nifti_bytes

    scratch = Path(os.environ.setdefault("MRISEG_SCRATCH_DIR", "/tmp/mriseg-flood-scratch"))
    scratch.mkdir(parents=True, exist_ok=True)
    from tests.helpers.hostile_corpus import BOMBS, corpus

    inputs = destructive_inputs(full=True)
    inputs += [(h.name, h.filename, h.data, h.statuses) for h in corpus() if h.name in BOMBS]
    cluster = localcluster.start(args.models, submodels=["organs"], slots=4)
    outcomes: dict[str, list] = {}
    try:
        def router() -> list[int]:
            return [p for p in localcluster.cluster_pids() if role(p) == "router"]

        (router_pid,) = router()
        with RssRecorder(router, interval_s=0.2) as rss, DiskPeak(scratch) as disk, \
                concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            t0 = time.monotonic()
            for name, filename, data, statuses in inputs:
                futs = [pool.submit(_upload, cluster.url, cluster.headers("site-a"), filename, data, False)
                        for _ in range(args.concurrency)]
                got = [f.result()[0] for f in futs]
                outcomes[name] = {"statuses": got, "expected": list(statuses), "bytes_sent": len(data),
                                  "ok": all(s in statuses for s in got)}
                print(f"{name}: {got}", flush=True)
            flood_s = time.monotonic() - t0
        other, body = _upload(cluster.url, cluster.headers("site-b"), "case.nii.gz", nifti_bytes(seed=3), False)
        series = next(iter(rss.series.values()))
        result = {
            "label": args.label, "concurrency": args.concurrency, "flood_s": round(flood_s, 1),
            "inputs": outcomes, "router_same_process": router() == [router_pid],
            "router_rss_mb": {"start": series["rss_mb"][0], "peak": max(series["rss_mb"]),
                              "end": series["rss_mb"][-1]},
            "scratch_peak_mb": round(disk.peak / MB, 1), "other_site_job": other,
            "router_memory_budget_bytes": 8 << 30,
        }
    finally:
        localcluster.stop(cluster)
    out = Path(args.out) / f"flood-{args.label}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "inputs"}, indent=1))
    ok = all(o["ok"] for o in outcomes.values()) and result["router_same_process"] and other == 200
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
