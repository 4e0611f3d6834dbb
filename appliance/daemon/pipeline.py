"""One camera's inspection pipeline; the daemon's data flow reads top to bottom here.

    capture thread  : source -> Captured item (frame or read error), trigger id attached
                      -> bounded queue (drops the oldest free-run frame, counts it)
    inference thread: queue -> engine stream (backbone requests overlap scoring)
                      -> threshold for this frame (camera, shift, operator) -> decision
                      -> Inspection record, in capture order (errors included)
                      -> audit row committed -> every output's own queue

Every frame taken from the queue gives exactly one inspection: scored, or an explicit error
(unreadable image, failed inference, no frame for a trigger). A triggered frame is never
dropped silently: if the queue is full it becomes an error result. The engine is swapped
between two frames (``swap_engine``); a frame in flight finishes on the engine that took it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from ..errors import ApplianceError
from ..types import Frame, Prediction
from .capture import CaptureLoop
from .config import Camera
from .records import ERROR, NG, OK, Inspection, LazyMap, new_inspection_id
from .sources import Captured
from .stats import CameraStats

log = logging.getLogger(__name__)

#: ``(camera, captured_at, verdict, inspection_id) -> overlay path or None``, decided before the audit row.
PlanOverlay = Callable[[str, float, str, str], str | None]
#: ``(camera, when) -> (threshold, source)`` in force for a frame captured at ``when``.
ThresholdFor = Callable[[str, float], tuple[float, str]]
#: Hands a finished inspection on: audit first, then the outputs (``Daemon.emit``).
Emit = Callable[[Inspection, Captured | None], None]
_IDLE_WAIT_S = 0.1


@dataclass
class _Job:
    """A queued item with what the pipeline knows about it."""

    item: Captured
    trigger_id: str | None
    captured_at: float
    queued_at: float
    order: int = 0  # taken from the queue as the order-th item: results go out in this order
    engine: Engine | None = None


def engine_identity(engine: Engine) -> tuple[str, str]:
    """``(model id, bank hash)``: the bank hash is over the scorer's stored arrays (memory bank or Gaussians)."""
    files = (engine.manifest or {}).get("files", {})
    digests = sorted(rec["sha256"] for name, rec in files.items() if name.startswith("scorer/"))
    return engine.model_id, hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


class CameraPipeline:
    """Source -> queue -> engine -> decision -> audit -> outputs, for one camera."""

    def __init__(self, camera: Camera, engine: Engine, *, threshold_for: ThresholdFor, plan_overlay: PlanOverlay,
                 emit: Emit, on_state: Callable[[str, str, str], None], depth: int = 2) -> None:
        self.camera = camera
        self.engine = engine
        self._identity = engine_identity(engine)
        self._threshold_for = threshold_for
        self._plan_overlay = plan_overlay
        self._emit = emit
        self._on_state = on_state
        self._depth = depth
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._draining = False
        self._next_engine: Engine | None = None
        self._in_engine = 0  # frames handed to the engine whose results have not come back
        self._jobs: dict[int, _Job] = {}
        self._n = 0  # items taken from the queue
        self._emitted = 0  # results handed on, in order
        self._held: dict[int, tuple[Inspection, Captured]] = {}  # results that finished before an earlier one
        self._emit_lock = threading.Lock()
        self._stall = threading.Event()  # fault injection (tests): hold the inference thread
        self.stats = CameraStats(camera.id)
        self.enabled = True  # False (``enable`` command): triggers refused, free-run frames not inspected
        self.skipped_disabled = 0
        self.heartbeat = time.monotonic()  # stamped by every turn of the inference thread
        self.last_result_at = time.monotonic()
        self.capture = CaptureLoop(camera.id, camera.source, mode="trigger" if camera.trigger.mode == "external"
                                   else "free_run", fps=camera.trigger.fps, deliver=self._captured,
                                   on_state=self._capture_state, trigger_timeout=camera.trigger.timeout_s)
        self._thread = threading.Thread(target=self._run, name=f"inspect-{camera.id}", daemon=True)

    # ------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        """Start inference, then capture."""
        self._thread.start()
        self.capture.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop capture, inspect what is queued (within ``timeout``), then end the inference thread."""
        self.capture.stop(min(timeout, 3.0))
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        self._stall.clear()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("camera %s: inference did not finish within %.0f s", self.camera.id, timeout)

    def trigger(self, trigger_id: str | None) -> bool:
        """Ask for one frame (external trigger mode); False if too many triggers are waiting."""
        return self.capture.trigger(trigger_id)

    def swap_engine(self, engine: Engine) -> None:
        """Use ``engine`` from the next frame on (frames in flight finish on the current one)."""
        with self._cond:
            self._next_engine = engine
            self._cond.notify_all()

    def stall(self, seconds: float) -> None:
        """Fault injection for tests: hold the inference thread for ``seconds`` (the watchdog must notice)."""
        self._stall.set()
        threading.Timer(seconds, self._stall.clear).start()

    def queue_depth(self) -> int:
        """Items waiting for inference."""
        with self._cond:
            return len(self._queue)

    def busy(self) -> bool:
        """True when items wait or are being inspected."""
        with self._cond:
            return bool(self._queue) or self._in_engine > 0

    # ------------------------------------------------------------ capture thread
    def _captured(self, item: Captured, trigger_id: str | None) -> None:
        if not self.enabled and trigger_id is None:  # a hot-folder file stays handed out until a restart
            self.skipped_disabled += 1
            return
        now = time.time()
        captured_at = item.frame.timestamp if item.frame is not None else now
        job = _Job(item, trigger_id, captured_at, time.monotonic())
        dropped = None
        with self._cond:
            if len(self._queue) >= self.camera.queue:
                dropped = self._queue.popleft()
            self._queue.append(job)
            self._cond.notify_all()
        if dropped is not None:
            self._drop(dropped)

    def _drop(self, job: _Job) -> None:
        """A full queue: a free-run frame is counted and dropped; a triggered one becomes an error result."""
        self.stats.dropped()
        if job.trigger_id is not None:
            self._emit_error(job, f"dropped: the inference queue was full ({self.camera.queue} frames waiting)")
        elif job.item.done is not None:
            job.item.done(False)

    def _capture_state(self, state: str, detail: str) -> None:
        self._on_state(self.camera.id, state, detail)

    # ------------------------------------------------------------ inference thread
    def _frames(self) -> Iterator[Frame | None]:
        """Frames for the engine stream; error items become error results here, in order."""
        while True:
            self.heartbeat = time.monotonic()
            while self._stall.is_set() and not self._draining:
                time.sleep(0.05)  # a hung pipeline, on purpose: no heartbeat, no results
            with self._cond:
                if not self._queue:
                    if self._draining or self._next_engine is not None:
                        return
                    if self._in_engine:
                        yield_none = True
                    else:
                        self._cond.wait(_IDLE_WAIT_S)
                        yield_none = True
                    job = None
                else:
                    if self._next_engine is not None and not self._in_engine:
                        return  # swap now: nothing of the old engine in flight
                    if self._next_engine is not None:
                        job, yield_none = None, True  # let the old engine's frames finish first
                    else:
                        job, yield_none = self._queue.popleft(), False
            if job is None:
                if yield_none:
                    yield None
                continue
            self._n += 1
            job.order = self._n
            if job.item.frame is None:
                self._emit_error(job, job.item.error or "no image")
                continue
            frame = dataclasses.replace(job.item.frame, seq=self._n)
            job.engine = self.engine
            self._jobs[self._n] = job
            with self._cond:
                self._in_engine += 1
            yield frame

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._next_engine is not None:
                    self.engine, self._next_engine = self._next_engine, None
                    self._identity = engine_identity(self.engine)
                if self._draining and not self._queue:
                    break
            try:
                stream = self.engine.predict_stream(self._frames(), threshold=self._threshold, on_error=self._failed,
                                                    depth=self._depth)
                for prediction in stream:
                    self._done_in_engine()
                    self._emit_prediction(prediction)
            except Exception as exc:  # a bug must not end inspection: report the frames, go on
                log.exception("camera %s: inference loop error", self.camera.id)
                for n in sorted(self._jobs):
                    self._done_in_engine()
                    self._emit_error(self._jobs.pop(n), f"internal error: {type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def _threshold(self, frame: Frame) -> tuple[float, str]:
        return self._threshold_for(self.camera.id, self._jobs[frame.seq].captured_at)

    def _done_in_engine(self) -> None:
        with self._cond:
            self._in_engine -= 1

    def _failed(self, frame: Frame, exc: ApplianceError) -> None:
        self._done_in_engine()
        self._emit_error(self._jobs.pop(frame.seq), str(exc))

    # ------------------------------------------------------------ results
    def _emit_prediction(self, pred: Prediction) -> None:
        job = self._jobs.pop(pred.frame.seq)
        engine = job.engine or self.engine
        model_id, bank_hash = engine_identity(engine) if engine is not self.engine else self._identity
        finished = time.time()
        d = pred.decision
        verdict = NG if d.anomalous else OK
        inspection_id = new_inspection_id(finished)
        image = pred.frame.image
        latency = {k: v for k, v in pred.timings_ms.items() if k != "total"}
        latency |= {"queue": (time.monotonic() - job.queued_at) * 1e3 - pred.timings_ms.get("total", 0.0),
                    "engine": pred.timings_ms.get("total", 0.0), "total": (finished - job.captured_at) * 1e3}
        score = pred.score
        record = Inspection(
            id=inspection_id, camera=self.camera.id, seq=pred.frame.seq, trigger_id=job.trigger_id,
            captured_at=job.captured_at, finished_at=finished, source=pred.frame.source,
            image_sha256=hashlib.sha256(image.data if image.flags.c_contiguous else image.tobytes()).hexdigest(),
            model_id=model_id, bank_hash=bank_hash, threshold=d.threshold, threshold_source=d.threshold_source,
            raw_score=float(score.image_score), score=float(d.score), verdict=verdict, latency_ms=latency,
            overlay_path=self._plan(job, verdict, inspection_id), image=image,
            anomaly_map=LazyMap(lambda: engine.anomaly_map(score, frame_shape=image.shape[:2], match_peak=True)))
        self._finish(record, job)

    def _emit_error(self, job: _Job, reason: str) -> None:
        finished = time.time()
        inspection_id = new_inspection_id(finished)
        frame = job.item.frame
        image = frame.image if frame is not None else None
        model_id, bank_hash = self._identity
        record = Inspection(
            id=inspection_id, camera=self.camera.id, seq=job.order,
            trigger_id=job.trigger_id, captured_at=job.captured_at, finished_at=finished,
            source=(frame.source if frame is not None else None) or job.item.source, model_id=model_id,
            bank_hash=bank_hash, verdict=ERROR, error=reason,
            latency_ms={"total": (finished - job.captured_at) * 1e3},
            overlay_path=self._plan(job, ERROR, inspection_id), image=image)
        self._finish(record, job)

    def _plan(self, job: _Job, verdict: str, inspection_id: str) -> str | None:
        try:
            return self._plan_overlay(self.camera.id, job.captured_at, verdict, inspection_id)
        except ApplianceError as exc:
            log.error("camera %s: no overlay path: %s", self.camera.id, exc)
            return None

    def _finish(self, record: Inspection, job: _Job) -> None:
        """Hand results on in the order their items left the queue (an error may finish before a scored frame)."""
        with self._emit_lock:
            self.last_result_at = time.monotonic()
            self.stats.add(record)
            if not job.order:  # dropped before it was queued for inference: it has no place in the order
                self._emit(record, job.item)
                return
            self._held[job.order] = (record, job.item)
            while self._emitted + 1 in self._held:
                self._emitted += 1
                self._emit(*self._held.pop(self._emitted))

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """The camera's part of the daemon's status snapshot."""
        model_id, bank_hash = self._identity
        return {**self.stats.snapshot(), "state": self.capture.state, "state_detail": self.capture.state_detail,
                "queue_depth": self.queue_depth(), "in_engine": self._in_engine, "trigger": self.camera.trigger.mode,
                "source": self.capture.source.describe(), "reconnects": self.capture.reconnects,
                "trigger_overruns": self.capture.trigger_overruns, "enabled": self.enabled,
                "skipped_disabled": self.skipped_disabled,
                "bundle": {"model_id": model_id, "bank_hash": bank_hash,
                           "path": str(self.engine.bundle_path) if self.engine.bundle_path else None}}

    def stalled(self, limit_s: float) -> str | None:
        """Why this camera counts as hung, or ``None``: a thread stopped turning, or work waits with no result."""
        now = time.monotonic()
        if not self._thread.is_alive():
            return "inference thread ended"
        if now - self.heartbeat > limit_s:
            return f"inference loop silent for {now - self.heartbeat:.0f} s"
        if self.capture.alive and now - self.capture.heartbeat > limit_s:
            return f"capture loop silent for {now - self.capture.heartbeat:.0f} s"
        if self.busy() and now - self.last_result_at > limit_s:
            return f"frames waiting, no result for {now - self.last_result_at:.0f} s"
        return None
