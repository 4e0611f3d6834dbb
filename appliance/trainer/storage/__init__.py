"""The trainer's storage: ``base`` is the interface; ``open_storage`` builds the configured implementation.

* embedded: ``SqlCatalogue`` on ``<folder>/catalogue.db`` (SQLite) and ``FileBlobStore`` on ``<folder>/blobs``;
* fleet: ``SqlCatalogue`` on the PostgreSQL ``database_url`` and ``S3BlobStore`` on the configured bucket.

The implementations are imported only when opened, so an embedded trainer never loads boto3.
"""

from __future__ import annotations

from ...errors import ConfigError
from ..config import EmbeddedStorageConfig, FleetStorageConfig, TrainerConfig
from .base import BlobStore, Catalogue, Storage

__all__ = ["BlobStore", "Catalogue", "Storage", "open_storage"]


def open_storage(config: TrainerConfig | EmbeddedStorageConfig | FleetStorageConfig) -> Storage:
    """Open (and migrate) the configured storage; its ``description`` names it without secrets.

    Raises:
        ConfigError: the database or the object store cannot be opened with this configuration.

    """
    if isinstance(config, TrainerConfig):
        config = config.storage
    from .sql import SqlCatalogue

    if isinstance(config, EmbeddedStorageConfig):
        from .files import FileBlobStore

        folder = config.folder.expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"storage.folder: cannot create {folder}: {exc.strerror or exc}") from None
        catalogue = SqlCatalogue(f"sqlite:///{folder / 'catalogue.db'}")
        try:
            blobs = FileBlobStore(folder / "blobs")
        except BaseException:
            catalogue.close()
            raise
        return Storage(catalogue, blobs, f"embedded: SQLite catalogue and files in {folder}")
    from .s3 import S3BlobStore

    catalogue = SqlCatalogue(config.database_url.get_secret_value())
    try:
        blobs = S3BlobStore(config.s3)
    except BaseException:
        catalogue.close()
        raise
    return Storage(catalogue, blobs, f"fleet: catalogue {catalogue.where}, blobs in {blobs.where}")
