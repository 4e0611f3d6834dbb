"""The capture loop: one thread per camera that owns its source and hands every item to the pipeline.

It keeps the camera alive for months: a source that cannot be opened or goes away is closed,
reported as ``lost`` and reopened with exponential backoff; any unexpected exception in a source
is treated the same way, never propagated. In trigger mode every trigger produces exactly one
item, a frame or an error (no image in time, camera lost, capture stopping): a PLC waiting for
a verdict must get one, and it must never read silence as OK.

States reported through ``on_state(state, detail)``: ``connecting`` (first open), ``running``,
``lost`` (with the reason; retried), ``ended`` (a finite source is exhausted; triggers still get
error answers) and ``stopped``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Literal

from ..errors import ConfigError, SourceError
from .sources import SOURCES, Captured, SourceConfig, create_source
from .sources.base import EndOfStream

log = logging.getLogger(__name__)

#: Longest a wait inside the loop lasts before it looks at the stop flag again, seconds.
SLICE_S = 0.1

Mode = Literal["free_run", "trigger"]


class CaptureLoop:
    """Reads one camera's source in its own thread and delivers stamped items.

    Args:
        camera: camera id, stamped on every frame.
        config: the camera's validated source config.
        mode: ``free_run`` reads continuously; ``trigger`` reads one item per ``trigger()``.
        fps: free run only: at most this many items per second (``None``: as fast as the source gives).
        deliver: called in the capture thread with each item and its trigger id; must not block
            (the pipeline puts it on a bounded queue).
        on_state: called in the capture thread on each state change with ``(state, detail)``.
        backoff_initial: first wait before reopening a lost source, seconds; doubles up to ``backoff_max``.
        backoff_max: longest wait between reopening attempts, seconds.
        trigger_timeout: a trigger with no item after this many seconds gets an error item.
        trigger_queue: triggers that may wait; more are refused and counted as overruns.

    """

    def __init__(
        self,
        camera: str,
        config: SourceConfig,
        *,
        mode: Mode = "free_run",
        fps: float | None = None,
        deliver: Callable[[Captured, str | None], None],
        on_state: Callable[[str, str], None],
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        trigger_timeout: float = 5.0,
        trigger_queue: int = 16,
    ) -> None:
        if config.type not in SOURCES:
            raise ConfigError(
                f"camera {camera!r}: unknown source type {config.type!r}; use one of {', '.join(sorted(SOURCES))}"
            )
        if mode not in ("free_run", "trigger"):
            raise ConfigError(f"camera {camera!r}: mode must be 'free_run' or 'trigger', not {mode!r}")
        if fps is not None and fps <= 0:
            raise ConfigError(f"camera {camera!r}: fps must be positive (or unset for as fast as possible)")
        if not 0 < backoff_initial <= backoff_max:
            raise ConfigError(f"camera {camera!r}: need 0 < backoff_initial <= backoff_max")
        if trigger_timeout <= 0 or trigger_queue < 1:
            raise ConfigError(f"camera {camera!r}: trigger_timeout must be positive and trigger_queue at least 1")
        self.camera = camera
        self.mode: Mode = mode
        self.fps = fps
        self.source = create_source(config, camera)
        self._deliver_cb = deliver
        self._on_state = on_state
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._trigger_timeout = trigger_timeout
        self._triggers: queue.Queue[str | None] = queue.Queue(maxsize=trigger_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._delay = backoff_initial
        self._seq = 0
        self.heartbeat = time.monotonic()  # stamped by every turn of the capture thread (the watchdog reads it)
        self.frames = 0  # frames delivered
        self.errors = 0  # error items delivered (unreadable items, unanswered or failed triggers)
        self.trigger_overruns = 0  # triggers refused because too many were waiting
        self.reconnects = 0  # successful reopenings after a loss
        self.state = "stopped"
        self.state_detail = "not started"

    # -- control (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        """Start the capture thread."""
        if self._thread is not None:
            raise RuntimeError(f"capture loop of camera {self.camera!r} was already started")
        self._thread = threading.Thread(target=self._run, name=f"capture-{self.camera}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread and close the source; True if it finished within ``timeout`` seconds.

        Prompt (about ``SLICE_S``) except while a source blocks inside a read (OpenCV on a
        camera that hangs); the thread is a daemon thread, so it never holds up the process exit.
        """
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def trigger(self, trigger_id: str | None = None) -> bool:
        """Ask for one item, delivered with ``trigger_id``; False (and an overrun counted) if the queue is full.

        Raises:
            ConfigError: the camera runs free (triggers need ``mode = "trigger"``).

        """
        if self.mode != "trigger":
            raise ConfigError(f"camera {self.camera!r} runs free; set its mode to 'trigger' to take images on triggers")
        if self._stop.is_set():
            return False
        try:
            self._triggers.put_nowait(trigger_id)
        except queue.Full:
            with self._lock:
                self.trigger_overruns += 1
            return False
        return True

    @property
    def alive(self) -> bool:
        """True while the capture thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- the capture thread ---------------------------------------------------------------------

    def _run(self) -> None:
        opened_before = False
        final_detail = ""
        self._set_state("connecting", self.source.describe())
        try:
            while not self._stop.is_set():
                try:
                    self.source.open()
                except Exception as exc:  # any failure of a source is a loss, never a crash
                    self._lose(exc)
                    continue
                if opened_before:
                    self.reconnects += 1
                opened_before = True
                self._set_state("running", self.source.describe())
                try:
                    self._serve()
                except EndOfStream as exc:
                    self._close()
                    reason = str(exc) or "the source has no more items"
                    self._set_state("ended", reason)
                    while not self._stop.is_set():
                        self._wait(SLICE_S, answer=f"source ended: {reason}")
                except Exception as exc:
                    self._lose(exc)
        except Exception as exc:  # a bug in the loop itself: say so loudly, still answer triggers and report
            log.exception("capture loop of camera %r crashed", self.camera)
            final_detail = f"capture loop crashed: {exc!r}"
        finally:
            self._close()
            self._answer_pending("capture stopped before an image was taken")
            self._set_state("stopped", final_detail)

    def _serve(self) -> None:
        """Read until stopped; a source failure propagates to ``_run``."""
        if self.mode == "trigger":
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    trigger_id = self._triggers.get(timeout=SLICE_S)
                except queue.Empty:
                    continue
                self._serve_trigger(trigger_id)
            return
        period = 1.0 / self.fps if self.fps else 0.0
        due = time.monotonic()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            wait = due - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, SLICE_S))
                continue
            item = self.source.read(SLICE_S)
            self._delay = self._backoff_initial  # the source works
            if item is None:
                continue
            self._deliver(item, None)
            due = max(due + period, time.monotonic()) if period else due

    def _serve_trigger(self, trigger_id: str | None) -> None:
        """Read one item for a trigger; whatever happens, deliver exactly one item for it."""
        deadline = time.monotonic() + self._trigger_timeout
        while True:
            if self._stop.is_set():
                self._deliver_error(trigger_id, "capture stopped before an image was taken")
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._deliver_error(trigger_id, f"no image within {self._trigger_timeout:g} s of the trigger")
                return
            try:
                item = self.source.read(min(remaining, SLICE_S))
            except EndOfStream as exc:
                self._deliver_error(trigger_id, f"source ended: {exc}")
                raise
            except Exception as exc:
                self._deliver_error(trigger_id, f"camera lost: {self._reason(exc)}")
                raise
            self._delay = self._backoff_initial
            if item is not None:
                self._deliver(item, trigger_id)
                return

    def _lose(self, exc: BaseException) -> None:
        """Close the source, report it lost and wait (answering triggers with errors) before the next try."""
        reason = self._reason(exc)
        self._close()
        self._set_state("lost", reason)
        delay = self._delay * random.uniform(1.0, 1.1)  # jitter: cameras on one switch do not retry in step
        self._delay = min(self._delay * 2, self._backoff_max)
        log.debug("camera %r: reopening %s in %.2f s", self.camera, self.source.describe(), delay)
        self._wait(delay, answer=f"camera lost: {reason}")

    def _wait(self, seconds: float, answer: str) -> None:
        """Sleep up to ``seconds`` (less if stopped); in trigger mode, answer triggers that come with ``answer``."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.mode != "trigger":
                self._stop.wait(min(remaining, SLICE_S))
                continue
            try:
                trigger_id = self._triggers.get(timeout=min(remaining, SLICE_S))
            except queue.Empty:
                continue
            self._deliver_error(trigger_id, answer)

    def _answer_pending(self, reason: str) -> None:
        while True:
            try:
                trigger_id = self._triggers.get_nowait()
            except queue.Empty:
                return
            self._deliver_error(trigger_id, reason)

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, SourceError):
            return str(exc)
        log.error("camera %r: unexpected error in %s", self.camera, self.source.describe(), exc_info=exc)
        return f"unexpected {type(exc).__name__} in {self.source.describe()}: {exc}"

    def _close(self) -> None:
        try:
            self.source.close()
        except Exception:  # close must not raise; if it does, the loop still goes on
            log.exception("camera %r: closing %s failed", self.camera, self.source.describe())

    def _deliver(self, item: Captured, trigger_id: str | None) -> None:
        """Stamp a frame with the camera, its sequence number and capture time; hand it over."""
        if item.frame is not None:
            self._seq += 1
            frame = dataclasses.replace(item.frame, camera=self.camera, seq=self._seq, timestamp=time.time())
            item = dataclasses.replace(item, frame=frame)
            self.frames += 1
        else:
            self.errors += 1
        try:
            self._deliver_cb(item, trigger_id)
        except Exception:  # a failing consumer must not take the camera down
            log.exception("camera %r: delivering an item failed", self.camera)

    def _deliver_error(self, trigger_id: str | None, reason: str) -> None:
        self._deliver(Captured(None, error=reason, source=self.source.describe()), trigger_id)

    def _set_state(self, state: str, detail: str) -> None:
        if (state, detail) == (self.state, self.state_detail):
            return
        self.state, self.state_detail = state, detail
        level = logging.WARNING if state == "lost" else logging.INFO
        log.log(level, "camera %r: %s%s", self.camera, state, f" ({detail})" if detail else "")
        try:
            self._on_state(state, detail)
        except Exception:
            log.exception("camera %r: the state callback failed", self.camera)
