"""Fan-out to the outputs: one worker thread and one bounded queue per output.

The pipeline hands each inspection to ``Outputs.publish`` once its audit row is committed;
every output then gets it on its own thread, so a slow or failing output never blocks
inspection or the other outputs. A full queue drops its oldest record (counted, and marked
``dropped`` in the audit log); a failed delivery is marked ``failed`` with the reason.

Stopping is bounded: ``close(timeout)`` lets every worker drain its queue at the same time
until the deadline, then reports what is left as ``dropped`` (with why), closes the
publishers and joins their threads. A worker still inside one delivery after that is named
in the returned list: the caller decides (the daemon exits without waiting for it).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ApplianceError
from .publishers import Publisher
from .records import Inspection

log = logging.getLogger(__name__)

#: ``(inspection_id, output, status, detail, at)``: how a delivery ended, for the audit log.
Report = Callable[[str, str, str, str | None, float | None], None]


class OutputWorker:
    """One output's queue and thread."""

    def __init__(self, publisher: Publisher, report: Report, size: int) -> None:
        self.publisher = publisher
        self.name = publisher.name
        self._report = report
        self._queue: collections.deque[tuple[Inspection, bool]] = collections.deque()
        self._size = size
        self._cond = threading.Condition()
        self._stop = False
        self._deadline = float("inf")  # monotonic: stop delivering queued records after it
        self._busy = False
        self.sent = self.failed = self.dropped = self.skipped = 0
        self.last_error: str | None = None
        self.last_sent_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"output-{self.name}", daemon=True)

    def start(self) -> None:
        """Start the worker (the publisher itself is started by ``Outputs``)."""
        self._thread.start()

    def put(self, inspection: Inspection, committed: bool = True) -> None:
        """Queue a record; never blocks. When full, the oldest waiting record is dropped.

        A durable output's record stays in its outbox: only its wake-up call is dropped then.
        ``committed``: its audit row is written (``False``: it waits in the audit's backlog).
        """
        dropped = None
        with self._cond:
            if self._stop:
                dropped = (inspection, committed)
            else:
                if len(self._queue) >= self._size:
                    dropped = self._queue.popleft()
                self._queue.append((inspection, committed))
                self._cond.notify()
            if dropped is not None:
                self.dropped += 1
        if dropped is not None and not self.publisher.durable:
            why = "the daemon is stopping" if self._stop else f"{self.name} queue full ({self._size})"
            self._report(dropped[0].id, self.name, "dropped", why, time.time())

    def backlog(self) -> int:
        """Records waiting (and the one being delivered)."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def stop(self, deadline: float) -> None:
        """Take no more records; deliver what is queued until ``deadline`` (monotonic), then end the thread."""
        with self._cond:
            self._stop = True
            self._deadline = deadline
            self._cond.notify()

    def join(self, deadline: float) -> bool:
        """Wait for the thread until ``deadline``; report what it left undelivered; True if it ended."""
        if self._thread.ident is not None:  # never started when the daemon's start-up failed
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        if left and not self.publisher.durable:
            now = time.time()
            for item, _ in left:
                self._report(item.id, self.name, "dropped", "the daemon stopped before this output could deliver "
                             "it (stop budget reached)", now)
        self.dropped += len(left)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue or time.monotonic() >= self._deadline:
                    return
                item, committed = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(item, committed)
            finally:
                with self._cond:
                    self._busy = False

    def _deliver(self, item: Inspection, committed: bool = True) -> None:
        if self.publisher.durable:  # it sends from the outbox and reports its deliveries itself
            try:
                if committed:
                    self.publisher.publish(item)
                else:  # not in the outbox yet (the audit log cannot write): send it from memory
                    self.publisher.publish_uncommitted(item)
            except Exception:  # the rows stay pending in the outbox: nothing is lost
                log.exception("output %s: waking the sender failed", self.name)
            return
        try:
            delivery = self.publisher.publish(item)
        except ApplianceError as exc:
            self.failed += 1
            self.last_error = str(exc)
            self._report(item.id, self.name, "failed", str(exc), time.time())
            return
        except Exception as exc:  # a bug in one output must not stop its worker
            log.exception("output %s failed on inspection %s", self.name, item.id)
            self.failed += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._report(item.id, self.name, "failed", self.last_error, time.time())
            return
        self.last_error = None
        if delivery.status == "skipped":
            self.skipped += 1
        elif delivery.status == "dropped":  # by the output's own rule (a disk below its floor)
            self.dropped += 1
        else:
            self.sent += 1
        self.last_sent_at = delivery.at or time.time()
        self._report(item.id, self.name, delivery.status, delivery.detail, self.last_sent_at)

    def state(self) -> dict[str, Any]:
        """Counters and the publisher's own state, for status and metrics."""
        own = {}
        try:
            own = self.publisher.state()
        except Exception as exc:
            own = {"state_error": str(exc)}
        state = "error" if self.last_error else "ok"
        return {"state": state, "backlog": self.backlog(), "sent": self.sent, "skipped": self.skipped,
                "failed": self.failed, "dropped": self.dropped, "last_error": self.last_error,
                "last_sent_at": self.last_sent_at, **own}


class Outputs:
    """All outputs of the daemon."""

    def __init__(self, publishers: Sequence[Publisher], report: Report) -> None:
        self.workers = [OutputWorker(p, report, p.config.queue) for p in publishers]

    @property
    def names(self) -> list[str]:
        """Output names, in configuration order."""
        return [w.name for w in self.workers]

    def get(self, name: str) -> Publisher | None:
        """The publisher of that name, if configured."""
        return next((w.publisher for w in self.workers if w.name == name), None)

    def start(self) -> None:
        """Start every publisher, then its worker; a publisher that cannot start stops the start-up."""
        started = []
        try:
            for worker in self.workers:
                worker.publisher.start()
                started.append(worker)
                worker.start()
        except BaseException:
            deadline = time.monotonic() + 1.0
            for worker in started:
                worker.stop(deadline)
                worker.join(deadline)
                worker.publisher.close()
            raise

    def publish(self, inspection: Inspection, committed: bool = True) -> None:
        """Hand an inspection to every output (never blocks); ``committed``: its audit row is written."""
        for worker in self.workers:
            worker.put(inspection, committed)

    def close(self, timeout: float = 10.0) -> list[str]:
        """Drain every queue at once until ``timeout``, drop the rest (reported), close the publishers.

        Returns the outputs whose thread is still inside a delivery (abandoned; the process may exit).
        """
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.stop(deadline)
        stuck = [w.name for w in self.workers if not w.join(deadline)]
        for worker in self.workers:
            try:
                worker.publisher.close()
            except Exception:  # close must not raise
                log.exception("closing output %s failed", worker.name)
        for name in stuck:
            log.error("output %s is still inside a delivery after the stop budget; abandoned", name)
        return stuck

    def state(self) -> dict[str, dict[str, Any]]:
        """Each output's state by name."""
        return {w.name: w.state() for w in self.workers}
