"""The drift watch of each camera: recent frames against the bundle's calibration baseline, on a cadence.

Every scored frame's pooled embedding and raw score (the engine's tap: ``Score.embedding``) join
its camera's current window (a uniform sample of at most ``max_frames``). Every ``cadence_s``
seconds, once the window holds ``min_frames``, it is tested against the bundle's baseline
(``appliance.drift.window_test``: a KS test on the scores and an MMD permutation test on the
PCA-reduced embedding, with p-values, one decision at level ``alpha``) and the hysteresis
(``drift.step``) raises the alarm after ``raise_after`` significant windows in a row and clears it
after ``clear_after`` clean ones.

A drift is evidence, not an order: nothing here changes the model. ``DriftLog`` makes a raised drift
an audit event with the window's statistics and sends the window's frames (a sample of
``keep_frames``) to the frame store, so an operator (or the trainer's gate) can decide whether the
line moved or broke. Every window is an audit event too (``drift_window``), the history
``appliance drift`` shows.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..drift import DEFAULT_ALPHA, DriftBaseline, DriftState, WindowResult, step, window_test
from ..errors import ApplianceError
from .records import ERROR, Inspection

log = logging.getLogger(__name__)


class DriftConfig(BaseModel):
    """The ``[drift]`` section: how often and how strictly each camera's frames are compared with the baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="watch every camera whose bundle has a drift baseline")
    cadence_s: float = Field(900.0, gt=0, description="seconds between two tests of a camera's window")
    min_frames: int = Field(100, ge=50, description="a window is tested only once it holds this many frames")
    max_frames: int = Field(2000, ge=50, description="frames kept per window (a uniform sample of the window)")
    alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=0.5, description="false-alarm level of one window's test")
    raise_after: int = Field(2, ge=1, description="significant windows in a row that raise the alarm")
    clear_after: int = Field(2, ge=1, description="clean windows in a row that clear it")
    keep_frames: int = Field(20, ge=0, le=500, description="frames of a drifted window sent to the frame store")


@dataclass
class _Window:
    """One camera's frames since its last test: a uniform reservoir of embeddings and scores, and of records."""

    started: float
    seen: int = 0
    embeddings: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    keep: list[Inspection] = field(default_factory=list)
    keep_seen: int = 0


@dataclass
class CameraDrift:
    """What the watch knows of one camera."""

    baseline: DriftBaseline | None
    model_id: str | None
    window: _Window
    state: DriftState = field(default_factory=DriftState)
    last_at: float | None = None


#: ``on_window(camera, result, state, kept records)``: after every test (the daemon audits and reports).
OnWindow = Callable[[str, WindowResult, DriftState, list[Inspection]], None]


class DriftWatch:
    """Per camera: collect frames, test on the cadence, keep the hysteresis state (thread-safe)."""

    def __init__(self, config: DriftConfig, on_window: OnWindow, seed: int = 0) -> None:
        self.config = config
        self._on_window = on_window
        self._lock = threading.Lock()
        self._cameras: dict[str, CameraDrift] = {}
        self._rng = random.Random(seed)

    def watch(self, camera: str, baseline: DriftBaseline | None, model_id: str | None) -> None:
        """Watch ``camera`` against ``baseline`` (a new model: the window and the alarm start again)."""
        with self._lock:
            current = self._cameras.get(camera)
            if current is not None and current.model_id == model_id:
                return
            self._cameras[camera] = CameraDrift(baseline, model_id, _Window(time.time()))

    def observe(self, record: Inspection) -> None:
        """One scored frame joins its camera's window (errors and frames without an embedding do not)."""
        if not self.config.enabled or record.verdict == ERROR or record.embedding is None or record.raw_score is None:
            return
        with self._lock:
            cam = self._cameras.get(record.camera)
            if cam is None or cam.baseline is None or record.model_id != cam.model_id:
                return
            w = cam.window
            w.seen += 1
            if len(w.scores) < self.config.max_frames:
                w.embeddings.append(record.embedding)
                w.scores.append(float(record.raw_score))
            else:  # reservoir sampling: every frame of the window equally likely to be kept
                j = self._rng.randrange(w.seen)
                if j < self.config.max_frames:
                    w.embeddings[j], w.scores[j] = record.embedding, float(record.raw_score)
            if self.config.keep_frames:
                w.keep_seen += 1
                if len(w.keep) < self.config.keep_frames:
                    w.keep.append(record)
                else:
                    j = self._rng.randrange(w.keep_seen)
                    if j < self.config.keep_frames:
                        w.keep[j] = record

    def due(self, now: float | None = None) -> list[str]:
        """Cameras whose window is due for a test (cadence passed and enough frames)."""
        now = time.time() if now is None else now
        with self._lock:
            return [c for c, d in self._cameras.items()
                    if d.baseline is not None and now - d.window.started >= self.config.cadence_s
                    and len(d.window.scores) >= self.config.min_frames]

    def test(self, camera: str, now: float | None = None) -> WindowResult | None:
        """Test the camera's window now, start a new one, step the alarm, report; ``None`` if nothing to test."""
        now = time.time() if now is None else now
        with self._lock:
            cam = self._cameras.get(camera)
            if cam is None or cam.baseline is None or len(cam.window.scores) < self.config.min_frames:
                return None
            window, cam.window = cam.window, _Window(now)
            baseline = cam.baseline
        result = window_test(baseline, np.stack(window.embeddings), np.asarray(window.scores), self.config.alpha,
                             min_window=min(self.config.min_frames, len(window.scores)))
        with self._lock:
            cam.state = step(cam.state, result, self.config.raise_after, self.config.clear_after, at=now)
            cam.last_at = now
            state = cam.state
        try:
            self._on_window(camera, result, state, window.keep)
        except Exception:  # reporting must not stop the watch
            log.exception("drift: reporting camera %s's window failed", camera)
        return result

    def snapshot(self, camera: str) -> dict[str, Any]:
        """The camera's drift state for status: ``off``, ``no_baseline``, ``collecting``, ``ok`` or ``drift``."""
        with self._lock:
            cam = self._cameras.get(camera)
            if not self.config.enabled or cam is None:
                return {"state": "off"}
            if cam.baseline is None:
                return {"state": "no_baseline", "detail": "the bundle has no drift baseline (refit it to watch drift)"}
            s, w = cam.state, cam.window
            last = s.last
            out: dict[str, Any] = {
                "state": "drift" if s.raised else ("collecting" if s.windows == 0 else "ok"),
                "windows": s.windows, "since": s.since_time, "frames_in_window": len(w.scores),
                "window_started": w.started, "next_test_in_s": max(0.0, round(self.config.cadence_s - (
                    time.time() - w.started), 1)), "last_test_at": cam.last_at}
            if last is not None:
                out["last"] = {"p_value": last.p_value, "significant": last.significant, "score_p": last.score_p,
                               "embedding_p": last.embedding_p, "score_shift": last.score_shift,
                               "component": last.component, "component_shift": last.component_shift,
                               "size": last.size}
            return out


class DriftLog:
    """What the watch finds, for people: every window audited, a raised drift with its frames kept, the history."""

    def __init__(self, watch: DriftWatch, recorder: Any, frames: Any, config: DriftConfig) -> None:
        self.watch = watch
        self.recorder = recorder
        self.frames = frames  # the frames output (``FramesPublisher``), or ``None``
        self.config = config

    def window(self, camera: str, result: WindowResult, state: DriftState, keep: list[Inspection]) -> None:
        """After a window's test: audit it; on a raised or cleared drift, an event (and the frames to the store)."""
        stats = {"p_value": result.p_value, "score_p": result.score_p, "embedding_p": result.embedding_p,
                 "score_shift": round(result.score_shift, 5), "component": result.component,
                 "component_shift": round(result.component_shift, 3), "size": result.size,
                 "significant": result.significant, "alpha": result.alpha, "cpu_ms": round(result.cpu_ms, 2),
                 "raised": state.raised}
        self.recorder.event("drift_window", camera, f"drift window of {result.size} frames: p {result.p_value:.3g} "
                            f"({'significant' if result.significant else 'clean'})", stats)
        if not state.changed:
            return
        if not state.raised:
            self.recorder.event("drift_cleared", camera, f"drift cleared after {self.config.clear_after} clean "
                                "windows", stats)
            log.info("camera %s: drift cleared", camera, extra={"camera": camera})
            return
        stored = []
        for rec in keep if self.frames is not None else []:
            try:
                kept = self.frames.store(rec, "drift")
            except ApplianceError as exc:
                log.warning("drift: frame of %s not kept: %s", rec.id, exc)
                continue
            if kept is not None:
                stored.append({"inspection_id": rec.id, "frame": kept.path})
        # window_from: the raising window's first frame, where the new normal begins if a person accepts it
        first = min((rec.captured_at for rec in keep), default=None)
        self.recorder.event("drift_raised", camera, f"drift raised after {self.config.raise_after} significant "
                            f"windows: scores shifted {result.score_shift:+.3g}, component {result.component} by "
                            f"{result.component_shift:+.2f} sd (p {result.p_value:.3g})",
                            stats | {"frames": stored, "window_from": first})
        log.warning("camera %s: drift raised (p %.3g)", camera, result.p_value, extra={"camera": camera})

    def report(self, cameras: list[str]) -> dict[str, Any]:
        """Per camera: the drift state now and the last 50 windows and alarms (``appliance drift``)."""
        out = {}
        for cam in cameras:
            history = self.recorder.read("SELECT at, kind, detail, data FROM events WHERE camera = ? AND kind IN "
                                         "('drift_window', 'drift_raised', 'drift_cleared') ORDER BY id DESC LIMIT 50",
                                         [cam])
            out[cam] = {**self.watch.snapshot(cam), "history": [
                {"at": h["at"], "kind": h["kind"], "detail": h["detail"], **json.loads(h["data"] or "{}")}
                for h in reversed(history)]}
        return out
