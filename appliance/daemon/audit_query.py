"""Reading the audit log: inspections with what each output did, events, and CSV or JSON export.

The database is opened read-only (``mode=ro``): a query never takes the write lock, so an
operator's export never stalls the daemon's writer (WAL lets both run at once). Times are
given as ISO dates or datetimes (naive ones in the local time zone, the operator's clock) or
as an age (``90m``, ``2h``, ``1d``, ``1w``); ``since`` is inclusive, ``until`` exclusive.
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from sqlite_utils import Database

from .audit_db import open_reader
from .records import VERDICTS

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: How a delivery reads in the ``outputs`` column: ``mqtt:sent@2024-05-01T12:00:00.123Z``.
_OUTPUTS_SQL = """(SELECT group_concat(summary, '; ') FROM (
    SELECT d.output || ':' || d.status
           || coalesce('@' || strftime('%Y-%m-%dT%H:%M:%fZ', d.delivered_at, 'unixepoch'), '') AS summary
    FROM deliveries d WHERE d.inspection_id = i.id ORDER BY d.id)) AS outputs"""


def parse_time(value: str | float | datetime | date | None, *, end: bool = False,
               now: float | None = None) -> float | None:
    """Seconds since the epoch for a time argument; ``None`` stays ``None``.

    A bare date means the start of that day, or with ``end=True`` the start of the next
    (so ``--since 2024-05-01 --until 2024-05-01`` is that whole day).
    """
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, datetime):
        return value.timestamp()  # naive: local time
    if isinstance(value, date):
        day = value + timedelta(days=1) if end else value
        return datetime(day.year, day.month, day.day).timestamp()
    text = str(value).strip()
    age = _AGE.match(text)
    if age:
        return (time.time() if now is None else now) - float(age.group(1)) * _UNITS[age.group(2).lower()]
    if text.lower() == "now":
        return time.time() if now is None else now
    try:
        if len(text) == 10:
            return parse_time(date.fromisoformat(text), end=end)
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a time: give an ISO date or datetime (2024-05-01, "
                         "2024-05-01T08:00, 2024-05-01T08:00Z) or an age (90m, 2h, 1d, 1w)") from None


@contextmanager
def open_db(db: Database | str | Path) -> Iterator[Database]:
    """A read-only connection to an audit database (``AuditError`` if missing or not one).

    A ``Database`` given is used as is and left open; a path is opened and closed again.
    """
    if isinstance(db, Database):
        yield db
        return
    conn = open_reader(Path(db))
    try:
        yield conn
    finally:
        conn.close()


def _where(clauses: list[tuple[str, Any]]) -> tuple[str | None, list[Any]]:
    kept = [(sql, arg) for sql, arg in clauses if arg is not None]
    return (" AND ".join(sql for sql, _ in kept) if kept else None), [arg for _, arg in kept]


def _order(order: str) -> str:
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
    return order.upper()


def inspections(db: Database | str | Path, camera: str | None = None, since: Any = None, until: Any = None,
                verdict: str | None = None, limit: int | None = None, order: str = "asc") -> list[dict[str, Any]]:
    """Inspections by capture time, each with ``latency_ms`` as a dict and an ``outputs`` summary.

    ``outputs`` lists every delivery as ``output:status@delivered_time`` (no time while pending).
    With ``order="desc"`` and a ``limit`` you get the most recent ones.
    """
    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    where, args = _where([("i.camera = ?", camera), ("i.captured_at >= ?", parse_time(since)),
                          ("i.captured_at < ?", parse_time(until, end=True)), ("i.verdict = ?", verdict)])
    sql = (f"SELECT i.*, {_OUTPUTS_SQL} FROM inspections i{' WHERE ' + where if where else ''} "
           f"ORDER BY i.captured_at {_order(order)}, i.rowid {_order(order)}")
    if limit is not None:
        sql, args = sql + " LIMIT ?", [*args, int(limit)]
    with open_db(db) as conn:
        rows = list(conn.query(sql, args))
    for row in rows:
        row["latency_ms"] = json.loads(row["latency_ms"]) if row.get("latency_ms") else {}
    return rows


def events(db: Database | str | Path, kind: str | None = None, camera: str | None = None, since: Any = None,
           until: Any = None, limit: int | None = None, order: str = "asc") -> list[dict[str, Any]]:
    """The daemon's events by time, ``data`` parsed from JSON."""
    where, args = _where([("kind = ?", kind), ("camera = ?", camera), ("at >= ?", parse_time(since)),
                          ("at < ?", parse_time(until, end=True))])
    with open_db(db) as conn:
        direction = _order(order)
        rows = list(conn["events"].rows_where(where, args, order_by=f"at {direction}, id {direction}", limit=limit))
    for row in rows:
        row["data"] = json.loads(row["data"]) if row.get("data") else None
    return rows


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """One row as flat text-friendly fields: ``latency_ms`` becomes ``latency_<stage>_ms`` columns."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if key == "latency_ms" and isinstance(value, dict):
            flat.update({f"latency_{stage}_ms": ms for stage, ms in value.items()})
        elif isinstance(value, dict | list):
            flat[key] = json.dumps(value, sort_keys=True)
        else:
            flat[key] = value
    return flat


@contextmanager
def _text_out(out: TextIO | str | Path, newline: str | None = None) -> Iterator[TextIO]:
    """A path is opened (UTF-8) and closed again; a stream is used as is."""
    if not isinstance(out, str | Path):
        yield out
        return
    with open(out, "w", encoding="utf-8", newline=newline) as stream:
        yield stream


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO | str | Path) -> int:
    """Write rows as CSV with a header (columns in first-seen order); returns the number of rows."""
    flat = [flatten(r) for r in rows]
    columns: dict[str, None] = {}
    for row in flat:
        columns.update(dict.fromkeys(row))
    with _text_out(out, newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
    return len(flat)


def write_json(rows: Iterable[dict[str, Any]], out: TextIO | str | Path) -> int:
    """Write rows as one JSON array, a row per line; returns the number of rows."""
    n = 0
    with _text_out(out) as stream:
        stream.write("[")
        for row in rows:
            stream.write(("," if n else "") + "\n" + json.dumps(row, default=str, ensure_ascii=False))
            n += 1
        stream.write("\n]\n")
    return n
