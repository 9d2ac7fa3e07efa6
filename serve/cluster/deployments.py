"""One nnU-Net sub-model as a Ray Serve deployment.

The app binds :class:`SubModelDeployment` once per sub-model with
``.options(name=<sub-model>)``; each binding scales on its own. The class is
a thin shell over :class:`SubModelRunner`, plain code that loads the model
from the store, warms it up and predicts.

A model missing from every store source leaves the replica *unavailable*
(healthy, answers 409 on use, shown in ``/v1/structures``): TotalSegmentator
ships some sub-models under a restricted licence, so a site may lack them.
A model that is present but cannot load or run, or whose S3 source cannot be
read when the replica starts, fails the health check, so Ray replaces the
replica (and the new one reads the source again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Annotated, Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, StrictStr
from ray import serve as rayserve

from serve.catalogue import load_catalogue
from serve.cluster.metrics import ReplicaMetrics
from serve.errors import ModelUnavailableError, MrisegError
from serve.inference.memory import release_free_memory
from serve.inference.modelload import configure_threads
from serve.inference.predict import predict_labels
from serve.settings_checks import STRICT, Says, check, number, whole
from serve.storage.models import open_model_store
from serve.storage.s3client import S3Settings

log = logging.getLogger(__name__)


_FRACTION = number(0, above=True, maximum=1)


class SubModelSettings(BaseModel):
    """What a sub-model replica needs; built from the app args (``submodel_settings`` and the model sources)."""

    model_config = STRICT

    submodel: StrictStr
    model_sources: list[StrictStr]
    model_cache_dir: StrictStr | None = None
    s3: dict | None = None
    model_pins: StrictStr | None = None  # the operator's pinned model manifest (a path); required for s3:// sources
    device: Annotated[StrictStr, Says("auto, cpu, cuda or cuda:N")] = "auto"
    threads: whole(1) = 1
    gpu_memory_fraction: _FRACTION | None = None
    tile_step_size: _FRACTION | None = None
    precision: Annotated[Literal["fp32", "bf16"], Says("fp32 or bf16")] = "fp32"  # serve.inference.predict.PRECISIONS
    warmup_shape: tuple[whole(1), whole(1), whole(1)] = (32, 32, 32)

    @classmethod
    def from_mapping(cls, submodel: str, d: Mapping[str, Any]) -> "SubModelSettings":
        """One sub-model's settings from the app's ``submodel_settings`` and model sources.

        Args:
            submodel: the sub-model's name.
            d: ``submodel_settings`` with ``model_sources``, ``model_pins``, ``model_cache_dir`` and ``s3``.

        Returns:
            The checked settings.

        Raises:
            MrisegError: "submodel_settings: {key} must be ...", or an unknown key.
        """
        return check(cls, d, "submodel_settings", submodel=submodel)


def cap_gpu_memory(fraction: float | None) -> bool:
    """Cap this process's share of GPU memory, so fractional replicas cannot starve each other."""
    if not fraction:
        return False
    # lazy: torch takes seconds to import; only model loading and prediction need it
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.set_per_process_memory_fraction(float(fraction), device=0)
    return True


class SubModelRunner:
    """Loads one sub-model and predicts with it; no Ray inside."""

    def __init__(self, settings: SubModelSettings):
        self.settings = settings
        self.sm = load_catalogue().submodel(settings.submodel)
        configure_threads(settings.threads)
        cap_gpu_memory(settings.gpu_memory_fraction)
        self.model = None
        self.state, self.detail = "unavailable", ""
        self.calls = 0
        try:
            store = open_model_store(settings.model_sources, settings.model_cache_dir,
                                     S3Settings.from_mapping(settings.s3) if settings.s3 else None,
                                     pins=settings.model_pins)
        except MrisegError as e:  # an unreadable pinned manifest: reported by check_health like a bad model
            self.state, self.detail = "broken", e.message
            log.error("sub-model %s: %s", self.sm.name, e.message)
            return
        st = store.inspect(self.sm)
        if st.state == "missing":
            self.detail = st.detail
            log.warning("sub-model %s not installed; replica answers 409 until it is", self.sm.name)
            return
        if st.state == "unreachable":  # the router answers 503; check_health has Serve start a new replica
            self.state, self.detail = "unreachable", st.detail
            log.error("sub-model %s: its model source cannot be read: %s", self.sm.name, st.detail)
            return
        try:
            self.model = store.load(self.sm, st, device=settings.device, tile_step_size=settings.tile_step_size)
            self._warm_up()
        except Exception as e:  # noqa: BLE001 - recorded; check_health reports it
            self.state, self.detail = "broken", f"{type(e).__name__}: {e}"
            log.error("sub-model %s failed to load: %s", self.sm.name, self.detail)
            return
        self.state = "ready"

    def _warm_up(self) -> None:
        rng = np.random.default_rng(0)
        self.predict(rng.standard_normal(self.settings.warmup_shape).astype(np.float32), self.sm.spacing_mm,
                     count=False)

    def predict(self, data: np.ndarray, spacing_mm: float, count: bool = True) -> np.ndarray:
        """Local label ids for ``data`` (x, y, z) at ``spacing_mm``."""
        if self.model is None:
            raise ModelUnavailableError(
                f"sub-model {self.sm.name} (Dataset{self.sm.task_id}) is not installed on this cluster: "
                f"{self.detail}")
        if count:
            self.calls += 1
        try:
            return predict_labels(self.model, data, spacing_mm, precision=self.settings.precision)
        finally:
            release_free_memory()  # a few ms, against RSS creeping up with every new input size

    def check_health(self) -> None:
        if self.state in ("broken", "unreachable"):
            raise RuntimeError(f"sub-model {self.sm.name} is {self.state}: {self.detail}")

    def describe(self) -> dict[str, Any]:
        """State plus the model's metadata without its network (what the router needs to merge)."""
        model = dataclasses.replace(self.model, predictor=None) if self.model is not None else None
        return {"submodel": self.sm.name, "state": self.state, "detail": self.detail, "model": model,
                "checksum": self.model.checksum if self.model is not None else None}


def _resolve(data: Any) -> np.ndarray:
    """An ndarray, an ObjectRef, or an ObjectRef wrapped in a list (so Serve does not resolve it early)."""
    # lazy: ray takes seconds to import; only code running under Ray needs it
    import ray

    if isinstance(data, (list, tuple)) and len(data) == 1:
        data = data[0]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)  # zero-copy, read-only view of the shared array
    if not isinstance(data, np.ndarray):
        raise MrisegError(f"expected an array or ObjectRef, got {type(data).__name__}")
    return data


@rayserve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=4,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class SubModelDeployment:
    """Serve shell around :class:`SubModelRunner`. Bound once per sub-model."""

    def __init__(self, submodel: str, settings: dict | None = None):
        self.runner = SubModelRunner(SubModelSettings.from_mapping(submodel, settings or {}))
        self.metrics = ReplicaMetrics(submodel)
        # One inference at a time per replica: torch already uses every thread it is given;
        # further requests wait here (bounded by max_ongoing_requests).
        self._compute = asyncio.Semaphore(1)
        self._in_flight = 0

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` from the Serve config: ``gpu_memory_fraction``, ``threads``."""
        if user_config.get("gpu_memory_fraction"):
            cap_gpu_memory(user_config["gpu_memory_fraction"])
        if user_config.get("threads"):
            configure_threads(int(user_config["threads"]))

    async def run(self, data: Any, spacing_mm: float) -> dict[str, Any]:
        """Predict and report when the computation ran (epoch seconds) and where."""
        # lazy: ray takes seconds to import; only code running under Ray needs it
        import ray

        self._in_flight += 1
        self.metrics.set_in_flight(self._in_flight)
        try:
            async with self._compute:
                arr = _resolve(data)
                started = time.time()
                try:
                    labels = await asyncio.to_thread(self.runner.predict, arr, float(spacing_mm))
                except Exception as e:
                    self.metrics.error(e)
                    raise
                finished = time.time()
        finally:
            self._in_flight -= 1
            self.metrics.set_in_flight(self._in_flight)
        self.metrics.observe(finished - started, int(arr.size))
        return {"labels": labels, "started": started, "finished": finished, "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    async def predict(self, data: Any, spacing_mm: float) -> np.ndarray:
        """Local label ids (uint8), same shape as the input array."""
        return (await self.run(data, spacing_mm))["labels"]

    def describe(self) -> dict[str, Any]:
        return self.runner.describe()

    def stats(self) -> dict[str, Any]:
        # lazy: ray takes seconds to import; only code running under Ray needs it
        import ray

        return {"calls": self.runner.calls, "in_flight": self._in_flight, "pid": os.getpid(),
                "actor_name": ray.get_runtime_context().get_actor_name(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def check_health(self) -> None:
        self.runner.check_health()
