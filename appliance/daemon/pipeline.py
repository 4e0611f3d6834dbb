"""One camera's inspection pipeline; the daemon's data flow reads top to bottom here.

    capture thread  : source -> Captured item (frame or read error), trigger id attached
                      -> bounded queue: a live camera's oldest frame is dropped (an audited event);
                         a source that can wait (a hot folder, a trigger) waits for room instead
    inference thread: queue -> engine stream (backbone requests overlap scoring)
                      -> threshold for this frame (camera, shift, operator) -> decision
                      -> Inspection record, in capture order (errors included)
                      -> sink: audit row committed, then every output's own queue

Every frame taken from the queue gives exactly one inspection: scored, or an explicit error
(unreadable image, failed inference, no frame for a trigger). The engine is swapped between
two frames (``swap_engine``); a frame in flight finishes on the engine that took it.
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
from typing import Any, Protocol

from ..engine import Engine
from ..errors import ApplianceError
from ..preprocess import frame_pixel_limit
from ..types import Frame, Prediction
from .capture import CaptureLoop
from .config import Camera
from .health import Progress
from .records import ERROR, NG, OK, Inspection, LazyMap, new_inspection_id
from .sources import Captured
from .stats import CameraStats

log = logging.getLogger(__name__)

#: ``(camera, when) -> (threshold, source)`` in force for a frame captured at ``when``.
ThresholdFor = Callable[[str, float], tuple[float, str]]
#: Longest wait in one turn of a loop before it looks at its stop flag again, seconds.
_SLICE_S = 0.1


class Sink(Protocol):
    """Where a pipeline's results and events go (``results.ResultFlow``: audit first, then the outputs)."""

    def emit(self, record: Inspection, item: Captured | None) -> None:
        """Hand on a finished inspection (the item's ``done`` runs once its audit row is committed)."""

    def event(self, kind: str, camera: str | None = None, detail: str | None = None, data: Any = None) -> None:
        """Audit an event (a dropped frame, ...)."""


@dataclass
class _Job:
    """A queued item with what the pipeline knows about it."""

    item: Captured
    trigger_id: str | None
    captured_at: float
    queued_at: float  # monotonic
    order: int = 0  # taken from the queue as the order-th item: results go out in this order
    engine: Engine | None = None


def engine_identity(engine: Engine) -> tuple[str, str]:
    """``(model id, bank hash)``: the bank hash covers the scorer's stored arrays and what operators taught it."""
    if hasattr(engine, "bank_identity"):
        return engine.model_id, engine.bank_identity()
    files = (engine.manifest or {}).get("files", {})
    digests = sorted(rec["sha256"] for name, rec in files.items() if name.startswith("scorer/"))
    return engine.model_id, hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


class CameraPipeline:
    """Source -> queue -> engine -> decision -> sink, for one camera."""

    def __init__(self, camera: Camera, engine: Engine, *, threshold_for: ThresholdFor, sink: Sink,
                 on_state: Callable[[str, str, str], None], depth: int = 2) -> None:
        self.camera = camera
        self.engine = engine
        self._threshold_for = threshold_for
        self._sink = sink
        self._on_state = on_state
        self._depth = depth
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._draining = False
        self._next_engine: Engine | None = None
        self._in_engine: dict[int, _Job] = {}  # order -> job handed to the engine, result not back yet
        self._n = 0  # items taken from the queue
        self._emitted = 0  # results handed on, in order
        self._held: dict[int, tuple[Inspection, Captured]] = {}  # results that finished before an earlier one
        self._emit_lock = threading.Lock()
        self._stall = threading.Event()  # fault injection (tests): hold the inference thread
        self.stats = CameraStats(camera.id)
        self.enabled = True  # False (``enable`` command): triggers refused, free-run frames not inspected
        self.skipped_disabled = 0
        self.heartbeat = time.monotonic()  # stamped by every turn of the inference thread
        self.capture = CaptureLoop(camera.id, camera.source, mode="trigger" if camera.trigger.mode == "external"
                                   else "free_run", fps=camera.trigger.fps, deliver=self._captured,
                                   on_state=self._capture_state, trigger_timeout=camera.trigger.timeout_s)
        self._waits = self.capture.source.can_wait  # a hot folder waits for room; a live camera drops
        self._limit_pixels(engine)
        self._thread = threading.Thread(target=self._run, name=f"inspect-{camera.id}", daemon=True)

    # ------------------------------------------------------------ control (any thread)
    def start(self) -> None:
        """Start inference, then capture."""
        self._thread.start()
        self.capture.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop capture, inspect what is queued within ``timeout``, hand back the rest; True if the thread ended.

        What is still queued when the time is up is not inspected: a triggered frame gets an error
        result (the PLC waits for an answer), a live camera's frame is dropped (an audited event),
        and a hot-folder file stays in its inbox for the next start.
        """
        deadline = time.monotonic() + timeout
        self.capture.stop(min(timeout / 3, 3.0))
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        self._stall.clear()
        if self._thread.ident is not None:  # never started when the daemon's start-up failed
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            self._give_up(job, f"the daemon stopped before it was inspected (stop budget {timeout:g} s)")
        if self._thread.ident is None:
            return True
        self._thread.join(max(0.5, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error("camera %s: inference did not finish within %.0f s", self.camera.id, timeout)
            return False
        return True

    def trigger(self, trigger_id: str | None) -> bool:
        """Ask for one frame (external trigger mode); False if too many triggers are waiting."""
        return self.capture.trigger(trigger_id)

    def swap_engine(self, engine: Engine) -> None:
        """Use ``engine`` from the next frame on (frames in flight finish on the current one)."""
        self._limit_pixels(engine)
        with self._cond:
            self._next_engine = engine
            self._cond.notify_all()

    def set_enabled(self, enabled: bool) -> None:
        """Inspect (or not); a source that can wait waits while disabled instead of being skipped."""
        with self._cond:
            self.enabled = enabled
            self._cond.notify_all()

    def stall(self, seconds: float) -> None:
        """Fault injection for tests: hold the inference thread for ``seconds`` (the watchdog must notice)."""
        self._stall.set()
        timer = threading.Timer(seconds, self._stall.clear)
        timer.daemon = True
        timer.start()

    def queue_depth(self) -> int:
        """Items waiting for inference."""
        with self._cond:
            return len(self._queue)

    def _limit_pixels(self, engine: Engine) -> None:
        """The largest frame this camera decodes, from the bundle (or the camera's own setting)."""
        mp = self.camera.max_frame_megapixels
        self.capture.source.max_pixels = int(mp * 1e6) if mp else frame_pixel_limit(engine.spec)

    # ------------------------------------------------------------ capture thread
    def _captured(self, item: Captured, trigger_id: str | None) -> None:
        """Queue one item. A live camera's oldest frame makes room; a hot folder or a trigger waits for room."""
        waits = self._waits or trigger_id is not None
        if not waits and not self.enabled:
            self.skipped_disabled += 1
            return
        captured_at = item.frame.timestamp if item.frame is not None else time.time()
        dropped = None
        with self._cond:
            while waits and not self._draining and (len(self._queue) >= self.camera.queue or not self.enabled):
                self.capture.heartbeat = time.monotonic()  # waiting for room is progress, not a hang
                self._cond.wait(_SLICE_S)
            if self._draining and waits:
                stopping = True
            else:
                stopping = False
                if len(self._queue) >= self.camera.queue:
                    dropped = self._queue.popleft()
                self._queue.append(_Job(item, trigger_id, captured_at, time.monotonic()))
                self._cond.notify_all()
        if stopping:
            self._give_up(_Job(item, trigger_id, captured_at, time.monotonic()), "the daemon is stopping")
        if dropped is not None:
            self._give_up(dropped, f"the inference queue was full ({self.camera.queue} frames waiting)")

    def _give_up(self, job: _Job, reason: str) -> None:
        """A frame that will not be inspected: a trigger gets an error result, a camera frame an audited drop.

        A hot-folder file is left in its inbox (inspected after the next start), with no result.
        """
        if job.trigger_id is not None:
            self._emit_error(job, f"not inspected: {reason}")
            return
        if self._waits:
            return
        self.stats.dropped()
        frame = job.item.frame
        self._sink.event("frame_dropped", self.camera.id, f"frame dropped: {reason}",
                         {"source": job.item.source, "captured_at": job.captured_at,
                          "capture_seq": frame.seq if frame is not None else None, "reason": reason})

    def _capture_state(self, state: str, detail: str) -> None:
        self._on_state(self.camera.id, state, detail)

    # ------------------------------------------------------------ inference thread
    def _next_job(self) -> tuple[_Job | None, bool]:
        """``(job, end)``: the next queued job, ``(None, False)`` for "nothing now", ``(None, True)`` to end the stream.

        The stream ends to drain, or to swap engines once nothing of the old one is in flight.
        """
        with self._cond:
            if self._next_engine is not None:
                return None, not self._in_engine
            if self._queue:
                return self._queue.popleft(), False
            if self._draining:
                return None, True
            if not self._in_engine:
                self._cond.wait(_SLICE_S)
            return None, False

    def _frames(self) -> Iterator[Frame | None]:
        """Frames for the engine stream; error items become error results here, in order."""
        while True:
            self.heartbeat = time.monotonic()
            while self._stall.is_set() and not self._draining:
                time.sleep(0.05)  # a hung pipeline, on purpose: no heartbeat, no results
            job, end = self._next_job()
            if end:
                return
            if job is None:
                yield None
                continue
            self._n += 1
            job.order = self._n
            if job.item.frame is None:
                self._emit_error(job, job.item.error or "no image")
                continue
            job.engine = self.engine
            with self._cond:
                self._in_engine[self._n] = job
            yield dataclasses.replace(job.item.frame, seq=self._n)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._next_engine is not None and not self._in_engine:
                    self.engine, self._next_engine = self._next_engine, None
                if self._draining and not self._queue and not self._in_engine:
                    return
            try:
                stream = self.engine.predict_stream(self._frames(), threshold=self._threshold, on_error=self._failed,
                                                    depth=self._depth)
                for prediction in stream:
                    self._emit_prediction(self._take(prediction.frame.seq), prediction)
            except Exception as exc:  # a bug must not end inspection: report the frames, go on
                log.exception("camera %s: inference loop error", self.camera.id)
                with self._cond:
                    lost = [self._in_engine.pop(n) for n in sorted(self._in_engine)]
                for job in lost:
                    self._emit_error(job, f"internal error: {type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def _take(self, order: int) -> _Job:
        with self._cond:
            return self._in_engine.pop(order)

    def _threshold(self, frame: Frame) -> tuple[float, str]:
        with self._cond:
            job = self._in_engine[frame.seq]
        return self._threshold_for(self.camera.id, job.captured_at)

    def _failed(self, frame: Frame, exc: ApplianceError) -> None:
        self._emit_error(self._take(frame.seq), str(exc))

    # ------------------------------------------------------------ results
    def _emit_prediction(self, job: _Job, pred: Prediction) -> None:
        engine = job.engine or self.engine
        model_id, bank_hash = engine_identity(engine)
        finished = time.time()
        d = pred.decision
        image = pred.frame.image
        latency = {k: v for k, v in pred.timings_ms.items() if k != "total"}
        latency |= {"queue": (time.monotonic() - job.queued_at) * 1e3 - pred.timings_ms.get("total", 0.0),
                    "engine": pred.timings_ms.get("total", 0.0), "total": (finished - job.captured_at) * 1e3}
        score = pred.score
        record = Inspection(
            id=new_inspection_id(finished), camera=self.camera.id, seq=pred.frame.seq, trigger_id=job.trigger_id,
            captured_at=job.captured_at, finished_at=finished, source=pred.frame.source,
            image_sha256=hashlib.sha256(image.data if image.flags.c_contiguous else image.tobytes()).hexdigest(),
            file_sha256=job.item.file_sha256, model_id=model_id, bank_hash=bank_hash, threshold=d.threshold,
            threshold_source=d.threshold_source, raw_score=float(score.image_score), score=float(d.score),
            verdict=NG if d.anomalous else OK, latency_ms=latency, image=image, embedding=pred.score.embedding,
            file_data=job.item.data,
            anomaly_map=LazyMap(lambda: engine.anomaly_map(score, frame_shape=image.shape[:2], match_peak=True)))
        self._finish(record, job)

    def _emit_error(self, job: _Job, reason: str) -> None:
        finished = time.time()
        frame = job.item.frame
        model_id, bank_hash = engine_identity(self.engine)
        record = Inspection(
            id=new_inspection_id(finished), camera=self.camera.id, seq=job.order, trigger_id=job.trigger_id,
            captured_at=job.captured_at, finished_at=finished,
            source=(frame.source if frame is not None else None) or job.item.source,
            file_sha256=job.item.file_sha256, model_id=model_id, bank_hash=bank_hash, verdict=ERROR, error=reason,
            latency_ms={"total": (finished - job.captured_at) * 1e3}, image=frame.image if frame is not None else None,
            file_data=job.item.data)
        self._finish(record, job)

    def _finish(self, record: Inspection, job: _Job) -> None:
        """Hand results on in the order their items left the queue (an error may finish before a scored frame)."""
        with self._emit_lock:
            self.stats.add(record)
            if not job.order:  # given up before it was taken for inference: it has no place in the order
                self._sink.emit(record, job.item)
                return
            self._held[job.order] = (record, job.item)
            while self._emitted + 1 in self._held:
                self._emitted += 1
                self._sink.emit(*self._held.pop(self._emitted))

    # ------------------------------------------------------------ status
    def progress(self) -> Progress:
        """What the health check needs: are the threads turning, and how long has the oldest frame waited."""
        with self._cond:
            waiting = [j.queued_at for j in self._queue] + [j.queued_at for j in self._in_engine.values()]
        return Progress(self._thread.is_alive(), self.heartbeat, self.capture.alive, self.capture.heartbeat,
                        min(waiting) if waiting else None)

    def status(self) -> dict[str, Any]:
        """The camera's counters and state (the daemon adds health, threshold and readiness)."""
        model_id, bank_hash = engine_identity(self.engine)
        with self._cond:
            in_engine = len(self._in_engine)
        return {**self.stats.snapshot(), "state": self.capture.state, "state_detail": self.capture.state_detail,
                "queue_depth": self.queue_depth(), "in_engine": in_engine, "trigger": self.camera.trigger.mode,
                "source": self.capture.source.describe(), "reconnects": self.capture.reconnects,
                "trigger_overruns": self.capture.trigger_overruns, "enabled": self.enabled,
                "skipped_disabled": self.skipped_disabled,
                "bundle": {"model_id": model_id, "bank_hash": bank_hash,
                           "path": str(self.engine.bundle_path) if self.engine.bundle_path else None}}
