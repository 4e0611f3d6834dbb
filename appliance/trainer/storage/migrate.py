"""Bring a catalogue database to the schema this trainer knows: Alembic's ``upgrade head``, run in code.

Every process that opens the catalogue calls ``upgrade``; the first one migrates, the others find the
database at head and do nothing. Concurrent openers are serialised by a lock held for the migration's
transaction (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``). A database stamped with a
revision this trainer does not know was migrated by a newer trainer, and is refused rather than guessed at.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from ...errors import ConfigError

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
#: Key of the PostgreSQL advisory lock that serialises migrations (any fixed 64-bit number).
_PG_LOCK = 0x7472_6169_6E65_72  # "trainer"


def alembic_config(extra_versions: Sequence[Path] = ()) -> Config:
    """Alembic's settings for the packaged migrations (plus ``extra_versions`` folders: tests of later revisions)."""
    cfg = Config()
    # set_main_option interpolates '%': escape it in paths.
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    folders = [MIGRATIONS / "versions", *(Path(p) for p in extra_versions)]
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in folders).replace("%", "%%"))
    return cfg


def current_revisions(connection: sa.Connection) -> tuple[str, ...]:
    """The revisions a database is stamped with (empty for a new database)."""
    return tuple(MigrationContext.configure(connection).get_current_heads())


def upgrade(engine: sa.Engine, where: str, extra_versions: Sequence[Path] = ()) -> None:
    """Migrate the database behind ``engine`` to head; ``where`` names it (without secrets) in errors.

    Raises:
        ConfigError: the database carries a revision this trainer does not know (a newer trainer's).

    """
    cfg = alembic_config(extra_versions)
    script = ScriptDirectory.from_config(cfg)
    known = {rev.revision for rev in script.walk_revisions()}
    heads = tuple(script.get_heads())
    with engine.connect() as connection:
        connection.execution_options(catalogue_write=True)  # SQLite: BEGIN IMMEDIATE (see sql.py)
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
            current = current_revisions(connection)
            unknown = [rev for rev in current if rev not in known]
            if unknown:
                raise ConfigError(
                    f"catalogue {where}: its schema is at revision {', '.join(unknown)}, which this trainer does "
                    f"not know (it knows up to {', '.join(heads)}); it was written by a newer trainer: upgrade "
                    f"this trainer's software, or point it at another database")
            if set(current) == set(heads):
                return
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "heads")
