"""Metrics: ``ray.util.metrics`` in every replica, the ingress's included.

Ray's metrics agent on each node exports what a replica records (scraped at
the node's metrics export port, ``8080`` in the k8s manifests), with every
name prefixed ``ray_`` (``mriseg_volumes_total`` is exported as
``ray_mriseg_volumes_total``). One metrics system, one scrape target per node:
the ingress has no registry or HTTP server of its own.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ReplicaMetrics:
    """Per sub-model replica, exported through Ray's metrics agent."""

    def __init__(self, submodel: str):
        # lazy: ray takes seconds to import; only code running under Ray needs it
        from ray.util import metrics as rm

        self.tags = {"submodel": submodel}
        self.predict_seconds = rm.Histogram(
            "mriseg_submodel_predict_seconds", "Sub-model inference time per volume.",
            boundaries=list(LATENCY_BUCKETS), tag_keys=("submodel",))
        self.volumes = rm.Counter("mriseg_submodel_volumes_total", "Volumes predicted.", tag_keys=("submodel",))
        self.voxels = rm.Counter("mriseg_submodel_voxels_total", "Voxels predicted (model grid).",
                                 tag_keys=("submodel",))
        self.in_flight = rm.Gauge("mriseg_submodel_in_flight", "Requests inside this replica (queued + running).",
                                  tag_keys=("submodel",))
        self.errors = rm.Counter("mriseg_submodel_errors_total", "Failed predictions by error type.",
                                 tag_keys=("submodel", "type"))

    def observe(self, seconds: float, voxels: int) -> None:
        self.predict_seconds.observe(seconds, tags=self.tags)
        self.volumes.inc(1, tags=self.tags)
        self.voxels.inc(voxels, tags=self.tags)

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n, tags=self.tags)

    def error(self, exc: BaseException) -> None:
        self.errors.inc(1, tags={**self.tags, "type": type(exc).__name__})


class _Series:
    """One series of a Ray metric: the update its kind allows, with its tags bound."""

    def __init__(self, metric: Any, tags: dict[str, str]):
        self._metric, self._tags = metric, tags

    def observe(self, value: float) -> None:
        self._metric.observe(value, tags=self._tags)

    def inc(self, amount: float = 1) -> None:
        if amount:  # Ray refuses a zero increment; a job that staged no bytes counts nothing
            self._metric.inc(amount, tags=self._tags)

    def set(self, value: float) -> None:
        self._metric.set(value, tags=self._tags)


class _Family:
    """A Ray metric behind the ``labels(*values)`` interface of :class:`serve.router.metrics.Instrument`.

    The router names a series by its label values in ``tag_keys`` order (as prometheus-client did), so the
    job service does not depend on which metrics library the cluster uses.
    """

    def __init__(self, metric: Any, tag_keys: tuple[str, ...]):
        self._metric, self._keys = metric, tag_keys

    def labels(self, *values: str) -> _Series:
        """The series of these label values.

        Args:
            values: one value per tag key, in order.

        Returns:
            The series, ready for ``observe``, ``inc`` or ``set``.
        """
        if len(values) != len(self._keys):
            raise ValueError(f"{self._metric.info['name']} takes {len(self._keys)} label value(s) "
                             f"{self._keys}, not {len(values)}")
        return _Series(self._metric, {k: str(v) for k, v in zip(self._keys, values)})

    def set(self, value: float) -> None:
        """Set an untagged gauge."""
        self._metric.set(value, tags={})


class IngressMetrics:
    """The router's metrics (:class:`serve.router.metrics.JobMetrics`), recorded with ``ray.util.metrics``."""

    def __init__(self) -> None:
        # lazy: ray takes seconds to import; only code running under Ray needs it
        from ray.util import metrics as rm

        def histogram(name: str, doc: str, keys: tuple[str, ...]) -> _Family:
            return _Family(rm.Histogram(name, doc, boundaries=list(LATENCY_BUCKETS), tag_keys=keys), keys)

        def counter(name: str, doc: str, keys: tuple[str, ...]) -> _Family:
            return _Family(rm.Counter(name, doc, tag_keys=keys), keys)

        def gauge(name: str, doc: str, keys: tuple[str, ...]) -> _Family:
            return _Family(rm.Gauge(name, doc, tag_keys=keys), keys)

        self.requests = histogram("mriseg_http_request_seconds", "HTTP request latency.",
                                  ("method", "route", "status"))
        self.stage_seconds = histogram("mriseg_stage_seconds", "Job stage latency.", ("stage",))
        self.submodel_seconds = histogram("mriseg_submodel_call_seconds",
                                          "Sub-model call latency seen by the router (queueing included).",
                                          ("submodel",))
        self.job_seconds = histogram("mriseg_job_seconds", "Whole-job latency.", ("site", "status"))
        self.queue_depth = gauge("mriseg_queue_depth", "Jobs waiting for a router slot.", ("site",))
        self.running = gauge("mriseg_jobs_running", "Jobs holding a router slot.", ())
        self.volumes = counter("mriseg_volumes_total", "Volumes segmented.", ("site",))
        self.voxels = counter("mriseg_voxels_total", "Input voxels segmented.", ("site",))
        self.bytes_staged = counter("mriseg_bytes_staged_total", "Bytes read or written for jobs.", ("direction",))
        self.errors = counter("mriseg_errors_total", "Errors by type and site.", ("type", "site", "status"))

    def error(self, exc: BaseException, site: str, status: int) -> None:
        self.errors.labels(type(exc).__name__, site, str(status)).inc()


#: Every series the ingress records, by the name Ray exports it under (histograms add _bucket, _count, _sum).
INGRESS_METRIC_NAMES = ("ray_mriseg_http_request_seconds", "ray_mriseg_stage_seconds",
                        "ray_mriseg_submodel_call_seconds", "ray_mriseg_job_seconds", "ray_mriseg_queue_depth",
                        "ray_mriseg_jobs_running", "ray_mriseg_volumes_total", "ray_mriseg_voxels_total",
                        "ray_mriseg_bytes_staged_total", "ray_mriseg_errors_total")
