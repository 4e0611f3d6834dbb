"""Per-camera running figures for status, the live page and metrics: counts, rate, latency, last result."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

from .records import ERROR, NG, OK, Inspection

#: Results kept for the latency percentiles; seconds over which the frame rate is measured.
LATENCY_WINDOW = 500
RATE_WINDOW_S = 5.0


class CameraStats:
    """Thread-safe counters of one camera since the daemon started."""

    def __init__(self, camera: str) -> None:
        self.camera = camera
        self._lock = threading.Lock()
        self.counts = {OK: 0, NG: 0, ERROR: 0}
        self.drops = 0
        self._latency: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._times: collections.deque[float] = collections.deque()
        self.last: Inspection | None = None

    def add(self, record: Inspection) -> None:
        """Count one finished inspection."""
        now = time.monotonic()
        with self._lock:
            self.counts[record.verdict] += 1
            if record.verdict != ERROR and "total" in record.latency_ms:
                self._latency.append(float(record.latency_ms["total"]))
            self._times.append(now)
            while self._times and now - self._times[0] > RATE_WINDOW_S:
                self._times.popleft()
            self.last = record

    def dropped(self) -> None:
        """Count one frame dropped from a full queue."""
        with self._lock:
            self.drops += 1

    def snapshot(self) -> dict[str, Any]:
        """Counts, frames per second, p50/p99 frame-to-result latency (ms), drops and the last result."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._times if now - t <= RATE_WINDOW_S]
            fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            if recent and now - recent[-1] > 2 * RATE_WINDOW_S / max(len(recent), 1):
                fps = len(recent) / RATE_WINDOW_S  # slowing down or stopped: do not show a stale rate
            lat = np.asarray(self._latency, np.float64)
            last = self.last
        latency = ({"p50": round(float(np.percentile(lat, 50)), 2), "p99": round(float(np.percentile(lat, 99)), 2)}
                   if lat.size else {"p50": None, "p99": None})
        out: dict[str, Any] = {"frames": sum(self.counts.values()), "counts": dict(self.counts), "drops": self.drops,
                               "fps": round(fps, 2), "latency_ms": latency, "last": None}
        if last is not None:
            out["last"] = {k: v for k, v in last.to_dict().items() if k != "latency_ms"} | {
                "latency_ms": round(float(last.latency_ms.get("total", 0.0)), 2)}
        return out
