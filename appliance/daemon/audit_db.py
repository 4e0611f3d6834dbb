"""The audit database itself: schema, opening for writing or reading, retention.

Plain functions on a ``sqlite_utils.Database``, no threads: the single writer (``audit.py``)
and the read side (``audit_query.py``, the ``appliance audit`` command) both stand on them.
Schema changes bump ``SCHEMA_VERSION`` (``PRAGMA user_version``) and add a step to ``MIGRATIONS``,
applied in order in one transaction when an older file is opened for writing; a file written by a
newer version is refused rather than misread.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlite_utils import Database

from ..errors import AuditError

#: ``PRAGMA user_version`` of the schema this module writes.
SCHEMA_VERSION = 3
#: What ``Recorder.delivered()`` may set; ``pending`` keeps the row in the outbox (an attempt that failed).
DELIVERY_STATUSES = ("sent", "skipped", "failed", "dropped", "pending")
_RETENTION_CHUNK = 500  # most inspections deleted per transaction by the size limit

_INSPECTION_COLUMNS: dict[str, type] = {
    "id": str, "time": str, "camera": str, "seq": int, "trigger_id": str, "captured_at": float,
    "finished_at": float, "verdict": str, "score": float, "raw_score": float, "threshold": float,
    "threshold_source": str, "error": str, "model_id": str, "bank_hash": str, "source": str,
    "image_sha256": str, "overlay_path": str, "latency_ms": str, "file_sha256": str, "run_id": str, "frame": str,
}
#: Operator labels: one row per label, undone ones kept (``undone_at``); ``learned`` is what the model took from it.
_LABEL_COLUMNS: dict[str, type] = {
    "id": str, "inspection_id": str, "camera": str, "label": str, "note": str, "who": str, "at": float, "time": str,
    "verdict": str, "score": float, "threshold": float, "model_id": str, "frame": str, "learned": str,
    "undone_at": float, "undone_by": str, "run_id": str,
}
# sqlite-utils has no public AUTOINCREMENT option; AUTOINCREMENT keeps ids (= send order)
# from ever being reused after retention deletes the newest rows.
_DELIVERIES_SQL = """CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id TEXT NOT NULL,
    output TEXT NOT NULL,
    status TEXT NOT NULL,
    payload TEXT,
    created_at REAL NOT NULL,
    delivered_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT
)"""


class AuditConfig(BaseModel):
    """The ``audit`` section of the daemon config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path | None = Field(None, description="audit database file (default: <state_dir>/audit.db)")
    synchronous: Literal["full", "normal"] = Field(
        "full", description="SQLite synchronous level: full survives power loss, normal only a crash")
    retention_days: float = Field(90.0, gt=0, description="inspections and events older than this are deleted")
    max_mb: float = Field(2048.0, gt=0, description="above this size the oldest inspections are deleted")
    batch: int = Field(256, ge=1, le=100_000, description="most records committed in one transaction")

    def resolve_path(self, state_dir: Path) -> Path:
        """The database file: ``path`` if set, else ``<state_dir>/audit.db``."""
        return self.path if self.path is not None else Path(state_dir) / "audit.db"


def iso_utc(ts: float) -> str:
    """Seconds since the epoch as ISO-8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_row(kind: str, camera: str | None = None, detail: str | None = None, data: Any = None,
              at: float | None = None, run_id: str | None = None) -> dict[str, Any]:
    """One ``events`` row (``data`` as JSON text)."""
    if not kind or len(kind) > 64:
        raise ValueError(f"an event kind is a short non-empty string, got {kind!r}")
    at = time.time() if at is None else float(at)
    return {"at": at, "time": iso_utc(at), "kind": kind, "camera": camera,
            "detail": None if detail is None else str(detail),
            "data": None if data is None else json.dumps(data, default=str), "run_id": run_id}


def open_writer(path: Path, synchronous: str = "full") -> Database:
    """Open (creating if new) the audit database for writing; raise ``AuditError`` if that is impossible."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(f"cannot create the audit folder {path.parent}: {exc}; "
                         "set audit.path to a writable location") from exc
    conn = None
    try:
        conn = sqlite3.connect(str(path), timeout=5.0, check_same_thread=False)
        db = Database(conn, execute_plugins=False)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AuditError(f"{path} has audit schema {version}, newer than this version's {SCHEMA_VERSION}; "
                             "upgrade the appliance or point audit.path at another file")
        if version == 0:
            if db.table_names():
                raise AuditError(f"{path} is an SQLite file but not an audit log; point audit.path elsewhere")
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect before the first table
            db.enable_wal()
            with db.atomic():
                _create_schema(db)
        else:
            db.enable_wal()
            if version < SCHEMA_VERSION:
                with db.atomic():
                    for step in MIGRATIONS[version - 1:]:
                        step(db)
                    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if db.journal_mode != "wal":
            raise AuditError(f"{path}: SQLite cannot use WAL mode there (a network file system?); "
                             "put the audit log on a local disk")
        db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        return db
    except (sqlite3.Error, AuditError) as exc:
        if conn is not None:
            conn.close()
        if isinstance(exc, AuditError):
            raise
        raise AuditError(f"cannot open the audit database {path}: {exc}; check that the file is an audit "
                         "log and that its folder is writable and not full") from exc


def _create_schema(db: Database) -> None:
    inspections = db["inspections"]
    inspections.create(_INSPECTION_COLUMNS, pk="id",
                       not_null={"time", "camera", "seq", "captured_at", "finished_at", "verdict"})
    inspections.create_index(["camera", "captured_at"])
    inspections.create_index(["verdict", "captured_at"])
    inspections.create_index(["captured_at"])
    db.execute(_DELIVERIES_SQL)
    db["deliveries"].create_index(["output", "status", "id"])
    db["deliveries"].create_index(["inspection_id", "output"], unique=True)
    events = db["events"]
    events.create({"id": int, "at": float, "time": str, "kind": str, "camera": str, "detail": str, "data": str,
                   "run_id": str}, pk="id", not_null={"at", "time", "kind"})
    events.create_index(["at"])
    events.create_index(["kind", "at"])
    _v3_frames_and_labels(db, new=True)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _v2_runs_and_file_hashes(db: Database) -> None:
    """Version 2: every row names the daemon run that wrote it; inspections keep the file's own hash."""
    db["inspections"].add_column("file_sha256", str)
    db["inspections"].add_column("run_id", str)
    db["events"].add_column("run_id", str)


def _v3_frames_and_labels(db: Database, new: bool = False) -> None:
    """Version 3: inspections name the frame kept in the frame store; operator labels have their table."""
    if not new:
        db["inspections"].add_column("frame", str)
    db["inspections"].create_index(["frame"])
    labels = db["labels"]
    labels.create(_LABEL_COLUMNS, pk="id", not_null={"inspection_id", "camera", "label", "who", "at", "time"})
    labels.create_index(["inspection_id"])
    labels.create_index(["camera", "at"])


#: ``MIGRATIONS[v - 1]`` takes a file from schema ``v`` to ``v + 1``.
MIGRATIONS = [_v2_runs_and_file_hashes, _v3_frames_and_labels]


def open_reader(path: Path) -> Database:
    """A read-only connection (``mode=ro``): it never takes the write lock, so it never blocks the writer."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"no audit database at {path}; check the path (the daemon creates it on its first run)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0,
                               check_same_thread=False)
        db = Database(conn, execute_plugins=False)
        if not {"inspections", "deliveries", "events"} <= set(db.table_names()):
            conn.close()
            raise AuditError(f"{path} is not an audit database (no inspections/deliveries/events tables)")
        return db
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit database {path}: {exc}") from exc


def used_bytes(db: Database) -> int:
    """Bytes held by live pages (the file minus its free list, which incremental vacuum returns)."""
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    return pages * page_size


def retain(db: Database, retention_days: float, max_mb: float, now: float | None = None) -> dict[str, int]:
    """Delete what is older than ``retention_days``, then the oldest while above ``max_mb``; vacuum.

    Returns the counts deleted (``inspections``, ``deliveries``, ``events``). Deliveries go with
    their inspection; events by their own time, and by the size limit up to the oldest kept inspection.
    """
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    counts = {"inspections": 0, "deliveries": 0, "events": 0}
    with db.atomic():
        counts["deliveries"] += db.execute(
            "DELETE FROM deliveries WHERE inspection_id IN (SELECT id FROM inspections WHERE captured_at < ?)",
            [cutoff]).rowcount
        counts["inspections"] += db.execute("DELETE FROM inspections WHERE captured_at < ?", [cutoff]).rowcount
        counts["events"] += db.execute("DELETE FROM events WHERE at < ?", [cutoff]).rowcount
    limit = max_mb * 1024 * 1024
    rows = None
    while (used := used_bytes(db)) > limit:
        # about the share of rows that is over the limit, at most a chunk: short write locks
        rows = db["inspections"].count if rows is None else rows
        chunk = min(_RETENTION_CHUNK, max(1, math.ceil(rows * (used - limit) / used)))
        with db.atomic():
            oldest = "SELECT id FROM inspections ORDER BY captured_at, id LIMIT ?"
            d = db.execute(f"DELETE FROM deliveries WHERE inspection_id IN ({oldest})", [chunk]).rowcount
            n = db.execute(f"DELETE FROM inspections WHERE id IN ({oldest})", [chunk]).rowcount
            first = db.execute("SELECT min(captured_at) FROM inspections").fetchone()[0]
            e = db.execute("DELETE FROM events WHERE at < ?", [first if first is not None else float("inf")]).rowcount
        rows -= n
        counts["inspections"] += n
        counts["deliveries"] += d
        counts["events"] += e
        if n + d + e == 0:
            break
    if any(counts.values()):
        # executescript steps the pragma to the end; a plain execute frees one page per step
        db.executescript("PRAGMA incremental_vacuum;")
    return counts


def unclean_previous_run(db: Database) -> dict[str, Any] | None:
    """The previous run, if it ended without an orderly stop: its ``start`` event, id and last inspection.

    Runs are bracketed by ``start`` and ``stop`` (or ``start_failed``) events; a ``start`` with
    nothing after it means the process was killed, crashed or lost power.
    """
    row = db.execute("SELECT kind, at, data, run_id FROM events WHERE kind IN ('start', 'stop', 'start_failed') "
                     "ORDER BY id DESC LIMIT 1").fetchone()
    if row is None or row[0] != "start":
        return None
    last_at, count = db.execute("SELECT max(finished_at), count(*) FROM inspections WHERE captured_at >= ?",
                                [row[1]]).fetchone()
    try:
        start = json.loads(row[2]) if row[2] else {}
    except ValueError:
        start = {}
    return {"run_id": row[3], "started_at": row[1], "pid": start.get("pid"), "version": start.get("version"),
            "inspections": count, "last_inspection_at": last_at}


def abandon_pending(db: Database, outputs: list[str], detail: str, artifacts: dict[str, str] | None = None,
                    now: float | None = None) -> dict[str, int]:
    """Mark the ``pending`` deliveries of ``outputs`` ``dropped`` with ``detail``: nothing will finish them.

    For an output in ``artifacts`` (output -> inspections column naming its file), the inspections
    whose delivery is dropped no longer name the file (it was never written). Returns counts per output.
    """
    now = time.time() if now is None else now
    counts = {}
    with db.atomic():
        for output in outputs:
            column = (artifacts or {}).get(output)
            if column is not None:
                db.execute(f"UPDATE inspections SET {column} = NULL WHERE id IN (SELECT inspection_id FROM "
                           "deliveries WHERE output = ? AND status = 'pending')", [output])
            n = db.execute("UPDATE deliveries SET status = 'dropped', delivered_at = ?, detail = ? "
                           "WHERE output = ? AND status = 'pending'", [now, detail, output]).rowcount
            if n:
                counts[output] = n
    return counts
