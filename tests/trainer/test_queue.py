"""Both job queues on their real stores (huey on a SQLite file, procrastinate on PostgreSQL): restarts, a failing
job, several workers, delays, and ``open_queue``'s choice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from appliance.errors import ConfigError
from appliance.trainer.config import TrainerConfig
from appliance.trainer.queue import JobQueue
from appliance.trainer.queue_huey import HueyQueue
from appliance.trainer.queue_pg import ProcrastinateQueue
from appliance.trainer.queues import open_queue, postgres_dsn

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["huey", "procrastinate"])
def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], JobQueue]]:
    """A factory of queue objects on one store: each call is a trainer or worker (re)starting on it."""
    if request.param == "huey":
        folder = tmp_path / "trainer"
        factory = lambda: HueyQueue(folder)  # noqa: E731
    else:
        dsn = postgres_dsn(request.getfixturevalue("postgres_url"))
        name = f"test-{uuid.uuid4().hex[:12]}"  # one queue per test on the session's server
        factory = lambda: ProcrastinateQueue(dsn, queue=name)  # noqa: E731
    made: list[JobQueue] = []

    def make() -> JobQueue:
        made.append(factory())
        return made[-1]

    yield make
    for queue in made:
        queue.close()


class Recorder:
    """A handler that notes which worker ran which job (after ``seconds``), and raises for the ids in ``fail``."""

    def __init__(self, seconds: float = 0.0, fail: tuple[int, ...] = ()) -> None:
        self.seconds, self.fail = seconds, fail
        self.runs: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def handler(self, worker: str) -> Callable[[int], None]:
        def run(job_id: int) -> None:
            time.sleep(self.seconds)
            with self._lock:
                self.runs.append((job_id, worker))
            if job_id in self.fail:
                raise RuntimeError(f"job {job_id} fails on purpose")
        return run

    def ids(self) -> list[int]:
        with self._lock:
            return sorted(j for j, _ in self.runs)

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ids()) < count and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def working(queue: JobQueue, handler: Callable[[int], None], concurrency: int = 1) -> Iterator[threading.Thread]:
    """``queue.work`` on a thread until the block ends; then it must stop within seconds."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            queue.work(handler, stop, concurrency)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-worker")
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "work() did not return after stop"
    assert not errors, errors


def test_jobs_enqueued_before_a_restart_run_after_it(make_queue: Callable[[], JobQueue]) -> None:
    before = make_queue()
    with working(before, Recorder().handler("old")):
        pass  # a worker ran and stopped: nothing was queued yet
    before.enqueue(1)
    before.enqueue(2, delay_s=1.0)
    before.close()
    recorder = Recorder()
    with working(make_queue(), recorder.handler("new")):  # a new queue object: the trainer restarted
        recorder.wait_for(2)
    assert recorder.ids() == [1, 2]


def test_a_delayed_job_waits_its_delay(make_queue: Callable[[], JobQueue]) -> None:
    queue = make_queue()
    recorder = Recorder()
    with working(queue, recorder.handler("w")):
        start = time.monotonic()
        queue.enqueue(7, delay_s=2.0)
        time.sleep(1.0)
        assert recorder.ids() == []
        recorder.wait_for(1)
        waited = time.monotonic() - start
    assert recorder.ids() == [7]
    assert 2.0 <= waited < 8.0


def test_an_exception_in_one_job_does_not_stop_the_worker(make_queue: Callable[[], JobQueue]) -> None:
    queue = make_queue()
    recorder = Recorder(fail=(1, 3))
    for job_id in (1, 2, 3, 4):
        queue.enqueue(job_id)
    with working(queue, recorder.handler("w")) as thread:
        recorder.wait_for(4)
        assert thread.is_alive()
    assert recorder.ids() == [1, 2, 3, 4]


def test_two_workers_never_run_the_same_job_twice(make_queue: Callable[[], JobQueue]) -> None:
    producer = make_queue()
    jobs = list(range(1, 31))
    for job_id in jobs:
        producer.enqueue(job_id)
    recorder = Recorder(seconds=0.05)
    # two workers, each on its own queue object (own connections), as two processes would be; two threads each
    with working(make_queue(), recorder.handler("a"), concurrency=2), \
            working(make_queue(), recorder.handler("b"), concurrency=2):
        recorder.wait_for(len(jobs))
        time.sleep(1.5)  # time for a duplicate to show up
    assert recorder.ids() == jobs
    assert max(Counter(j for j, _ in recorder.runs).values()) == 1
    assert {w for _, w in recorder.runs} == {"a", "b"}  # both took part


def test_a_job_whose_procrastinate_worker_died_is_handed_out_again(postgres_url: str, tmp_path: Path) -> None:
    dsn = postgres_dsn(postgres_url)
    queue = ProcrastinateQueue(dsn, queue="stalled")
    queue.enqueue(5)
    queue.close()
    started = tmp_path / "started"
    script = (f"import pathlib, threading, time\n"
              f"from appliance.trainer.queue_pg import ProcrastinateQueue\n"
              f"def handler(job_id):\n"
              f"    pathlib.Path({str(started)!r}).write_text(str(job_id))\n"
              f"    time.sleep(600)\n"
              f"ProcrastinateQueue({dsn!r}, queue='stalled').work(handler, threading.Event())\n")
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the first worker never took the job"
            time.sleep(0.1)
    finally:
        os.kill(process.pid, signal.SIGKILL)  # mid-job: no orderly stop, the job stays 'doing'
        process.wait(10)
    with psycopg.connect(dsn, autocommit=True) as connection:  # as if its last heartbeat was long ago
        connection.execute("UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'")
    recorder = Recorder()
    with working(ProcrastinateQueue(dsn, queue="stalled"), recorder.handler("second")):
        recorder.wait_for(1)
    assert recorder.ids() == [5]


def test_a_job_whose_huey_worker_died_is_recovered_but_a_live_workers_is_not(tmp_path: Path) -> None:
    folder = tmp_path / "trainer"
    queue = HueyQueue(folder)
    queue.enqueue(5)
    queue.enqueue(6)
    queue.close()
    started = tmp_path / "started"
    started.mkdir()
    script = (f"import pathlib, threading, time\n"
              f"from appliance.trainer.queue_huey import HueyQueue\n"
              f"def handler(job_id):\n"
              f"    pathlib.Path({str(started)!r}, str(job_id)).touch()\n"
              f"    time.sleep(600)\n"
              f"HueyQueue({str(folder)!r}).work(handler, threading.Event(), 2)\n")
    doomed = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(list(started.iterdir())) < 2:
            assert doomed.poll() is None and time.monotonic() < deadline, "the worker never took both jobs"
            time.sleep(0.1)
        assert HueyQueue(folder).pending() == 0  # huey has forgotten both: only the catalogue knows them
        # While their worker lives, nothing is recovered: a job never runs twice at once.
        assert HueyQueue(folder).recover([5, 6]) == []
    finally:
        os.kill(doomed.pid, signal.SIGKILL)  # mid-job
        doomed.wait(10)
    restarted = HueyQueue(folder)
    assert restarted.recover([5, 6]) == [5, 6]
    recorder = Recorder()
    with working(restarted, recorder.handler("second")):
        recorder.wait_for(2)
    assert recorder.ids() == [5, 6]


def test_procrastinate_applies_its_schema_once(postgres_url: str) -> None:
    dsn = postgres_dsn(postgres_url)
    from appliance.trainer.queue_pg import ensure_schema

    ProcrastinateQueue(dsn).close()  # applied here at the latest
    assert ensure_schema(dsn) is False


def test_open_queue_follows_the_storage(tmp_path: Path, postgres_url: str) -> None:
    embedded = open_queue(TrainerConfig.model_validate({"storage": {"type": "embedded", "folder": str(tmp_path)}}))
    assert isinstance(embedded, HueyQueue) and embedded.path == tmp_path / "jobs.db"
    embedded.close()
    url = "postgresql+psycopg://" + postgres_dsn(postgres_url).removeprefix("postgresql://")
    fleet = open_queue(TrainerConfig.model_validate({"storage": {
        "type": "fleet", "database_url": url,
        "s3": {"endpoint": "http://127.0.0.1:1", "bucket": "unused", "access_key": "k", "secret_key": "s"}}}))
    assert isinstance(fleet, ProcrastinateQueue) and fleet.dsn.startswith("postgresql://")
    fleet.close()


def test_postgres_dsn_strips_the_driver_and_never_shows_the_url() -> None:
    assert postgres_dsn("postgresql+psycopg://u:pw@h:5/db") == "postgresql://u:pw@h:5/db"
    assert postgres_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ConfigError) as info:
        postgres_dsn("mysql://u:secret@h/db")
    assert "secret" not in str(info.value)
