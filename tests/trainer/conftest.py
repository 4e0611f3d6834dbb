"""Storage of both kinds for the trainer's tests (the servers behind the fleet kind: ``tests/servers.py``).

* ``storage_config`` / ``storage``: parametrised ``embedded`` and ``fleet``, so a test written once runs
  against SQLite + files and against PostgreSQL + S3; ``catalogue_url`` likewise for the catalogue alone.

A missing server program skips the fleet tests that need it, with the reason; the embedded ones still run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from appliance.trainer.config import EmbeddedStorageConfig, FleetStorageConfig
from appliance.trainer.storage import Storage, open_storage

KINDS = ["embedded", "fleet"]


# ---------------------------------------------------------------------------------------------- both kinds
@pytest.fixture(params=KINDS)
def storage_config(request: pytest.FixtureRequest, tmp_path: Path) -> EmbeddedStorageConfig | FleetStorageConfig:
    """A storage configuration of each kind: embedded (a temporary folder) and fleet (the session's servers)."""
    if request.param == "embedded":
        return EmbeddedStorageConfig(folder=tmp_path / "trainer")
    return FleetStorageConfig(database_url=SecretStr(request.getfixturevalue("postgres_url")),
                              s3=request.getfixturevalue("seaweed_s3"))


@pytest.fixture
def storage(storage_config: EmbeddedStorageConfig | FleetStorageConfig) -> Iterator[Storage]:
    """An opened ``Storage`` of each kind (``storage.catalogue``, ``storage.blobs``), closed after the test."""
    opened = open_storage(storage_config)
    yield opened
    opened.close()


@pytest.fixture(params=KINDS)
def catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty catalogue database of each kind (SQLite file, PostgreSQL database)."""
    if request.param == "embedded":
        return f"sqlite:///{tmp_path / 'catalogue.db'}"
    return request.getfixturevalue("postgres_url")
