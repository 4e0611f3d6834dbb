"""The embedded trainer's job queue: huey on SQLite in the trainer's folder, so no server has to run.

Job ids wait in ``<folder>/jobs.db`` (huey's ``SqliteHuey``): a trainer or worker that restarts finds
them there, delayed ones (a retry's wait) in huey's schedule. ``work`` runs huey's own consumer in
this process, its workers as threads; the consumer never installs signal handlers, because the
trainer's process owns SIGTERM and SIGINT (one orderly stop) and sets ``stop`` itself.

Huey takes a job out of ``jobs.db`` before running it: a worker killed mid-job (kill -9) would lose that
job id while the catalogue keeps showing the job running. So a worker holds an exclusive ``flock`` on
``<folder>/running/<id>.lock`` while it runs a job (the kernel drops it when the process dies), and
``recover`` (called as ``serve`` and ``worker`` start) enqueues again every running job whose lock
nobody holds. Procrastinate, the fleet's queue, hands a dead worker's job out again itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from huey import SqliteHuey
from huey.consumer import Consumer

from .queue import Handler, JobQueue

log = logging.getLogger(__name__)

#: How often an idle worker looks for a job at most (huey backs off from 0.1 s up to this).
MAX_POLL_S = 1.0
#: How often dead worker threads are replaced (as huey's own consumer loop does).
HEALTH_CHECK_S = 10.0


class _QuietConsumer(Consumer):
    """Huey's consumer without its signal handlers: ``work`` may run on any thread, and stops through ``stop``."""

    def _set_signal_handlers(self) -> None:
        pass


class HueyQueue(JobQueue):
    """Job ids in ``<folder>/jobs.db``, run by huey's consumer in-process."""

    def __init__(self, folder: str | Path, name: str = "rebuild") -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "jobs.db"
        self._locks = folder / "running"
        self._locks.mkdir(exist_ok=True)
        self._huey = SqliteHuey(name, filename=str(self.path), results=False, utc=True)
        self._handler: Handler | None = None
        self._running: set[int] = set()  # job ids running in this process
        self._lock = threading.Lock()
        # One task, named explicitly so that every process (API, workers) finds it under the same name.
        self._task = self._huey.task(name="rebuild_job")(self._run)

    def _run(self, job_id: int) -> None:
        """Hand ``job_id`` to the handler, unless this process runs it already (the id was enqueued twice)."""
        if self._handler is None:  # only ``work`` consumes, and it sets the handler first
            raise RuntimeError(f"job {job_id} reached a queue that has no handler")
        with self._lock:
            if job_id in self._running:
                log.warning("job %d is running already; its second delivery is dropped", job_id)
                return
            self._running.add(job_id)
        try:
            with self._claim(job_id, wait=True):
                self._handler(job_id)
        finally:
            with self._lock:
                self._running.discard(job_id)

    def enqueue(self, job_id: int, delay_s: float = 0.0) -> None:
        """Put ``job_id`` in jobs.db (in huey's schedule when ``delay_s`` > 0)."""
        if delay_s > 0:
            self._task.schedule(args=(int(job_id),), delay=delay_s)
        else:
            self._task(int(job_id))

    @contextlib.contextmanager
    def _claim(self, job_id: int, wait: bool) -> Iterator[bool]:
        """Hold the job's lock file for the block; yields False (without waiting) if another process holds it."""
        fd = os.open(self._locks / f"{int(job_id)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def recover(self, running: list[int]) -> list[int]:
        """Enqueue again the running jobs whose lock no process holds: their worker died."""
        orphans = []
        for job_id in running:
            with self._claim(job_id, wait=False) as free:
                if free:
                    orphans.append(job_id)
        for job_id in orphans:
            self.enqueue(job_id)
        return orphans

    def pending(self) -> int:
        """Job ids waiting, now or later (for tests and the page)."""
        return self._huey.pending_count() + self._huey.scheduled_count()

    def work(self, handler: Handler, stop: threading.Event, concurrency: int = 1) -> None:
        """Run jobs on ``concurrency`` threads until ``stop`` is set; then let running jobs finish and return.

        Huey logs a job's exception and its worker takes the next job.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._handler = handler
        consumer = _QuietConsumer(self._huey, workers=concurrency, periodic=False, initial_delay=0.1,
                                  max_delay=MAX_POLL_S, scheduler_interval=1, worker_type="thread")
        consumer.start()
        log.info("job queue %s: %d worker thread(s)", self.path, concurrency)
        try:
            while not stop.wait(HEALTH_CHECK_S):
                consumer.check_worker_health()
        finally:
            consumer.stop(graceful=True)  # running jobs end; waiting ones stay in jobs.db
            log.info("job queue %s: workers stopped", self.path)

    def close(self) -> None:
        """Close the SQLite connection of this thread."""
        self._huey.storage.close()
