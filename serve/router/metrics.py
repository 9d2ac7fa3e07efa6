"""What the job service measures, as an interface: the cluster passes its metrics registry in.

The router is plain asyncio with no metrics backend of its own; without one (the in-process
tests, a service built by hand) it records nothing.
"""

from __future__ import annotations

from typing import Any, Protocol


class Instrument(Protocol):
    """A metric family; ``labels(...)`` selects one series, which has the update its kind allows."""

    def labels(self, *values: str) -> Any: ...


class JobMetrics(Protocol):
    """The series :class:`serve.router.service.JobService` updates (``serve.cluster.metrics.IngressMetrics``),
    and ``requests``, which the HTTP layer updates through the service."""

    requests: Instrument
    stage_seconds: Instrument
    submodel_seconds: Instrument
    job_seconds: Instrument
    queue_depth: Instrument
    running: Any
    volumes: Instrument
    voxels: Instrument
    bytes_staged: Instrument

    def error(self, exc: BaseException, site: str, status: int) -> None: ...


class _Discard:
    """A series that drops every update."""

    def labels(self, *values: str) -> "_Discard":
        return self

    def observe(self, value: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass


class NoMetrics:
    """A :class:`JobMetrics` that records nothing."""

    def __init__(self) -> None:
        d = _Discard()
        self.requests = self.stage_seconds = self.submodel_seconds = self.job_seconds = self.queue_depth = d
        self.running = self.volumes = self.voxels = self.bytes_staged = d

    def error(self, exc: BaseException, site: str, status: int) -> None:
        pass
