"""Metrics: ``ray.util.metrics`` inside sub-model replicas, prometheus-client at the ingress.

Ray exports ``ray.util.metrics`` with its own metrics (scraped from each
node's metrics agent), but not a replica's prometheus-client registry. The
ingress therefore also keeps its own registry and serves it from a small
HTTP server on a separate port (``metrics_port``), which only the cluster
network should reach.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

log = logging.getLogger(__name__)

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


class IngressMetrics:
    """The router's own prometheus-client registry."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Histogram("mriseg_http_request_seconds", "HTTP request latency.",
                                  ("method", "route", "status"), registry=r, buckets=LATENCY_BUCKETS)
        self.stage_seconds = Histogram("mriseg_stage_seconds", "Job stage latency.", ("stage",),
                                       registry=r, buckets=LATENCY_BUCKETS)
        self.submodel_seconds = Histogram("mriseg_submodel_call_seconds",
                                          "Sub-model call latency seen by the router (queueing included).",
                                          ("submodel",), registry=r, buckets=LATENCY_BUCKETS)
        self.job_seconds = Histogram("mriseg_job_seconds", "Whole-job latency.", ("site", "status"),
                                     registry=r, buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("mriseg_queue_depth", "Jobs waiting for a router slot.", ("site",), registry=r)
        self.running = Gauge("mriseg_jobs_running", "Jobs holding a router slot.", registry=r)
        self.volumes = Counter("mriseg_volumes_total", "Volumes segmented.", ("site",), registry=r)
        self.voxels = Counter("mriseg_voxels_total", "Input voxels segmented.", ("site",), registry=r)
        self.bytes_staged = Counter("mriseg_bytes_staged_total", "Bytes read or written for jobs.",
                                    ("direction",), registry=r)
        self.errors = Counter("mriseg_errors_total", "Errors by type and site.", ("type", "site", "status"),
                              registry=r)

    def error(self, exc: BaseException, site: str, status: int) -> None:
        self.errors.labels(type(exc).__name__, site, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


_server_lock = threading.Lock()
_servers: dict[int, object] = {}


def start_metrics_server(metrics: IngressMetrics, port: int, host: str = "0.0.0.0") -> int | None:
    """Serve ``metrics`` on ``host:port`` in a daemon thread; returns the bound port, None if disabled or busy.

    A second ingress replica on the same node finds the port taken; it logs
    and carries on (its metrics still reach Ray's exporter).
    """
    if not port:
        return None

    with _server_lock:
        if port in _servers:
            return port
        try:
            server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as e:
            log.warning("metrics port %d unavailable (%s); /metrics not served by this replica", port, e.strerror)
            return None
        _servers[port] = server
        return server.server_address[1]
