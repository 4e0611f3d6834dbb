"""Status snapshots for tests of one output against a stand-in daemon: the real ``Status`` model, filled in.

A test names only what it cares about (a camera's state, readiness, last result, an alarm); the
rest takes the values of a camera that is running and ready.
"""

from __future__ import annotations

import os
import time
from typing import Any

from appliance.daemon.status import Status

CAMERA_DEFAULTS: dict[str, Any] = {
    "state": "running", "state_detail": "", "trigger": "free_run", "source": "replay:/tmp/x", "enabled": True,
    "healthy": True, "unhealthy": [], "ready": True, "frames": 0, "counts": {"ok": 0, "ng": 0, "error": 0},
    "drops": 0, "fps": 0.0, "latency_ms": {"p50": None, "p99": None}, "queue_depth": 0, "in_engine": 0,
    "reconnects": 0, "trigger_overruns": 0, "skipped_disabled": 0, "threshold": {"value": 0.5, "source": "bundle"},
    "bundle": {"model_id": "m1", "bank_hash": "b1", "path": None}, "last": None,
}


def snapshot(cameras: dict[str, dict[str, Any]], healthy: bool = True, unhealthy: list[str] | None = None,
             alarms: list[dict[str, Any]] | None = None, outputs: dict[str, dict[str, Any]] | None = None,
             **daemon: Any) -> Status:
    """A ``Status`` with these cameras (each over ``CAMERA_DEFAULTS``) and daemon fields."""
    cams = {}
    for cam, fields in cameras.items():
        merged = {**CAMERA_DEFAULTS, **fields}
        if "bundle" in fields:
            merged["bundle"] = {**CAMERA_DEFAULTS["bundle"], **fields["bundle"]}
        cams[cam] = merged
    info = {"version": "0.1.0", "pid": os.getpid(), "run_id": "test-run", "started_at": time.time() - 60,
            "uptime_s": 60.0, "config": "test.toml", "healthy": healthy, "unhealthy": unhealthy or [],
            "alarms": alarms or [], "timezone": "UTC", **daemon}
    return Status.model_validate({"daemon": info, "cameras": cams, "outputs": outputs or {}})
