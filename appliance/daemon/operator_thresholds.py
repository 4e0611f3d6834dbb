"""Operator and learned thresholds: set at run time, kept across restarts, audited.

A small JSON file in the state folder (``thresholds.json``, replaced atomically) holds, per camera,
the operator's overrides (CLI, MQTT, Modbus, OPC UA) and the thresholds recalibrated from labels
(``threshold_rule``), each ``{"camera": float | None, "shifts": {name: float}}``; ``thresholds.resolve``
combines them with the config's schedule into the threshold in force for a frame (an operator's
value pins it: nothing learned overrides it). Every change is an audit event with the values before
and after, who or what asked, and the threshold in force at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from ..atomic import write_atomic
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
        self._overrides, self._learned = self._load()

    def threshold_for(self, camera: str, when: float) -> tuple[float, str]:
        """The threshold in force for a frame of ``camera`` captured at ``when``, and where it comes from."""
        with self._lock:
            overrides, learned = self._overrides.get(camera), self._learned.get(camera)
        return tuple(resolve(self.config.camera(camera).thresholds, self.tz, when, overrides, learned))

    def pinned(self, camera: str, shift: str | None) -> bool:
        """Whether an operator's own threshold is in force there (the label rule then leaves it alone)."""
        with self._lock:
            o = self._overrides.get(camera) or {}
        return o.get("camera") is not None or (shift is not None and (o.get("shifts") or {}).get(shift) is not None)

    def learned(self, camera: str, shift: str | None) -> float | None:
        """The threshold learned from labels for the camera (or one of its shifts), if any."""
        with self._lock:
            layer = self._learned.get(camera) or {}
        return (layer.get("shifts") or {}).get(shift) if shift is not None else layer.get("camera")

    def set_learned(self, camera: str, shift: str | None, value: float, why: dict[str, Any]) -> None:
        """A threshold recalibrated from labels (``threshold_rule``): kept, and audited with the labels it came from."""
        cam = self.config.camera(camera)
        with self._lock:
            before = self._learned.get(camera)
            layer = {"camera": (before or {}).get("camera"), "shifts": dict((before or {}).get("shifts") or {})}
            if shift is None:
                layer["camera"] = value
            else:
                layer["shifts"][shift] = value
            self._learned[camera] = check_overrides(layer, cam.thresholds)
            self._save()
        value_now, source = self.threshold_for(camera, time.time())
        scope = f"shift {shift}" if shift else "camera"
        self._event("threshold_learned", camera, f"{scope} threshold learned from {len(why.get('label_ids', []))} "
                    f"labels: {why.get('previous')} -> {value:g}; in force {value_now:g} ({source})",
                    {"before": before, "after": self._learned[camera], "in_force": value_now, "source": source,
                     "shift": shift, **why})

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
            self._learned = self._checked(self._learned)

    def _load(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """``(operator overrides, learned)`` from the file; the file of an older version holds overrides only."""
        if not self.path.exists():
            return {}, {}
        try:
            data = json.loads(self.path.read_text())
            if set(data) <= {"operator", "learned"} and data:
                return self._checked(data.get("operator") or {}), self._checked(data.get("learned") or {})
            return self._checked(data), {}
        except (ValueError, ApplianceError, AttributeError, OSError) as exc:
            self._event("error", None, f"operator thresholds in {self.path} ignored: {exc}", None)
            return {}, {}

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
        try:
            write_atomic(self.path, json.dumps({"operator": self._overrides, "learned": self._learned}, indent=2,
                                               sort_keys=True) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot keep the operator threshold in {self.path}: {exc.strerror or exc}; it "
                              "applies now but would not survive a restart") from None
