"""Operator thresholds: set at run time (CLI, MQTT, Modbus, OPC UA), kept across restarts, audited.

A small JSON file in the state folder (``thresholds.json``, replaced atomically) holds, per camera,
``{"camera": float | None, "shifts": {name: float}}``; ``thresholds.resolve`` combines it with the
config's schedule into the threshold in force for a frame. Every change is an audit event with the
overrides before and after, who asked, and the threshold in force at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from ..errors import ApplianceError, ConfigError
from .config import DaemonConfig
from .thresholds import check_overrides, resolve

log = logging.getLogger(__name__)
#: ``event(kind, camera, detail, data)``: the audit log's event writer.
EventSink = Callable[[str, str | None, str | None, Any], None]
FILE = "thresholds.json"


class ThresholdStore:
    """The thresholds in force per camera: config schedule plus persisted operator overrides (thread-safe)."""

    def __init__(self, config: DaemonConfig, tz: ZoneInfo, event: EventSink) -> None:
        self.config = config
        self.tz = tz
        self._event = event
        self.path = Path(config.paths.state) / FILE
        self._lock = threading.Lock()
        self._overrides: dict[str, dict[str, Any]] = self._load()

    def threshold_for(self, camera: str, when: float) -> tuple[float, str]:
        """The threshold in force for a frame of ``camera`` captured at ``when``, and where it comes from."""
        with self._lock:
            overrides = self._overrides.get(camera)
        return tuple(resolve(self.config.camera(camera).thresholds, self.tz, when, overrides))

    def set(self, camera: str, value: float | None, shift: str | None = None, who: str = "operator"
            ) -> dict[str, Any]:
        """Set (or clear, with ``None``) an operator threshold of a camera or one of its shifts; audited, persisted."""
        cam = self.config.camera(camera)
        with self._lock:
            before = self._overrides.get(camera)
            current = dict(before or {"camera": None, "shifts": {}})
            shifts = dict(current.get("shifts", {}))
            if shift is None:
                current["camera"] = value
            elif value is None:
                shifts.pop(shift, None)
            else:
                shifts[shift] = value
            current["shifts"] = shifts
            checked = check_overrides(current, cam.thresholds)
            self._overrides[camera] = checked
            self._save()
        value_now, source = self.threshold_for(camera, time.time())
        what = "cleared" if value is None else f"set to {value:g}"
        scope = f"shift {shift}" if shift else "camera"
        self._event("threshold_changed", camera,
                    f"{scope} threshold {what} by {who}; in force {value_now:g} ({source})",
                    {"before": before, "after": checked, "in_force": value_now, "source": source, "who": who,
                     "shift": shift, "value": value})
        return {"camera": camera, "overrides": checked, "in_force": {"value": value_now, "source": source}}

    def reconfigure(self, config: DaemonConfig) -> None:
        """A reloaded config: keep the overrides of cameras that still exist (their shifts are re-checked)."""
        self.config = config
        with self._lock:
            self._overrides = self._checked(self._overrides)

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            return self._checked(json.loads(self.path.read_text()))
        except (ValueError, ApplianceError, AttributeError, OSError) as exc:
            self._event("error", None, f"operator thresholds in {self.path} ignored: {exc}", None)
            return {}

    def _checked(self, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
        known = {c.id: c for c in self.config.cameras}
        out = {}
        for cam, value in data.items():
            if cam not in known:
                continue
            try:
                out[cam] = check_overrides(value, known[cam].thresholds)
            except ConfigError as exc:
                log.warning("operator thresholds of camera %s dropped: %s", cam, exc)
        return out

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self._overrides, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            raise ConfigError(f"cannot keep the operator threshold in {self.path}: {exc.strerror or exc}; it "
                              "applies now but would not survive a restart") from None
