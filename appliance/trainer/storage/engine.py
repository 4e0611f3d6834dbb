"""SQLAlchemy engines for the catalogue: SQLite tuned for several processes, PostgreSQL through psycopg 3.

SQLite (the embedded catalogue) is shared by the API, the page and a worker, so every connection gets
WAL (readers never wait for the writer), foreign keys on and a busy timeout. A write transaction starts
with ``BEGIN IMMEDIATE`` (ask with the ``catalogue_write`` execution option): a deferred transaction
that reads and then writes can fail at once with "database is locked" when another writer got in
between, whereas an immediate one waits its turn under the busy timeout.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from ...errors import ConfigError

#: How long a SQLite writer waits for another one before giving up (seconds).
BUSY_TIMEOUT_S = 30.0


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event (below) emit BEGIN, instead of pysqlite's implicit transactions.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint; safe with WAL
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_begin(connection: sa.Connection) -> None:
    write = connection.get_execution_options().get("catalogue_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def make_engine(url: str | sa.URL) -> sa.Engine:
    """An engine for ``sqlite:///...`` or ``postgresql+psycopg://...`` (plain ``postgresql://`` means psycopg 3).

    Raises:
        ConfigError: the URL is malformed or names another database.

    """
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError("catalogue: the database URL cannot be parsed (expected sqlite:///<file> or "
                          "postgresql+psycopg://user:password@host:port/db)") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ConfigError("catalogue: an in-memory SQLite database cannot be shared by the trainer's "
                              "connections; give a file: sqlite:////var/lib/anomaly-trainer/catalogue.db")
        engine = sa.create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        return sa.create_engine(parsed, pool_pre_ping=True)
    raise ConfigError(f"catalogue: {backend!r} databases are not supported (use sqlite or postgresql+psycopg)")


def describe_url(url: sa.URL) -> str:
    """The URL without its password, fit for logs, errors and the page."""
    return url.render_as_string(hide_password=True)
