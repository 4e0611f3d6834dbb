"""Prometheus metrics, read from the daemon's status snapshot at scrape time (one source of truth)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_PREFIX = "anomaly_appliance"


class StatusCollector(Collector):
    """Turns ``status()`` into metric families whenever Prometheus scrapes ``/metrics``."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """The metric families of the current status."""
        s = self._status()
        inspections = CounterMetricFamily(f"{_PREFIX}_inspections", "inspections by camera and verdict",
                                          labels=["camera", "verdict"])
        drops = CounterMetricFamily(f"{_PREFIX}_dropped_frames", "frames dropped from a full queue", labels=["camera"])
        fps = GaugeMetricFamily(f"{_PREFIX}_fps", "inspections per second (last 5 s)", labels=["camera"])
        latency = GaugeMetricFamily(f"{_PREFIX}_latency_ms", "frame-to-result latency percentiles (last 500)",
                                    labels=["camera", "quantile"])
        depth = GaugeMetricFamily(f"{_PREFIX}_queue_depth", "frames waiting for inference", labels=["camera"])
        up = GaugeMetricFamily(f"{_PREFIX}_camera_up", "1 while the camera's source is running", labels=["camera"])
        for cam, c in s.get("cameras", {}).items():
            for verdict, n in c.get("counts", {}).items():
                inspections.add_metric([cam, verdict], n)
            drops.add_metric([cam], c.get("drops", 0))
            fps.add_metric([cam], c.get("fps", 0.0))
            for q, key in (("0.5", "p50"), ("0.99", "p99")):
                value = (c.get("latency_ms") or {}).get(key)
                if value is not None:
                    latency.add_metric([cam, q], value)
            depth.add_metric([cam], c.get("queue_depth", 0))
            up.add_metric([cam], 1.0 if c.get("state") == "running" else 0.0)
        yield from (inspections, drops, fps, latency, depth, up)
        delivered = CounterMetricFamily(f"{_PREFIX}_output_records", "records by output and outcome",
                                        labels=["output", "outcome"])
        backlog = GaugeMetricFamily(f"{_PREFIX}_output_backlog", "records waiting for an output", labels=["output"])
        for name, o in s.get("outputs", {}).items():
            for outcome in ("sent", "skipped", "failed", "dropped"):
                if outcome in o:
                    delivered.add_metric([name, outcome], o[outcome])
            backlog.add_metric([name], o.get("backlog", o.get("queued", 0)))
        yield from (delivered, backlog)
        daemon = s.get("daemon", {})
        healthy = GaugeMetricFamily(f"{_PREFIX}_healthy", "1 while every camera pipeline makes progress")
        healthy.add_metric([], 1.0 if daemon.get("healthy") else 0.0)
        uptime = GaugeMetricFamily(f"{_PREFIX}_uptime_seconds", "seconds since the daemon started")
        uptime.add_metric([], daemon.get("uptime_s", 0.0))
        yield from (healthy, uptime)


def registry_for(status: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry holding the status collector (and nothing process-global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return registry
