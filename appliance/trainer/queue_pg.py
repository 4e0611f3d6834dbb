"""The fleet trainer's job queue: procrastinate on the catalogue's PostgreSQL server, workers on any machine.

Job ids wait in procrastinate's tables (its schema is applied when it is missing, under an advisory lock
so that trainers starting together apply it once). A worker takes a job with ``SELECT ... FOR UPDATE SKIP
LOCKED`` inside procrastinate, so any number of processes on any number of machines may work one queue and
none takes a job another holds; each job also carries the lock ``job-<id>``, so a job id enqueued twice
never runs twice at once. A job whose worker died (a kill -9, a machine lost: its heartbeat stopped) is
handed out again, so the handler may see a job it had started before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

import psycopg
from procrastinate import App, PsycopgConnector

from .queue import Handler, JobQueue

log = logging.getLogger(__name__)

TASK = "appliance.trainer.rebuild_job"
#: The advisory lock that serialises applying procrastinate's schema (any constant, fixed forever).
_SCHEMA_LOCK = 0x7472_6169_6E65  # "traine"
#: How often an idle worker polls (it is also woken at once by PostgreSQL's LISTEN/NOTIFY).
POLL_S = 1.0
#: A worker whose heartbeat (procrastinate sends one every 10 s) is older than this is taken for dead, and the
#: job it held runs again; looked for when a worker starts and every ``STALLED_S`` while it works.
STALLED_S = 60.0


def ensure_schema(dsn: str) -> bool:
    """Apply procrastinate's schema to the database at ``dsn`` unless it is there; returns whether it applied it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        try:
            if conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone()[0]:
                return False
            app = _app(dsn, None, pool_size=1)
            with app.open():
                app.schema_manager.apply_schema()
            log.info("job queue: procrastinate schema applied")
            return True
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))


def _app(dsn: str, handler: Handler | None, pool_size: int) -> App:
    """A procrastinate app on ``dsn`` whose one task hands the job id to ``handler``."""
    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_size))

    @app.task(name=TASK)
    def rebuild_job(job_id: int) -> None:
        if handler is None:  # only ``work`` runs jobs, and it passes its handler
            raise RuntimeError(f"job {job_id} reached an app that has no handler")
        handler(job_id)

    return app


class ProcrastinateQueue(JobQueue):
    """Job ids in PostgreSQL (procrastinate), worked by any number of processes."""

    def __init__(self, dsn: str, queue: str = "rebuild") -> None:
        self.dsn = dsn
        self.queue = queue
        ensure_schema(dsn)
        self._defer_app: App | None = None  # opened on the first enqueue (a sync pool of one connection)
        self._lock = threading.Lock()

    def enqueue(self, job_id: int, delay_s: float = 0.0) -> None:
        """Insert a procrastinate job for ``job_id`` (due after ``delay_s``)."""
        with self._lock:
            if self._defer_app is None:
                self._defer_app = _app(self.dsn, None, pool_size=1).open()
        options: dict = {"queue": self.queue, "lock": f"job-{int(job_id)}"}
        if delay_s > 0:
            options["schedule_in"] = {"seconds": delay_s}
        self._defer_app.configure_task(TASK, **options).defer(job_id=int(job_id))

    def work(self, handler: Handler, stop: threading.Event, concurrency: int = 1) -> None:
        """Run a procrastinate worker (jobs on ``concurrency`` threads) until ``stop`` is set; running jobs finish.

        A job's exception is logged and recorded by procrastinate (the job ``failed``); the worker goes on.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        asyncio.run(self._work(handler, stop, concurrency))

    async def _work(self, handler: Handler, stop: threading.Event, concurrency: int) -> None:
        app = _app(self.dsn, handler, pool_size=concurrency + 3)  # jobs, fetching, LISTEN and the heartbeat
        async with app.open_async():
            worker = asyncio.create_task(app.run_worker_async(
                queues=[self.queue], concurrency=concurrency, name=f"{socket.gethostname()}-{threading.get_ident()}",
                install_signal_handlers=False, fetch_job_polling_interval=POLL_S, delete_jobs="successful"))
            log.info("job queue %s: worker with %d slot(s)", self.queue, concurrency)
            checked = float("-inf")
            while not stop.is_set() and not worker.done():
                if time.monotonic() - checked >= STALLED_S:
                    await self._retry_stalled(app)
                    checked = time.monotonic()
                await asyncio.sleep(0.2)
            worker.cancel()  # procrastinate stops taking jobs and waits for the running ones
            with contextlib.suppress(asyncio.CancelledError):
                await worker  # a worker that died on its own (the database went away) raises here
            log.info("job queue %s: worker stopped", self.queue)

    async def _retry_stalled(self, app: App) -> None:
        """Hand out again the jobs held by workers whose heartbeat stopped ``STALLED_S`` ago."""
        for job in await app.job_manager.get_stalled_jobs(queue=self.queue, seconds_since_heartbeat=STALLED_S):
            log.warning("job queue %s: %s was held by a worker that stopped; handed out again", self.queue,
                        job.call_string)
            await app.job_manager.retry_job(job)

    def close(self) -> None:
        """Close the enqueueing connection."""
        with self._lock:
            if self._defer_app is not None:
                self._defer_app.close()
                self._defer_app = None
