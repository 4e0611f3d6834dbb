"""Prometheus metrics, a service of the daemon whatever outputs are configured.

Counters and gauges are read from the status snapshot at scrape time (one source of truth);
latencies are histograms observed once per inspection, so a fleet can aggregate them (sum of
buckets across appliances) where percentiles of percentiles would be meaningless. The daemon
serves the registry on its own port (``[metrics]``, loopback by default); the HTTP output's
``/metrics`` serves the same registry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

from ..errors import PublishError
from .records import ERROR, Inspection

log = logging.getLogger(__name__)
_PREFIX = "anomaly_appliance"
#: Latency buckets in seconds: a frame at line rate takes tens of milliseconds; a stall, seconds.
BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Per-stage latencies of a scored frame that get a histogram.
STAGES = ("queue", "preprocess", "backbone", "scorer")


class MetricsConfig(BaseModel):
    """The ``[metrics]`` section: where Prometheus scrapes the daemon."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="serve /metrics on host:port (the http output serves it too)")
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (loopback: only this machine)")
    port: int = Field(9464, ge=0, le=65535, description="TCP port (0: any free port)")


class StatusCollector(Collector):
    """Turns ``status()`` into metric families whenever Prometheus scrapes ``/metrics``."""

    def __init__(self, status: Callable[[], Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """The metric families of the current status."""
        s = self._status()
        inspections = CounterMetricFamily(f"{_PREFIX}_inspections", "inspections by camera and verdict",
                                          labels=["camera", "verdict"])
        drops = CounterMetricFamily(f"{_PREFIX}_dropped_frames", "frames dropped from a full queue", labels=["camera"])
        fps = GaugeMetricFamily(f"{_PREFIX}_fps", "inspections per second (last 5 s)", labels=["camera"])
        depth = GaugeMetricFamily(f"{_PREFIX}_queue_depth", "frames waiting for inference", labels=["camera"])
        up = GaugeMetricFamily(f"{_PREFIX}_camera_up", "1 while the camera's source is running", labels=["camera"])
        ready = GaugeMetricFamily(f"{_PREFIX}_camera_ready", "1 while a PLC may act on the camera's results",
                                  labels=["camera"])
        drift = GaugeMetricFamily(f"{_PREFIX}_drift", "1 while the camera's drift alarm is raised", labels=["camera"])
        drift_p = GaugeMetricFamily(f"{_PREFIX}_drift_p_value", "p-value of the camera's last drift window",
                                    labels=["camera"])
        for cam, c in s.cameras.items():
            for verdict, n in c.counts.items():
                inspections.add_metric([cam, verdict], n)
            drops.add_metric([cam], c.drops)
            fps.add_metric([cam], c.fps)
            depth.add_metric([cam], c.queue_depth)
            up.add_metric([cam], 1.0 if c.state == "running" else 0.0)
            ready.add_metric([cam], 1.0 if c.ready else 0.0)
            drift.add_metric([cam], 1.0 if c.drift.get("state") == "drift" else 0.0)
            if (c.drift.get("last") or {}).get("p_value") is not None:
                drift_p.add_metric([cam], c.drift["last"]["p_value"])
        yield from (inspections, drops, fps, depth, up, ready, drift, drift_p)
        delivered = CounterMetricFamily(f"{_PREFIX}_output_records", "records by output and outcome",
                                        labels=["output", "outcome"])
        backlog = GaugeMetricFamily(f"{_PREFIX}_output_backlog", "records waiting for an output", labels=["output"])
        for name, o in s.outputs.items():
            for outcome in ("sent", "skipped", "failed", "dropped"):
                if isinstance(o.get(outcome), int):
                    delivered.add_metric([name, outcome], o[outcome])
            waiting = o.get("backlog", o.get("queued"))
            if isinstance(waiting, int):
                backlog.add_metric([name], waiting)
        yield from (delivered, backlog)
        healthy = GaugeMetricFamily(f"{_PREFIX}_healthy", "1 while every camera pipeline makes progress")
        healthy.add_metric([], 1.0 if s.daemon.healthy else 0.0)
        alarms = GaugeMetricFamily(f"{_PREFIX}_alarm", "1 while an alarm is raised", labels=["kind"])
        for alarm in s.daemon.alarms:
            alarms.add_metric([alarm.kind], 1.0)
        uptime = GaugeMetricFamily(f"{_PREFIX}_uptime_seconds", "seconds since the daemon started")
        uptime.add_metric([], s.daemon.uptime_s)
        free = GaugeMetricFamily(f"{_PREFIX}_disk_free_bytes", "free bytes on the daemon's file systems",
                                 labels=["path"])
        for path, v in s.disk.get("volumes", {}).items():
            free.add_metric([path], v["free_mb"] * 2**20)
        yield from (healthy, alarms, uptime, free)


class Metrics:
    """The daemon's registry: the status collector plus latency histograms, and its HTTP server."""

    def __init__(self, status: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(status))
        self.latency = Histogram(f"{_PREFIX}_inspection_seconds", "capture-to-result time of scored frames",
                                 ["camera"], registry=self.registry, buckets=BUCKETS)
        self.stage = Histogram(f"{_PREFIX}_stage_seconds", "time of a scored frame per stage", ["camera", "stage"],
                               registry=self.registry, buckets=BUCKETS)
        self._server: Any = None
        self.port: int | None = None
        self.url: str | None = None

    def observe(self, record: Inspection) -> None:
        """Count one inspection's latencies (error results have no stages to speak of)."""
        if record.verdict == ERROR:
            return
        lat = record.latency_ms
        if "total" in lat:
            self.latency.labels(record.camera).observe(lat["total"] / 1e3)
        for stage in STAGES:
            if stage in lat:
                self.stage.labels(record.camera, stage).observe(max(0.0, lat[stage]) / 1e3)

    def serve(self, config: MetricsConfig) -> None:
        """Listen on ``config.host:port``; ``PublishError`` naming the cause if the port cannot be had."""
        if not config.enabled:
            return
        try:
            self._server, _ = start_http_server(config.port, addr=config.host, registry=self.registry)
        except OSError as exc:
            raise PublishError(f"metrics: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}; "
                               "set [metrics] port to a free one, or enabled = false") from None
        self.port = int(self._server.server_address[1])
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.url = f"http://{host}:{self.port}/metrics"
        log.info("metrics: serving %s", self.url)

    def close(self) -> None:
        """Stop the server (its thread ends); never raises."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.shutdown()
                server.server_close()
            except Exception as exc:
                log.warning("metrics server did not stop cleanly: %s", exc)
