"""Alembic's entry point: the trainer hands it an open connection; by hand it connects to ``-x url=...``.

When ``SqlCatalogue`` upgrades a database it passes its connection (already inside a transaction that
holds the migration lock) in ``config.attributes["connection"]``, so every revision runs in that one
transaction. Run by hand (``alembic -c .../alembic.ini -x url=...``) it opens an engine the same way
the catalogue does, so SQLite gets the same pragmas.
"""

from __future__ import annotations

import logging.config
import os

from alembic import context
from sqlalchemy.engine import Connection

from appliance.trainer.storage.schema import metadata

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True,
                      render_as_batch=connection.dialect.name == "sqlite")


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("TRAINER_DATABASE_URL")
    if not url:
        raise SystemExit("no database: pass -x url=<sqlalchemy url> or set TRAINER_DATABASE_URL")
    return url


def _run() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _configure(given)
        with context.begin_transaction():
            context.run_migrations()
        return
    if config.config_file_name is not None:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    from appliance.trainer.storage.engine import make_engine

    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


_run()
