"""The daemon's status, typed once: what ``appliance status``, the HTTP API, metrics, MQTT, Modbus and OPC UA read.

One snapshot model, built by the daemon and read by every output; its JSON form
(``Status.to_json()``) is what ``appliance status --json`` and ``/api/status`` show. Each output
adds its own counters under ``outputs.<name>`` (free-form beyond the common fields).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Threshold(_Model):
    """The threshold in force now and where it comes from (``bundle``, ``camera``, ``shift:A``, ``operator``)."""

    value: float
    source: str


class BundleInfo(_Model):
    """The model a camera runs."""

    model_id: str | None
    bank_hash: str | None
    path: str | None


class Latency(_Model):
    """Frame-to-result latency percentiles over the last results, milliseconds."""

    p50: float | None = None
    p99: float | None = None


class LastResult(_Model):
    """The newest result of a camera (the audit row's fields, latency as one number)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    id: str
    seq: int
    verdict: str
    score: float | None = None
    threshold: float | None = None
    finished_at: float
    trigger_id: str | None = None


class Alarm(_Model):
    """A condition that needs a person (a full disk), raised until it clears; inspection goes on."""

    kind: str = Field(description="disk_low, ...")
    detail: str
    since: float


class CameraStatus(_Model):
    """One camera: its source, its health, its counters and its newest result."""

    state: str = Field(description="connecting, running, lost, ended, stopped")
    state_detail: str = ""
    trigger: str
    source: str
    enabled: bool
    healthy: bool = Field(description="inspection is making progress (nothing waits too long for a result)")
    unhealthy: list[str] = Field(default_factory=list, description="why not healthy")
    ready: bool = Field(description="what a PLC may act on: healthy, running, enabled, a model loaded, the "
                                    "daemon not stopping")
    frames: int
    counts: dict[str, int]
    drops: int
    fps: float
    latency_ms: Latency
    queue_depth: int
    in_engine: int
    reconnects: int
    trigger_overruns: int
    skipped_disabled: int
    threshold: Threshold
    bundle: BundleInfo
    last: LastResult | None = None
    drift: dict[str, Any] = Field(default_factory=lambda: {"state": "off"},
                                  description="the drift watch: state (off, no_baseline, collecting, ok, drift), "
                                              "windows, the last window's p-values")


class DaemonInfo(_Model):
    """The process itself."""

    version: str
    pid: int
    run_id: str = Field(description="this run's id: recorded on every audit row and event of the run")
    started_at: float
    uptime_s: float
    config: str
    healthy: bool = Field(description="every camera makes progress and the audit writer lives (the watchdog)")
    unhealthy: list[str] = Field(default_factory=list)
    stopping: bool = False
    alarms: list[Alarm] = Field(default_factory=list)
    timezone: str
    metrics_url: str | None = Field(None, description="where Prometheus scrapes this daemon")


class Status(_Model):
    """The whole snapshot."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    daemon: DaemonInfo
    cameras: dict[str, CameraStatus]
    outputs: dict[str, dict[str, Any]] = Field(description="per output: state, backlog, sent, ... and its own")
    disk: dict[str, Any] = Field(default_factory=dict, description="free space against the floor, per folder")

    @property
    def ok(self) -> bool:
        """Healthy and no alarm: what ``/healthz`` answers 200 for."""
        return self.daemon.healthy and not self.daemon.alarms

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (``appliance status --json``, ``/api/status``)."""
        return self.model_dump(mode="json")
