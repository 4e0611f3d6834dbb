"""The trainer's storage, behind one interface: a catalogue of what it knows and a blob store of bytes.

Two implementations run the same test suite (``tests/trainer/test_storage.py``):

* embedded (the default): SQLite and files in one folder, so one command starts a trainer on a laptop;
* fleet: PostgreSQL for the catalogue and an S3-compatible object store for frames and bundles,
  shared by several trainer and worker processes on several machines.

The catalogue is SQL on both (SQLAlchemy Core, schema migrations with Alembic); every write that
can arrive twice (an appliance resending after an outage or a kill -9) is idempotent by its
natural key, so retries never duplicate anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..records import (
    Appliance,
    Camera,
    Dataset,
    DatasetMember,
    DatasetRule,
    DriftEvent,
    Evaluation,
    Frame,
    FrameMeta,
    Job,
    Label,
    Model,
)


class BlobStore(ABC):
    """Bytes by key (``frames/<appliance>/<camera>/<sha256><suffix>``, ``bundles/<model id>.tar.gz``)."""

    @abstractmethod
    def put(self, key: str, data: bytes | Path) -> None:
        """Store bytes (or a file's) under ``key``, atomically: readers see all of it or nothing."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ``KeyError`` if there are none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds bytes."""

    @abstractmethod
    def download(self, key: str, target: Path) -> Path:
        """Write the bytes under ``key`` to ``target`` (for large blobs: bundles); returns ``target``."""

    def presign_put(self, key: str, expires_s: int = 900) -> str | None:
        """A URL an appliance may PUT the bytes to directly (S3), or ``None``: upload through the API."""
        return None

    def presign_get(self, key: str, expires_s: int = 900) -> str | None:
        """A URL anyone holding it may GET the bytes from (S3), or ``None``: download through the API."""
        return None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""

    def close(self) -> None:  # noqa: B027 (optional hook: a folder holds nothing open)
        """Release clients and connections."""


class Catalogue(ABC):
    """Appliances, cameras, frames, labels, drift events, datasets, jobs, models and evaluations.

    References to rows that do not exist (an unknown appliance, dataset, job or model) raise ``KeyError``;
    unknown ``**fields`` raise ``TypeError``.
    """

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    # ---------------------------------------------------------------- appliances (credentials)
    @abstractmethod
    def add_appliance(self, appliance_id: str, name: str = "") -> str:
        """Register an appliance and return its new token (shown once; only its sha256 is kept).

        Raises:
            KeyError: the id is taken.

        """

    @abstractmethod
    def rotate_token(self, appliance_id: str) -> str:
        """A new token for an appliance (the old one stops working at once)."""

    @abstractmethod
    def authenticate(self, token: str) -> str | None:
        """The appliance id a token belongs to (constant-time comparison of hashes), or ``None``; notes last_seen."""

    @abstractmethod
    def appliances(self) -> list[Appliance]:
        """Every registered appliance."""

    # ---------------------------------------------------------------- cameras
    @abstractmethod
    def upsert_camera(self, appliance_id: str, camera_id: str, **fields: Any) -> Camera:
        """Create or update a camera's row with ``fields`` (any of ``Camera``'s but the ids); returns it."""

    @abstractmethod
    def camera(self, appliance_id: str, camera_id: str) -> Camera | None:
        """One camera, or ``None``."""

    @abstractmethod
    def cameras(self, appliance_id: str | None = None) -> list[Camera]:
        """Cameras (of one appliance)."""

    # ---------------------------------------------------------------- frames
    @abstractmethod
    def add_frame(self, appliance_id: str, meta: FrameMeta, blob: str, at: float) -> bool:
        """Record a frame whose bytes are in the blob store; ``False`` if that inspection was recorded already.

        The key is ``(appliance_id, inspection_id)``: a resend after an outage or a kill -9 changes nothing.
        """

    @abstractmethod
    def frames(self, appliance_id: str, camera_id: str | None = None, *, since: float | None = None,
               until: float | None = None, verdicts: Sequence[str] | None = None, limit: int | None = None
               ) -> list[Frame]:
        """Frames of an appliance (camera, capture-time window, verdicts), oldest first."""

    @abstractmethod
    def frame_count(self, appliance_id: str | None = None) -> int:
        """How many frames (of one appliance)."""

    # ---------------------------------------------------------------- labels and drift
    @abstractmethod
    def upsert_label(self, appliance_id: str, label: Label) -> None:
        """Record a label or its undoing (same id: the newer state wins, ``undone_at`` is never unset)."""

    @abstractmethod
    def labels(self, appliance_id: str, camera_id: str | None = None, *, active_only: bool = True) -> list[Label]:
        """Labels of an appliance (camera), oldest first; without the undone ones unless asked."""

    @abstractmethod
    def add_drift_event(self, appliance_id: str, event: DriftEvent) -> bool:
        """Record a drift event (idempotent by id); ``False`` if it was recorded already. Updates the camera's state."""

    @abstractmethod
    def drift_events(self, appliance_id: str, camera_id: str | None = None) -> list[DriftEvent]:
        """Drift events, oldest first."""

    # ---------------------------------------------------------------- datasets
    @abstractmethod
    def add_dataset(self, appliance_id: str, camera_id: str, rule: DatasetRule, members: Iterable[DatasetMember],
                    at: float) -> Dataset:
        """A new version of the camera's dataset (version = previous + 1), with its members and their digest.

        If the newest version has the same digest, that version is returned instead (no duplicate).
        """

    @abstractmethod
    def dataset(self, dataset_id: int) -> Dataset | None:
        """One dataset version."""

    @abstractmethod
    def dataset_members(self, dataset_id: int) -> list[DatasetMember]:
        """A version's members, in a stable order (split, then inspection id)."""

    @abstractmethod
    def datasets(self, appliance_id: str | None = None, camera_id: str | None = None) -> list[Dataset]:
        """Dataset versions, newest first."""

    # ---------------------------------------------------------------- jobs
    @abstractmethod
    def add_job(self, appliance_id: str, camera_id: str, reason: str, status: str, at: float,
                detail: str | None = None) -> Job:
        """A new rebuild job."""

    @abstractmethod
    def update_job(self, job_id: int, **fields: Any) -> Job:
        """Change a job's fields and return it.

        The fields: status, started_at, finished_at, attempts, dataset_id, model_id, detail, approved_by.

        Raises:
            KeyError: no such job.

        """

    @abstractmethod
    def job(self, job_id: int) -> Job | None:
        """One job."""

    @abstractmethod
    def jobs(self, *, status: Sequence[str] | None = None, appliance_id: str | None = None,
             camera_id: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first."""

    # ---------------------------------------------------------------- models and evaluations
    @abstractmethod
    def add_model(self, model: Model) -> Model:
        """Record a model (its id is the bundle's model id; recording it again updates it)."""

    @abstractmethod
    def model(self, model_id: str) -> Model | None:
        """One model."""

    @abstractmethod
    def models(self, appliance_id: str | None = None, camera_id: str | None = None,
               status: str | None = None) -> list[Model]:
        """Models, newest first."""

    @abstractmethod
    def add_evaluation(self, model_id: str, baseline_model_id: str | None, dataset_id: int, passed: bool,
                       metrics: dict[str, Any], at: float) -> Evaluation:
        """Keep one gate evaluation (every one is kept and shown)."""

    @abstractmethod
    def evaluations(self, model_id: str | None = None) -> list[Evaluation]:
        """Evaluations, newest first."""


class Storage:
    """A catalogue and a blob store that belong together (embedded: one folder; fleet: PostgreSQL + S3).

    A context manager: ``with open_storage(config) as storage:`` closes both parts.
    """

    def __init__(self, catalogue: Catalogue, blobs: BlobStore, description: str) -> None:
        self.catalogue = catalogue
        self.blobs = blobs
        self.description = description

    def close(self) -> None:
        """Release both parts' connections and clients."""
        try:
            self.catalogue.close()
        finally:
            self.blobs.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
