"""Which job queue a trainer uses, from its storage: huey beside the embedded storage, procrastinate beside the fleet's.

The queue lives where the catalogue lives, so a trainer and its workers agree on it without more settings.
"""

from __future__ import annotations

from ..errors import ConfigError
from .config import EmbeddedStorageConfig, TrainerConfig
from .queue import JobQueue


def postgres_dsn(database_url: str) -> str:
    """``postgresql+psycopg://...`` (SQLAlchemy's form) as the plain ``postgresql://...`` that psycopg takes."""
    scheme, sep, rest = database_url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        shown = scheme if sep else "none"  # never the URL itself: it holds the password
        raise ConfigError(f"storage.database_url: expected postgresql+psycopg://..., got scheme {shown!r}")
    return f"postgresql://{rest}"


def open_queue(config: TrainerConfig) -> JobQueue:
    """The job queue of a trainer's storage config.

    Embedded: ``HueyQueue`` in the storage folder; fleet: ``ProcrastinateQueue`` on the catalogue's
    PostgreSQL server (its schema applied if missing).
    """
    storage = config.storage
    if isinstance(storage, EmbeddedStorageConfig):
        from .queue_huey import HueyQueue

        return HueyQueue(storage.folder)
    from .queue_pg import ProcrastinateQueue

    return ProcrastinateQueue(postgres_dsn(storage.database_url.get_secret_value()))
