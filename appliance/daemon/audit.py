"""The daemon's audit log and durable outbox: one SQLite file, written by one thread.

Every inspection, what each output did with it (``deliveries``) and the daemon's events go
into one SQLite database in WAL mode. One writer thread owns the write connection and commits
whatever is queued as one transaction (group commit, up to ``batch`` records). An inspection
and its ``pending`` delivery rows are one transaction, and ``then()`` (the fan-out to the
outputs) runs only after that COMMIT: no output ever reports a result whose audit row is not
durable, and an output that must never lose a result (MQTT) resends its ``pending`` rows, the
outbox, after a restart.

Durability: ``synchronous=FULL`` is the default. An industrial PC loses power, and a result
already sent to a PLC must have its audit row; with group commit the fsync is paid once per
batch, not per frame. ``NORMAL`` is allowed: in WAL it survives a process crash or ``kill -9``
but may lose the last transactions on power loss.

A failing write (full disk, read-only folder) never stops the daemon: ``state()`` turns
``error`` with the reason, ``then(False)`` still runs (outputs keep delivering, durable ones
from memory), and the records wait in a bounded in-memory backlog that is retried with backoff;
overflow drops the oldest and counts them. What is still unwritten when the log closes is spilled
to a JSON-lines file (beside the database, else in the other folders given) and written into the
database at the next start, so no result that an output showed goes unrecorded without a trace.

Every row carries the daemon run that wrote it (``run_id``). At start the log notices a previous
run that ended without an orderly stop (a kill -9, a crash, a power cut) and records it
(``unclean_stop``); deliveries that nothing will ever finish are marked ``dropped`` with why, and
a dropped or failed overlay no longer names its file in the inspection's row. Retention (age,
then size) runs on the writer thread too. The schema and retention themselves are plain
functions in ``audit_db.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from ..errors import AuditError
from .audit_db import (
    DELIVERY_STATUSES,
    AuditConfig,
    abandon_pending,
    event_row,
    iso_utc,
    open_reader,
    open_writer,
    retain,
    unclean_previous_run,
)
from .audit_ops import Call as _Call
from .audit_ops import Delivered as _Delivered
from .audit_ops import Event as _Event
from .audit_ops import Op as _Op
from .audit_ops import Record as _Record
from .audit_ops import Then, read_spills, spill
from .records import Inspection

log = logging.getLogger(__name__)


_STOP = object()


class Recorder:
    """The audit log's single writer: a thread, its queue, group commit, retention and the backlog.

    Every public method is thread-safe and returns at once (``record`` blocks only while the
    internal queue of ``queue_size`` operations is full). ``pending`` reads on its own connection.
    """

    def __init__(self, path: Path, *, synchronous: str = "full", retention_days: float = 90.0,
                 max_mb: float = 2048.0, batch: int = 256, retention_interval_s: float = 300.0,
                 backlog: int = 10_000, retry_s: float = 1.0, retry_max_s: float = 10.0,
                 queue_size: int = 65_536, run_id: str | None = None, artifacts: Mapping[str, str] | None = None,
                 spill_dirs: Iterable[Path] = ()) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = Path(path)
        self.run_id = run_id or os.urandom(4).hex()
        #: output -> inspections column naming the file it writes (its delivery's detail when ``sent``);
        #: cleared when that delivery is dropped or failed
        self.artifacts = dict(artifacts or {})
        self.spill_dirs = [self.path.parent, *(Path(d) for d in spill_dirs)]
        self.synchronous = synchronous
        self.retention_days, self.max_mb, self.batch = retention_days, max_mb, max(1, int(batch))
        self.retention_interval_s = retention_interval_s
        self.backlog_max, self.retry_s, self.retry_max_s = backlog, retry_s, retry_max_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._db: Database | None = None
        self._reader: Database | None = None
        self._read_lock = threading.Lock()
        self._put_lock = threading.Lock()
        self._closed = False
        self._backlog: deque[_Op] = deque()
        self._own: deque[_Op] = deque()  # queued by the writer thread itself (in a then())
        self._retry_delay = retry_s
        self._retry_at = 0.0
        self._retention_at = 0.0
        self.written = 0  # inspections committed
        self.dropped = 0  # operations lost to a backlog overflow or a record SQLite refused outright
        self.last_error: str | None = None
        self._erroring = False  # writes are failing: records wait in the backlog

    @classmethod
    def from_config(cls, config: AuditConfig, state_dir: Path, **kwargs: Any) -> Recorder:
        """An unstarted recorder for the daemon's ``audit`` config."""
        return cls(config.resolve_path(state_dir), synchronous=config.synchronous,
                   retention_days=config.retention_days, max_mb=config.max_mb, batch=config.batch, **kwargs)

    # --- the callers' side -------------------------------------------------------------------

    def start(self, durable: Iterable[str] = ()) -> dict[str, Any] | None:
        """Open (or create) the database, settle what earlier runs left, start the writer.

        Records an earlier run spilled are written; deliveries pending from earlier runs are marked
        ``dropped`` unless their output is ``durable`` (it resends its outbox). Returns the previous
        run (see ``unclean_previous_run``) when it ended uncleanly, after auditing an ``unclean_stop``.

        Raises:
            AuditError: the database cannot be opened.

        """
        if self._thread is not None:
            return None
        self._db = open_writer(self.path, self.synchronous)
        try:
            self._write_spills()
            previous = unclean_previous_run(self._db)
            left = [r[0] for r in self._db.execute("SELECT DISTINCT output FROM deliveries WHERE status = 'pending'")]
            dropped = abandon_pending(self._db, [o for o in left if o not in set(durable)],
                                      "not delivered: the daemon stopped before this output took it",
                                      self.artifacts)
        except sqlite3.Error as exc:
            self._db.close()
            raise AuditError(f"cannot settle the audit database {self.path}: {exc}") from exc
        if previous is not None:
            last = previous["last_inspection_at"]
            self._queue.put(_Event(event_row(
                "unclean_stop", detail=f"the previous run (pid {previous['pid']}) ended without an orderly stop "
                f"(killed, crashed or power lost); its last inspection finished at "
                f"{iso_utc(last) if last else 'none'}", data=previous | {"abandoned_deliveries": dropped},
                run_id=self.run_id)))
        self._retention_at = time.monotonic()  # a first pass at once: the device may have been off for months
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        return previous

    def abandon(self, outputs: Sequence[str], detail: str, timeout: float = 10.0) -> dict[str, int]:
        """Mark every ``pending`` delivery of ``outputs`` ``dropped`` with ``detail`` (at an orderly stop)."""
        return self.on_writer(lambda db: abandon_pending(db, list(outputs), detail, self.artifacts), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, checkpoint and close; must not raise.

        Shut down in this order: stop the pipelines, ``flush()`` (every ``then()`` has run), close
        the outputs (their last ``delivered()`` reports), then ``close()``. Reports that arrive after
        it are logged and dropped: their outbox rows stay ``pending`` and are resent after a restart.
        """
        if self._thread is None or self._closed:
            self._closed = True
            return
        with self._put_lock:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer did not finish within %.1f s; %d operations may be lost",
                      timeout, self._queue.qsize() + len(self._backlog))
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def record(self, inspection: Inspection, outputs: Sequence[str], outbox: Mapping[str, str] | None = None,
               then: Then | None = None) -> None:
        """Queue an inspection and a ``pending`` delivery per output; call ``then(True)`` after its COMMIT.

        ``then(False)`` when the write failed and the record waits in the backlog (a full disk).
        ``outbox`` maps some of ``outputs`` to the payload they must deliver even across a restart.
        """
        outbox = outbox or {}
        unknown = set(outbox) - set(outputs)
        if unknown:
            raise ValueError(f"outbox names outputs that are not among the outputs: {sorted(unknown)}")
        row = inspection.to_dict()
        row["run_id"] = self.run_id
        row["time"] = iso_utc(inspection.captured_at)
        row["latency_ms"] = json.dumps(row["latency_ms"])
        now = time.time()
        deliveries = [{"inspection_id": inspection.id, "output": name, "status": "pending",
                       "payload": outbox.get(name), "created_at": now, "attempts": 0} for name in outputs]
        self._put(_Record(row, deliveries, then))

    def delivered(self, inspection_id: str, output: str, status: str = "sent", detail: str | None = None,
                  at: float | None = None) -> None:
        """Queue what ``output`` did with an inspection: its status, when, one more attempt, a detail."""
        if status not in DELIVERY_STATUSES:
            raise ValueError(f"delivery status must be one of {DELIVERY_STATUSES}, got {status!r}")
        self._put(_Delivered(inspection_id, output, status, None if detail is None else str(detail),
                             time.time() if at is None else float(at)))

    def event(self, kind: str, camera: str | None = None, detail: str | None = None, data: Any = None) -> None:
        """Queue an event row (``start``, ``reload``, ``camera_lost``, ...); ``data`` is stored as JSON."""
        self._put(_Event(event_row(kind, camera, detail, data, run_id=self.run_id)))

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query on the reader connection (never blocks the writer)."""
        with self._read_lock:
            if self._reader is None:
                self._reader = open_reader(self.path)
            cursor = self._reader.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def pending(self, output: str, limit: int = 1000, after: int = 0) -> list[dict[str, Any]]:
        """The outbox of ``output``: its ``pending`` deliveries (row ``id`` above ``after``), oldest first.

        ``after`` lets a sender skip the rows it has already handed on and not yet reported.
        """
        with self._read_lock:
            if self._reader is None:
                self._reader = open_reader(self.path)
            return list(self._reader["deliveries"].rows_where(
                "output = ? AND status = 'pending' AND id > ?", [output, after], order_by="id", limit=limit,
                select="id, inspection_id, output, payload, created_at, attempts"))

    def pending_count(self, output: str) -> int:
        """How many deliveries of ``output`` are still ``pending`` (committed ones: the outbox's backlog)."""
        with self._read_lock:
            if self._reader is None:
                self._reader = open_reader(self.path)
            return self._reader.execute("SELECT count(*) FROM deliveries WHERE output = ? AND status = 'pending'",
                                        [output]).fetchone()[0]

    def drop_pending(self, output: str, keep: int, detail: str, after: int = 0, timeout: float = 30.0) -> int:
        """Bound an outbox: mark the oldest ``pending`` rows of ``output`` (above ``after``) ``dropped``.

        At most ``keep`` of them stay; returns how many were dropped. Runs on the writer thread.
        """

        def drop(db: Database) -> int:
            where = "output = ? AND status = 'pending' AND id > ?"
            with db.atomic():
                excess = db.execute(f"SELECT count(*) FROM deliveries WHERE {where}",
                                    [output, after]).fetchone()[0] - keep
                if excess <= 0:
                    return 0
                return db.execute(f"UPDATE deliveries SET status = 'dropped', delivered_at = ?, detail = ? "
                                  f"WHERE id IN (SELECT id FROM deliveries WHERE {where} ORDER BY id LIMIT ?)",
                                  [time.time(), detail, output, after, excess]).rowcount

        return self.on_writer(drop, timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued before this call is committed (or in the backlog); a no-op once closed."""
        if self._closed:
            return
        self.on_writer(lambda db: None, timeout)

    def prune(self, timeout: float = 60.0) -> dict[str, int]:
        """Run a retention pass now (on the writer thread) and return what it deleted."""
        return self.on_writer(lambda db: self._retain(), timeout)

    def forget_frames(self, paths: Sequence[str]) -> None:
        """The frame store deleted these files: rows no longer name them (queued; returns at once)."""
        paths = list(paths)

        def forget(db: Database) -> None:
            with db.atomic():
                for i in range(0, len(paths), 500):
                    chunk = paths[i:i + 500]
                    db.execute(f"UPDATE inspections SET frame = NULL WHERE frame IN ({','.join('?' * len(chunk))})",
                               chunk)

        self.later(forget)

    def later(self, fn: Callable[[Database], Any]) -> None:
        """Run ``fn(db)`` on the writer thread after what is queued, without waiting for it (errors are logged)."""
        future: Future = Future()
        future.add_done_callback(lambda f: f.exception() and log.error("audit: %s", f.exception()))
        if threading.current_thread() is self._thread:
            self._own.append(_Call(fn, future))
            return
        with self._put_lock:
            if self._thread is None or self._closed:
                log.warning("audit log closed: a maintenance update was not done")
                return
            self._queue.put(_Call(fn, future))

    def nudge(self) -> None:
        """Retry a failing write with the next operation (free space came back), not at the next backoff step."""
        self._retry_at = 0.0
        self._retry_delay = self.retry_s

    def alive(self) -> bool:
        """True while the writer thread runs (the daemon's health check reads it)."""
        return self._thread is not None and self._thread.is_alive()

    def state(self) -> dict[str, Any]:
        """Status for ``appliance status``: ``ok`` or ``error`` with the reason, counters and size."""
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += Path(f"{self.path}{suffix}").stat().st_size
        return {"state": "error" if self._erroring else "ok",
                "queued": self._queue.qsize() + len(self._own), "written": self.written, "backlog": len(self._backlog),
                "dropped": self.dropped, "last_error": self.last_error, "db_bytes": size,
                "synchronous": self.synchronous}

    def _put(self, op: _Op) -> None:
        if threading.current_thread() is self._thread:
            self._own.append(op)  # from a then() callback: never wait on our own queue (written even at close)
            return
        with self._put_lock:  # nothing slips in behind the stop marker
            if self._thread is not None and not self._closed:
                self._queue.put(op)
                return
        if isinstance(op, _Record):
            raise AuditError("the audit log is not running (record before start or after close)")
        # a late delivery report or event at shutdown: the outbox row stays pending, resent after restart
        log.warning("audit log closed: %s not recorded", type(op).__name__.strip("_").lower())

    def on_writer(self, fn: Callable[[Database], Any], timeout: float = 10.0) -> Any:
        """Run ``fn(db)`` on the writer thread, after everything queued before it, and return its result.

        For maintenance on the write connection (a PRAGMA, a manual VACUUM) without a second writer.
        """
        if threading.current_thread() is self._thread:
            return fn(self._db)
        if self._thread is None or self._closed:
            raise AuditError("the audit log is not running")
        future: Future = Future()
        self._queue.put(_Call(fn, future))
        return future.result(timeout)

    # --- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            now = time.monotonic()
            if now >= self._retention_at:
                self._retention_at = now + self.retention_interval_s
                self._safe_retain()
            wake = self._retention_at if not self._backlog else min(self._retention_at, self._retry_at)
            items = [self._own.popleft() for _ in range(min(self.batch, len(self._own)))]
            try:
                if not items:
                    items.append(self._queue.get(timeout=max(0.0, wake - time.monotonic())))
            except queue.Empty:
                pass
            while len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(i is _STOP for i in items):
                stop = True
                items = [i for i in items if i is not _STOP]
                while True:  # anything put while stopping
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        items.append(item)
            try:
                self._process(items)
                if not items and self._backlog and time.monotonic() >= self._retry_at:
                    self._persist([])
            except Exception as exc:  # a bug must not silence the audit log for good
                log.exception("audit writer: unexpected error")
                self.last_error = f"audit writer: {exc!r}"
        self._finish()

    def _process(self, items: list[Any]) -> None:
        ops: list[_Op] = []
        for item in items:
            if isinstance(item, _Call):
                self._persist(ops)
                ops = []
                try:
                    item.future.set_result(item.fn(self._db))
                except Exception as exc:
                    item.future.set_exception(exc)
            else:
                ops.append(item)
                if len(ops) >= self.batch:
                    self._persist(ops)
                    ops = []
        self._persist(ops)

    def _persist(self, ops: list[_Op]) -> None:
        """Commit ``ops`` after the backlog, or keep them in the backlog; ``then(committed)`` runs either way."""
        committed = False
        try:
            if self._backlog:
                if time.monotonic() < self._retry_at:
                    self._keep(ops)
                    return
                try:
                    self._drain_backlog()
                except sqlite3.OperationalError:
                    self._keep(ops)
                    raise
            self._write_isolating(ops)
            committed = True
            self._erroring, self._retry_delay = False, self.retry_s
        except sqlite3.OperationalError as exc:
            self._failed(exc)
        finally:
            self._callbacks(ops, committed)

    def _drain_backlog(self) -> None:
        kept = len(self._backlog)
        while self._backlog:
            chunk = [self._backlog[i] for i in range(min(self.batch, len(self._backlog)))]
            self._write_isolating(chunk, from_backlog=True)
        log.warning("audit log writable again: %d queued operations written", kept)
        self._write([_Event(event_row("audit_recovered", data={"written": kept, "dropped": self.dropped,
                                                               "error": self.last_error}, run_id=self.run_id))])

    def _write_isolating(self, ops: list[_Op], from_backlog: bool = False) -> None:
        """Write ``ops`` in one transaction; if SQLite refuses their content, one by one, dropping the bad ones.

        ``sqlite3.OperationalError`` (full disk, read-only, I/O) propagates with the unwritten
        ops moved to the backlog; each op written is popped off the backlog when it came from it.
        """
        try:
            self._write(ops)
            if from_backlog:
                for _ in ops:
                    self._backlog.popleft()
            return
        except sqlite3.OperationalError:
            if not from_backlog:
                self._keep(ops)
            raise
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
            bad = exc
        log.error("audit: SQLite refused a batch (%s); writing its records one by one", bad)
        for i, op in enumerate(ops):
            try:
                self._write([op])
            except sqlite3.OperationalError:
                if not from_backlog:
                    self._keep(ops[i:])
                raise
            except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                self.dropped += 1
                self.last_error = f"a record was refused and dropped: {exc}"
                log.error("audit: %s", self.last_error)
            if from_backlog:
                self._backlog.popleft()

    def _write(self, ops: Sequence[_Op]) -> None:
        """One transaction: inspections and their deliveries, then delivery updates, then events."""
        if not ops:
            return
        db = self._db
        assert db is not None
        records = [op for op in ops if isinstance(op, _Record)]
        with db.atomic():
            if records:
                # alter=True: a field added to Inspection later becomes a column instead of a failure
                db["inspections"].insert_all([r.row for r in records], ignore=True, alter=True)
                db["deliveries"].insert_all([d for r in records for d in r.deliveries], ignore=True)
            for op in ops:
                if isinstance(op, _Delivered):
                    self._update_delivery(db, op)
            events = [op.row for op in ops if isinstance(op, _Event)]
            if events:
                db["events"].insert_all(events)
        self.written += len(records)

    def _update_delivery(self, db: Database, op: _Delivered) -> None:
        column = self.artifacts.get(op.output)
        if column is not None and op.status in ("dropped", "failed"):  # the file was never written
            db.execute(f"UPDATE inspections SET {column} = NULL WHERE id = ?", [op.inspection_id])
        elif column is not None and op.status == "sent" and op.detail:  # the file it wrote
            db.execute(f"UPDATE inspections SET {column} = ? WHERE id = ?", [op.detail, op.inspection_id])
        # No sqlite-utils API updates by a non-primary key with an increment.
        n = db.execute("UPDATE deliveries SET status = ?, delivered_at = ?, attempts = attempts + 1, detail = ? "
                       "WHERE inspection_id = ? AND output = ?",
                       [op.status, op.at, op.detail, op.inspection_id, op.output]).rowcount
        if n == 0 and db.execute("SELECT 1 FROM inspections WHERE id = ?", [op.inspection_id]).fetchone():
            # an output the record did not list (added by a reload): keep what it did anyway
            db["deliveries"].insert({"inspection_id": op.inspection_id, "output": op.output, "status": op.status,
                                     "created_at": op.at, "delivered_at": op.at, "attempts": 1,
                                     "detail": op.detail}, ignore=True)

    def _keep(self, ops: Sequence[_Op]) -> None:
        self._backlog.extend(ops)
        overflow = len(self._backlog) - self.backlog_max
        if overflow > 0:
            for _ in range(overflow):
                self._backlog.popleft()
            if self.dropped == 0:
                log.error("audit backlog full (%d): dropping the oldest records", self.backlog_max)
            self.dropped += overflow

    def _failed(self, exc: Exception) -> None:
        reason = f"audit write failed: {exc}"
        if not self._erroring:
            log.error("%s; keeping up to %d records in memory and retrying", reason, self.backlog_max)
            self._keep([_Event(event_row("audit_error", detail=str(exc), run_id=self.run_id))])
        self._erroring = True
        self.last_error = reason
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)

    @staticmethod
    def _callbacks(ops: Sequence[_Op], committed: bool) -> None:
        for op in ops:
            if isinstance(op, _Record) and op.then is not None:
                then, op.then = op.then, None  # once, even if the record waits in the backlog
                try:
                    then(committed)
                except Exception:
                    log.exception("audit: a then() callback raised")

    def _retain(self) -> dict[str, int]:
        assert self._db is not None
        counts = retain(self._db, self.retention_days, self.max_mb)
        if any(counts.values()):
            log.info("audit retention deleted %s", counts)
            self._write([_Event(event_row("retention", data=counts, run_id=self.run_id))])
        return counts

    def _safe_retain(self) -> None:
        try:
            self._retain()
        except sqlite3.Error as exc:
            log.error("audit retention failed: %s", exc)
            self.last_error = f"retention failed: {exc}"

    def _finish(self) -> None:
        assert self._db is not None
        while self._own:  # what the last then() callbacks queued
            self._process([self._own.popleft() for _ in range(min(self.batch, len(self._own)))])
        if self._backlog:
            self._retry_at = 0.0
            self._persist([])
            if self._backlog:
                self._spill()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("audit checkpoint at close failed: %s", exc)
        self._db.close()

    # --- what could not be written before closing ---------------------------------------------

    def _spill(self) -> None:
        """Keep the unwritten backlog in a spill file for the next start, or say what is lost."""
        n = len(self._backlog)
        target = spill(list(self._backlog), self.spill_dirs, self.run_id)
        if target is not None:
            log.error("audit log closed with %d operations unwritten (%s); kept in %s, written at the next start",
                      n, self.last_error, target)
            self._backlog.clear()
            return
        ids = [op.row["id"] for op in self._backlog if isinstance(op, _Record)]
        log.error("audit log closed with %d operations never written and nowhere to keep them (%s); inspections "
                  "lost from the audit: %d, ids %s .. %s", n, self.last_error, len(ids),
                  ids[0] if ids else "-", ids[-1] if ids else "-")

    def _write_spills(self) -> None:
        """Write what earlier runs spilled, then delete their files; audited as ``audit_spill_written``."""
        for path, ops, bad in read_spills(self.spill_dirs):
            records = sum(isinstance(op, _Record) for op in ops)
            self._write([*ops, _Event(event_row(
                "audit_spill_written", detail=f"{records} inspections and {len(ops) - records} other operations "
                f"that a run could not write before it stopped, written from {path}",
                data={"file": str(path), "records": records, "operations": len(ops), "unreadable_lines": bad},
                run_id=self.run_id))])
            path.unlink()
            log.warning("audit: wrote %d operations spilled to %s by an earlier run", len(ops), path)
