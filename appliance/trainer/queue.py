"""Rebuild jobs through an existing job-queue library: the catalogue says what a job is, the queue runs it.

A job's state (awaiting approval, queued, running, succeeded, failed, refused) lives in the
catalogue, so the page, the API and every worker see the same thing; the queue only carries job
ids to workers and keeps them across restarts. Two libraries, one interface:

* embedded: ``huey`` with its SQLite storage in the trainer's folder (no server to run);
* fleet: ``procrastinate`` on the PostgreSQL catalogue's server: workers on any number of machines.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

#: ``handler(job_id)``: runs one job to its end (it records the outcome in the catalogue itself).
Handler = Callable[[int], None]


class JobQueue(ABC):
    """Carries job ids from the API to the workers."""

    @abstractmethod
    def enqueue(self, job_id: int, delay_s: float = 0.0) -> None:
        """Hand a job to the workers (after ``delay_s``: a retry's wait); kept if the trainer restarts."""

    @abstractmethod
    def work(self, handler: Handler, stop: threading.Event, concurrency: int = 1) -> None:
        """Run jobs with ``handler`` until ``stop`` is set (blocking); an exception in one job does not stop it."""

    def recover(self, running: list[int]) -> list[int]:
        """Enqueue again those of ``running`` (jobs the catalogue shows running) that no worker runs; return them.

        For a queue that forgets a job once a worker takes it. The default does nothing: the library
        hands out a dead worker's job again itself.
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
