"""Running one job: stage the input in, decode it, plan, admit it by memory, then compute and write.

The input is preprocessed once per spacing and ``ray.put`` once per spacing; every sub-model at that
spacing reads the same ObjectRef (in parallel). CPU-heavy steps run in worker threads so the event loop
keeps answering health and status calls. Each step the tests or the cluster may replace (preprocess,
merge, write, upload, put) is a constructor argument with the real one as its default.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from serve.catalogue import Catalogue, SubModel
from serve.errors import ServiceUnavailableError
from serve.imaging.sandbox import SandboxedDecoder
from serve.imaging.volume import DEFAULT_MAX_VOXELS
from serve.inference.pipeline import input_cast, merge_to_input_grid
from serve.inference.preprocess import prepare as prepare_volume
from serve.router.admission import MemoryBudget, job_bytes, max_admissible_voxels
from serve.router.journal import JobJournal
from serve.router.metrics import JobMetrics
from serve.router.state import Job
from serve.router.submodels import SubModels
from serve.router.writing import ResultWriter
from serve.storage import staging
from serve.storage.staging import ObjectInfo

if TYPE_CHECKING:  # the settings class lives with the facade that composes this part
    from serve.router.service import RouterSettings

# (volume, sub-models, prepared per spacing, label maps per sub-model, models, roi_subset)
#   -> (labels on the input grid, per-model label maps, structures)
MergeStep = Callable[..., tuple[np.ndarray, dict, dict]]
# (volume, spacing, resampling_order=..., [max_voxels=...]) -> the prepared volume at that spacing
PrepareStep = Callable[..., Any]


async def in_thread(fn: Callable, *args: Any, on_cancel: threading.Event | None = None) -> Any:
    """Run ``fn`` in a worker thread, and wait for it even when cancelled.

    A thread cannot be stopped, so a cancelled job keeps its slot (and its site's count) until the thread
    returns: cancelling cannot start more work than the limits allow.

    Args:
        fn: the blocking step.
        *args: its arguments.
        on_cancel: set when the job is cancelled, for work that can stop early (the decoder child).

    Returns:
        What ``fn`` returned.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel.set()
        await asyncio.wait([task])
        raise


def ray_put(arr: np.ndarray) -> Any:
    """One copy of ``arr`` in Ray's object store.

    Args:
        arr: the prepared array.

    Returns:
        Its ObjectRef.
    """
    # lazy: ray takes seconds to import; only code running under Ray needs it
    import ray

    return ray.put(arr)


class Executor:
    """Runs a scheduled job from its input to its written outputs, within the router's memory budget."""

    def __init__(self, settings: RouterSettings, metrics: JobMetrics, catalogue: Catalogue, journal: JobJournal,
                 submodels: SubModels, writer: ResultWriter, decoder: SandboxedDecoder,
                 on_start: Callable[[], None], put: Callable[[np.ndarray], Any] | None = None,
                 prepare: PrepareStep | None = None, merge: MergeStep | None = None):
        """Args:
            settings: the router's settings.
            metrics: where stage times, volumes and bytes are recorded.
            catalogue: the sub-models and their structures (the merge's precedence).
            journal: where a job is recorded as running.
            submodels: the sub-model deployments.
            writer: writes (and uploads) the outputs.
            decoder: decodes every input in a confined child process.
            on_start: called as a job starts running (the gauges).
            put: stores a prepared array for the sub-models (default: ``ray.put``).
            prepare: preprocesses the volume at one spacing (default: serve.inference.preprocess's).
            merge: merges the sub-models' label maps onto the input grid (default: the in-process
                Segmenter's).
        """
        self.settings, self.metrics, self.catalogue, self.journal = settings, metrics, catalogue, journal
        self.submodels, self.writer, self.decoder, self.on_start = submodels, writer, decoder, on_start
        self.put = put or ray_put
        self.prepare = prepare or prepare_volume
        self.merge = merge or self._merge_restore
        self.budget = MemoryBudget(settings.memory_budget_bytes)
        # the decoder refuses, from the header, a volume that the memory budget could never admit
        self.max_voxels = min(settings.max_voxels or DEFAULT_MAX_VOXELS,
                              max_admissible_voxels(settings.memory_budget_bytes))
        self._seq = 0

    async def execute(self, job: Job, spooled: Path | None, filename: str) -> Job:
        """Run ``job``: its input (spooled upload or S3 object) to its outputs.

        Args:
            job: the job, as scheduled.
            spooled: its spooled upload (None: read ``job.input_uri``).
            filename: the upload's name (its suffix picks the reader).

        Returns:
            The job, with its outputs, timings and structures.
        """
        job.status, job.started, job.start_seq = "running", time.time(), self._seq
        self._seq += 1
        self.on_start()
        await in_thread(self._save_running, job)
        t0 = time.perf_counter()

        async def stage(name: str, fn, *args, on_cancel: threading.Event | None = None):
            t = time.perf_counter()
            out = await in_thread(fn, *args, on_cancel=on_cancel)
            job.timings[name] = time.perf_counter() - t
            self.metrics.stage_seconds.labels(name.removesuffix("_s")).observe(job.timings[name])
            return out

        source = None  # the S3 object version read, for the output set's job.json
        cancel = threading.Event()  # a cancelled job's decoder child is killed, so its slot frees at once
        if spooled is None:
            upload, filename, source = await stage("stage_in_s", self._download, job.input_uri)
            self.metrics.bytes_staged.labels("in").inc(len(upload))
            volume = await stage("decode_s", functools.partial(self.decoder.decode_bytes, cancel=cancel), upload,
                                 filename, self.max_voxels, on_cancel=cancel)
            del upload
        else:
            # The spooled upload stays until the job settles, so a restarted router can resume it.
            self.metrics.bytes_staged.labels("in").inc(spooled.stat().st_size)
            volume = await stage("decode_s", functools.partial(self.decoder.decode, cancel=cancel), spooled,
                                 self.max_voxels, on_cancel=cancel)
        sms, descs, skipped = await self.submodels.plan(job)
        spacings = sorted({sm.spacing_mm for sm in sms})
        # admission by memory: wait until this job's bytes fit beside the running jobs' (413 if they never can)
        async with self.budget.reserve(job_bytes(volume.shape, volume.affine, spacings)):
            return await self._compute(job, volume, sms, descs, skipped, source, stage, t0)

    async def _compute(self, job: Job, volume, sms: list[SubModel], descs: dict[str, dict], skipped: dict[str, str],
                       source, stage, t0: float) -> Job:
        """Preprocess, run the sub-models, merge and write: everything after the decode, within the budget."""
        kw = {} if self.settings.max_voxels is None else {"max_voxels": self.settings.max_voxels}
        job.unavailable = skipped
        models = {n: d["model"] for n, d in descs.items()}

        prepared, refs = {}, {}
        order = job.options.resampling_order
        for spacing in sorted({sm.spacing_mm for sm in sms}):
            prepared[spacing] = await stage(f"prepare_{spacing:g}mm_s",
                                            lambda s=spacing: self.prepare(volume, s, resampling_order=order, **kw))
            # One copy into the object store, shared by every sub-model at this spacing.
            refs[spacing] = self.put(prepared[spacing].data)
        job.input_cast = input_cast(prepared.values())

        t = time.perf_counter()
        answers = await asyncio.gather(*(self.submodels.call_with_retry(job, sm, refs[sm.spacing_mm]) for sm in sms),
                                       return_exceptions=True)
        job.timings["submodels_s"] = time.perf_counter() - t
        for sm, r in zip(sms, answers):
            if isinstance(r, asyncio.CancelledError):  # this task was not cancelled (the await above returned)
                raise ServiceUnavailableError(f"the call to sub-model {sm.name} was cancelled by the cluster "
                                              f"(a replica shutting down?); the job can be resubmitted as is")
            if isinstance(r, BaseException):
                raise r
        local_maps = {sm.name: r["labels"] for sm, r in zip(sms, answers)}
        merged = await stage("merge_restore_s", self.merge, volume, sms, prepared, local_maps, models,
                             job.options.roi_subset)
        labels, per_model, structures = merged
        job.structures = structures
        outdir = Path(self.settings.results_dir) / job.site / job.id
        # a cancel during the write keeps the slot until the thread returns; it skips the upload when cancelled
        job.outputs = await stage("write_s", self.writer.write, job, volume, labels, per_model, structures, outdir,
                                  models, source)
        job.timings["total_s"] = time.perf_counter() - t0
        self.metrics.volumes.labels(job.site).inc()
        self.metrics.voxels.labels(job.site).inc(int(np.prod(volume.data.shape)))
        return job

    def _merge_restore(self, volume, sms, prepared, local_maps, models, roi_subset):
        """The in-process Segmenter's own merge (per spacing, back to the input grid, precedence)."""
        return merge_to_input_grid(volume.shape, sms, prepared, local_maps, models, roi_subset, self.catalogue)

    def _save_running(self, job: Job) -> None:
        try:
            self.journal.save(job)
        except OSError as e:  # the router's disk: not the job's fault, and another replica may manage
            raise ServiceUnavailableError(f"the router could not record job {job.id} on its disk "
                                          f"({e.strerror or type(e).__name__}); resubmit it") from e

    def _download(self, uri: str) -> tuple[bytes, str, ObjectInfo]:
        """The object's bytes, its file name and which version of it was read (ETag, version id)."""
        data, source = staging.download_object(uri, self.settings.max_upload_bytes, self.settings.s3)
        return data, uri.rsplit("/", 1)[-1], source
