"""The result record every output consumes: one inspection of one frame, success or error.

A frozen dataclass, so a record handed to several publishers cannot change under any of them.
Publishers never reach back into the engine: what they may need (the frame's pixels, the
anomaly map) travels with the record, the map computed lazily and at most once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Verdicts on the wire (MQTT, Modbus, the audit log): a PLC must never read an error as OK.
OK, NG, ERROR = "ok", "ng", "error"
VERDICTS = (OK, NG, ERROR)


def new_inspection_id(now: float | None = None) -> str:
    """A unique, time-sortable id: 12 hex digits of milliseconds since the epoch, then 10 random ones.

    Sortable so that an audit query or an MQTT consumer can order by id; random so that ids
    never repeat across restarts (a counter would restart at 0 after a kill -9).
    """
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{os.urandom(5).hex()}"


class LazyMap:
    """The normalised anomaly map of a frame in frame pixels, computed on first use and kept.

    The overlay needs it; the audit log and MQTT do not, so no frame pays for it unless an
    output asks. Thread-safe: two publishers asking at once compute it once.
    """

    def __init__(self, compute: Callable[[], np.ndarray]) -> None:
        self._compute: Callable[[], np.ndarray] | None = compute
        self._value: np.ndarray | None = None
        self._lock = threading.Lock()

    def __call__(self) -> np.ndarray:
        """The map ``[H, W]`` float32 in [0, 1] (0.5 = the bundle's threshold)."""
        with self._lock:
            if self._value is None:
                assert self._compute is not None
                self._value = self._compute()
                self._compute = None  # drop the closure (it holds the engine's score)
            return self._value


@dataclass(frozen=True)
class Inspection:
    """One frame's outcome.

    Attributes:
        id: unique, time-sortable inspection id (``new_inspection_id``).
        camera: camera id from the config.
        seq: the camera's frame counter since the daemon started.
        trigger_id: the external trigger's id, if the frame was taken on a trigger.
        captured_at: capture time, seconds since the epoch.
        finished_at: when the verdict was known, seconds since the epoch.
        source: file path or URI the pixels came from, if any.
        image_sha256: sha256 of the frame's pixels as decoded (``None`` if none were read): the same
            pixels give the same hash whatever the file format.
        file_sha256: sha256 of the file's own bytes when the frame came from a file (``sha256sum`` of
            the file in a hot folder's ``done/`` finds its row); ``None`` for a camera stream.
        model_id: the bundle that scored the frame.
        bank_hash: hash of the bundle's scorer state (memory bank or Gaussians).
        threshold: normalised threshold in force, ``None`` for errors before a decision.
        threshold_source: where it came from: ``bundle``, ``camera``, ``shift:<name>`` or ``operator``.
        raw_score: the scorer's raw image score.
        score: normalised score in [0, 1].
        verdict: ``ok``, ``ng`` or ``error``.
        error: what went wrong, for ``error`` verdicts.
        latency_ms: per stage (``queue``, ``preprocess``, ``backbone``, ``scorer``, ``total``, ...).
        overlay_path: where the overlay output writes this inspection's PNG, if it will (cleared in
            the audit log if the overlay was dropped or failed).
        image: the frame's pixels (not serialised); ``None`` when the frame could not be read.
        anomaly_map: lazily computed normalised map in frame pixels; ``None`` for errors.
        embedding: the frame's pooled backbone embedding ``[C]`` (the engine's tap for drift
            statistics; not serialised); ``None`` for errors.
        file_data: the image file's own bytes when the frame came from a file (what the frame store
            keeps, losslessly and without encoding again; not serialised).

    """

    id: str
    camera: str
    seq: int
    captured_at: float
    finished_at: float
    verdict: str
    trigger_id: str | None = None
    source: str | None = None
    image_sha256: str | None = None
    file_sha256: str | None = None
    model_id: str | None = None
    bank_hash: str | None = None
    threshold: float | None = None
    threshold_source: str | None = None
    raw_score: float | None = None
    score: float | None = None
    error: str | None = None
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    overlay_path: str | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    anomaly_map: LazyMap | None = field(default=None, repr=False, compare=False)
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)
    file_data: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if (self.verdict == ERROR) != (self.error is not None):
            raise ValueError("an error verdict needs an error message, and only an error verdict has one")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no pixels, no map): what the audit log and MQTT carry."""
        return {
            "id": self.id, "camera": self.camera, "seq": self.seq, "trigger_id": self.trigger_id,
            "captured_at": self.captured_at, "finished_at": self.finished_at, "source": self.source,
            "image_sha256": self.image_sha256, "file_sha256": self.file_sha256, "model_id": self.model_id,
            "bank_hash": self.bank_hash,
            "threshold": self.threshold, "threshold_source": self.threshold_source, "raw_score": self.raw_score,
            "score": self.score, "verdict": self.verdict, "error": self.error,
            "latency_ms": {k: round(float(v), 3) for k, v in self.latency_ms.items()},
            "overlay_path": self.overlay_path,
        }
