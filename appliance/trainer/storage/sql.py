"""The catalogue on SQL (SQLAlchemy Core): one implementation for SQLite (embedded) and PostgreSQL (fleet).

Idempotency lives in the schema: every write an appliance can repeat is keyed by the appliance's own
id (inspection, label, drift event) and written with ``INSERT ... ON CONFLICT``, so a resend after an
outage, or two workers racing, can neither duplicate a row nor fail. A dataset version is numbered
under the unique (appliance, camera, version) constraint: the loser of a race retries and finds the
winner's version. Records come back as the pydantic models of ``records``; lists are ordered in Python
where the order is by text, so that SQLite and PostgreSQL (whose collation follows its locale) agree.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, get_args

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ...errors import ConfigError
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
from . import schema as t
from .base import Catalogue
from .engine import describe_url, make_engine
from .migrate import upgrade

#: ``authenticate`` writes an appliance's last_seen at most this often (a busy appliance must not
#: turn every request into a write).
LAST_SEEN_EVERY_S = 60.0
#: Tries of ``add_dataset`` when another process takes the version number it wanted.
_DATASET_TRIES = 8
_CAMERA_FIELDS = frozenset(Camera.model_fields) - {"appliance_id", "camera_id"}
_JOB_FIELDS = frozenset({"status", "started_at", "finished_at", "attempts", "dataset_id", "model_id", "detail",
                         "approved_by"})
SPLITS: tuple[str, ...] = get_args(DatasetMember.model_fields["split"].annotation)


def token_hash(token: str) -> str:
    """The sha256 (hex) of an appliance token: the only form in which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def dataset_digest(members: Iterable[DatasetMember]) -> str:
    """sha256 over the members as sorted (split, inspection id, frame) triples, one JSON array per line."""
    digest = hashlib.sha256()
    for triple in sorted((m.split, m.inspection_id, m.frame) for m in members):
        digest.update(json.dumps(triple, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def _without_id(row: sa.RowMapping) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "id"}


class SqlCatalogue(Catalogue):
    """The catalogue in the database at ``url``, migrated to this trainer's schema when opened.

    Raises (when opening):
        ConfigError: the database cannot be reached, or was migrated by a newer trainer.

    """

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.where = describe_url(self.engine.url)
        is_pg = self.engine.dialect.name == "postgresql"
        self._insert = postgresql.insert if is_pg else sqlite.insert
        try:
            upgrade(self.engine, self.where)
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            raise ConfigError(f"catalogue {self.where}: cannot open the database: "
                              f"{str(exc.orig).strip().splitlines()[0]}") from None
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"SqlCatalogue({self.where!r})"

    # ---------------------------------------------------------------- plumbing
    @contextmanager
    def _write(self, what: str | None = None) -> Iterator[sa.Connection]:
        """A write transaction; given ``what``, a broken reference (an unknown appliance, dataset...) is a KeyError.

        Conflicts on natural keys are settled by ``ON CONFLICT`` in the statements themselves, so an
        integrity error left over here is a reference to something the catalogue does not hold.
        """
        try:
            with self.engine.connect() as connection:
                connection.execution_options(catalogue_write=True)
                with connection.begin():
                    yield connection
        except sa.exc.IntegrityError as exc:
            if what is None:
                raise
            raise KeyError(f"{what}: {str(exc.orig).strip().splitlines()[0]}") from None

    def _all(self, query: sa.Select) -> list[sa.RowMapping]:
        with self.engine.connect() as connection:
            return list(connection.execute(query).mappings())

    def _ensure_camera(self, connection: sa.Connection, appliance_id: str, camera_id: str) -> None:
        """Create the camera's row if the appliance sends data for a camera the trainer has not seen yet."""
        row = Camera(appliance_id=appliance_id, camera_id=camera_id, updated_at=time.time()).model_dump()
        connection.execute(self._insert(t.cameras).values(**row).on_conflict_do_nothing(
            index_elements=[t.cameras.c.appliance_id, t.cameras.c.camera_id]))

    # ---------------------------------------------------------------- appliances (credentials)
    def add_appliance(self, appliance_id: str, name: str = "") -> str:
        """Register an appliance; returns its token (only the token's sha256 is stored)."""
        record = Appliance(id=appliance_id, name=name, created_at=time.time())
        token = secrets.token_urlsafe(32)
        try:
            with self._write() as c:
                c.execute(t.appliances.insert().values(**record.model_dump(exclude={"last_seen"}),
                                                       token_sha256=token_hash(token)))
        except sa.exc.IntegrityError:
            raise KeyError(f"appliance {appliance_id!r} is registered already") from None
        return token

    def rotate_token(self, appliance_id: str) -> str:
        """A new token; the old one stops working with this commit."""
        token = secrets.token_urlsafe(32)
        with self._write() as c:
            done = c.execute(t.appliances.update().where(t.appliances.c.id == appliance_id)
                             .values(token_sha256=token_hash(token)))
            if done.rowcount != 1:
                raise KeyError(f"appliance {appliance_id!r} is not registered")
        return token

    def authenticate(self, token: str) -> str | None:
        """The appliance holding ``token`` (looked up by hash, compared in constant time), or ``None``."""
        if not isinstance(token, str) or not token:
            return None
        digest = token_hash(token)
        a = t.appliances.c
        rows = self._all(sa.select(a.id, a.token_sha256, a.last_seen).where(a.token_sha256 == digest))
        if not rows or not hmac.compare_digest(rows[0]["token_sha256"], digest):
            return None
        appliance_id, last_seen, now = rows[0]["id"], rows[0]["last_seen"], time.time()
        if last_seen is None or now - last_seen >= LAST_SEEN_EVERY_S:
            with self._write() as c:  # conditional, so racing requests write it once
                c.execute(t.appliances.update().values(last_seen=now).where(
                    a.id == appliance_id, sa.or_(a.last_seen.is_(None), a.last_seen <= now - LAST_SEEN_EVERY_S)))
        return appliance_id

    def appliances(self) -> list[Appliance]:
        """Every registered appliance, by id."""
        a = t.appliances.c
        rows = self._all(sa.select(a.id, a.name, a.created_at, a.last_seen))
        return sorted((Appliance.model_validate(dict(r)) for r in rows), key=lambda x: x.id)

    # ---------------------------------------------------------------- cameras
    def upsert_camera(self, appliance_id: str, camera_id: str, **fields: Any) -> Camera:
        """Create or update a camera with ``fields``; ``updated_at`` is now unless given.

        Raises:
            TypeError: a field that ``Camera`` does not have (or an id).
            KeyError: the appliance is not registered.

        """
        unknown = set(fields) - _CAMERA_FIELDS
        if unknown:
            raise TypeError(f"upsert_camera: unknown fields {sorted(unknown)}")
        fields.setdefault("updated_at", time.time())
        row = Camera(appliance_id=appliance_id, camera_id=camera_id, **fields).model_dump()
        stmt = self._insert(t.cameras).values(**row).on_conflict_do_update(
            index_elements=[t.cameras.c.appliance_id, t.cameras.c.camera_id], set_={k: row[k] for k in fields})
        with self._write(f"camera {camera_id!r} of appliance {appliance_id!r}") as c:
            c.execute(stmt)
            return self._camera(c, appliance_id, camera_id)

    @staticmethod
    def _camera(connection: sa.Connection, appliance_id: str, camera_id: str) -> Camera | None:
        c = t.cameras.c
        row = connection.execute(sa.select(t.cameras).where(c.appliance_id == appliance_id,
                                                            c.camera_id == camera_id)).mappings().first()
        return None if row is None else Camera.model_validate(dict(row))

    def camera(self, appliance_id: str, camera_id: str) -> Camera | None:
        """One camera, or ``None``."""
        with self.engine.connect() as connection:
            return self._camera(connection, appliance_id, camera_id)

    def cameras(self, appliance_id: str | None = None) -> list[Camera]:
        """Cameras (of one appliance), by appliance then camera id."""
        query = sa.select(t.cameras)
        if appliance_id is not None:
            query = query.where(t.cameras.c.appliance_id == appliance_id)
        records = (Camera.model_validate(dict(r)) for r in self._all(query))
        return sorted(records, key=lambda x: (x.appliance_id, x.camera_id))

    # ---------------------------------------------------------------- frames
    def add_frame(self, appliance_id: str, meta: FrameMeta, blob: str, at: float) -> bool:
        """Record a frame; ``False`` if its inspection was recorded already (nothing changes then)."""
        row = Frame(**meta.model_dump(), appliance_id=appliance_id, blob=blob, uploaded_at=at).model_dump()
        stmt = self._insert(t.frames).values(**row).on_conflict_do_nothing(
            index_elements=[t.frames.c.appliance_id, t.frames.c.inspection_id]).returning(t.frames.c.id)
        with self._write(f"frame {meta.inspection_id!r} of appliance {appliance_id!r}") as c:
            self._ensure_camera(c, appliance_id, meta.camera_id)
            return c.execute(stmt).first() is not None  # RETURNING yields no row when the insert was skipped

    @staticmethod
    def _frames_where(query: sa.Select, appliance_id: str | None, camera_id: str | None = None) -> sa.Select:
        if appliance_id is not None:
            query = query.where(t.frames.c.appliance_id == appliance_id)
        if camera_id is not None:
            query = query.where(t.frames.c.camera_id == camera_id)
        return query

    def frames(self, appliance_id: str, camera_id: str | None = None, *, since: float | None = None,
               until: float | None = None, verdicts: Sequence[str] | None = None, limit: int | None = None
               ) -> list[Frame]:
        """Frames captured in ``[since, until)`` (either end open when ``None``), oldest first."""
        f = t.frames.c
        query = self._frames_where(sa.select(t.frames), appliance_id, camera_id)
        if since is not None:
            query = query.where(f.captured_at >= since)
        if until is not None:
            query = query.where(f.captured_at < until)
        if verdicts is not None:
            query = query.where(f.verdict.in_(list(verdicts)))
        query = query.order_by(f.captured_at, f.id).limit(limit)
        return [Frame.model_validate(_without_id(r)) for r in self._all(query)]

    def frame_count(self, appliance_id: str | None = None) -> int:
        """How many frames (of one appliance)."""
        query = self._frames_where(sa.select(sa.func.count()).select_from(t.frames), appliance_id)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    # ---------------------------------------------------------------- labels and drift
    def upsert_label(self, appliance_id: str, label: Label) -> None:
        """Record a label; a resend changes nothing, an undo sets ``undone_at`` and nothing ever unsets it."""
        row = {**label.model_dump(), "appliance_id": appliance_id}
        stmt = self._insert(t.labels).values(**row)
        kept = {k: stmt.excluded[k] for k in ("camera_id", "inspection_id", "label", "note", "who", "at")}
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.labels.c.appliance_id, t.labels.c.id],
            set_={**kept, "undone_at": sa.func.coalesce(t.labels.c.undone_at, stmt.excluded.undone_at)})
        with self._write(f"label {label.id!r} of appliance {appliance_id!r}") as c:
            self._ensure_camera(c, appliance_id, label.camera_id)
            c.execute(stmt)

    def labels(self, appliance_id: str, camera_id: str | None = None, *, active_only: bool = True) -> list[Label]:
        """Labels by time, oldest first; undone ones only when ``active_only`` is false."""
        c = t.labels.c
        query = sa.select(t.labels).where(c.appliance_id == appliance_id).order_by(c.at, c.id)
        if camera_id is not None:
            query = query.where(c.camera_id == camera_id)
        if active_only:
            query = query.where(c.undone_at.is_(None))
        return [Label.model_validate({k: v for k, v in r.items() if k != "appliance_id"}) for r in self._all(query)]

    def add_drift_event(self, appliance_id: str, event: DriftEvent) -> bool:
        """Record a drift event; the camera's drift state follows the newest event (by ``at``) recorded."""
        stmt = self._insert(t.drift_events).values(**event.model_dump(), appliance_id=appliance_id)
        stmt = stmt.on_conflict_do_nothing(index_elements=[t.drift_events.c.appliance_id, t.drift_events.c.id]
                                           ).returning(t.drift_events.c.id)
        c = t.cameras.c
        follow = t.cameras.update().where(
            c.appliance_id == appliance_id, c.camera_id == event.camera_id,
            sa.or_(c.drift_at.is_(None), c.drift_at <= event.at),
        ).values(drift_state="drift" if event.kind == "drift_raised" else "ok", drift_at=event.at,
                 updated_at=time.time())
        with self._write(f"drift event {event.id!r} of appliance {appliance_id!r}") as conn:
            self._ensure_camera(conn, appliance_id, event.camera_id)
            if conn.execute(stmt).first() is None:
                return False
            conn.execute(follow)
            return True

    def drift_events(self, appliance_id: str, camera_id: str | None = None) -> list[DriftEvent]:
        """Drift events by time, oldest first."""
        d = t.drift_events.c
        query = sa.select(t.drift_events).where(d.appliance_id == appliance_id).order_by(d.at, d.id)
        if camera_id is not None:
            query = query.where(d.camera_id == camera_id)
        return [DriftEvent.model_validate({k: v for k, v in r.items() if k != "appliance_id"})
                for r in self._all(query)]

    # ---------------------------------------------------------------- datasets
    def add_dataset(self, appliance_id: str, camera_id: str, rule: DatasetRule, members: Iterable[DatasetMember],
                    at: float) -> Dataset:
        """The next version of the camera's dataset, or the newest one if its members are the same.

        Raises:
            ValueError: an inspection appears twice among the members.
            KeyError: the appliance is not registered.

        """
        members = list(members)
        if len({m.inspection_id for m in members}) != len(members):
            raise ValueError(f"dataset of camera {camera_id!r}: an inspection appears twice among its members")
        digest = dataset_digest(members)
        counts = dict.fromkeys(SPLITS, 0)
        for member in members:
            counts[member.split] += 1
        d = t.datasets.c
        newest = (sa.select(t.datasets).where(d.appliance_id == appliance_id, d.camera_id == camera_id)
                  .order_by(d.version.desc()).limit(1))
        for _ in range(_DATASET_TRIES):
            try:
                with self._write() as c:
                    last = c.execute(newest).mappings().first()
                    if last is not None and last["digest"] == digest:
                        return self._dataset(last)
                    row = {"appliance_id": appliance_id, "camera_id": camera_id,
                           "version": 1 if last is None else last["version"] + 1,
                           "rule": rule.model_dump(mode="json"), "digest": digest, "counts": counts,
                           "created_at": at}
                    dataset_id = c.execute(t.datasets.insert().values(**row)).inserted_primary_key[0]
                    if members:
                        c.execute(t.dataset_members.insert(),
                                  [{"dataset_id": dataset_id, **m.model_dump()} for m in members])
                    return Dataset(id=dataset_id, **row)
            except sa.exc.IntegrityError:
                # Another process took this version number in the meantime: look again (or no such appliance).
                if not self._exists(t.appliances, t.appliances.c.id == appliance_id):
                    raise KeyError(f"dataset of camera {camera_id!r}: appliance {appliance_id!r} is not "
                                   f"registered") from None
        raise RuntimeError(f"dataset of camera {camera_id!r}: {_DATASET_TRIES} tries lost the race for a "
                           f"version number")

    def _exists(self, table: sa.Table, *where: sa.ColumnElement[bool]) -> bool:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(sa.literal(1)).select_from(table).where(*where)).first() is not None

    @staticmethod
    def _dataset(row: sa.RowMapping) -> Dataset:
        return Dataset.model_validate(dict(row))

    def dataset(self, dataset_id: int) -> Dataset | None:
        """One dataset version, or ``None``."""
        rows = self._all(sa.select(t.datasets).where(t.datasets.c.id == dataset_id))
        return self._dataset(rows[0]) if rows else None

    def dataset_members(self, dataset_id: int) -> list[DatasetMember]:
        """A version's members by split, then inspection id (code point order on every database)."""
        m = t.dataset_members.c
        rows = self._all(sa.select(m.frame, m.inspection_id, m.split).where(m.dataset_id == dataset_id))
        return sorted((DatasetMember.model_validate(dict(r)) for r in rows), key=lambda x: (x.split, x.inspection_id))

    def datasets(self, appliance_id: str | None = None, camera_id: str | None = None) -> list[Dataset]:
        """Dataset versions, newest first."""
        d = t.datasets.c
        query = sa.select(t.datasets).order_by(d.created_at.desc(), d.id.desc())
        if appliance_id is not None:
            query = query.where(d.appliance_id == appliance_id)
        if camera_id is not None:
            query = query.where(d.camera_id == camera_id)
        return [self._dataset(r) for r in self._all(query)]

    # ---------------------------------------------------------------- jobs
    def add_job(self, appliance_id: str, camera_id: str, reason: str, status: str, at: float,
                detail: str | None = None) -> Job:
        """A new job (its id is the database's next one)."""
        row = Job(id=0, appliance_id=appliance_id, camera_id=camera_id, reason=reason, status=status,
                  created_at=at, detail=detail).model_dump(exclude={"id"})
        with self._write(f"job for camera {camera_id!r} of appliance {appliance_id!r}") as c:
            job_id = c.execute(t.jobs.insert().values(**row)).inserted_primary_key[0]
        return Job(id=job_id, **row)

    def update_job(self, job_id: int, **fields: Any) -> Job:
        """Change a job's fields (validated as a ``Job``); returns the job as stored.

        Raises:
            KeyError: no such job (or the dataset it is given does not exist).
            TypeError: a field that cannot be changed.

        """
        unknown = set(fields) - _JOB_FIELDS
        if unknown:
            raise TypeError(f"update_job: fields {sorted(unknown)} cannot be changed")
        with self._write(f"job {job_id}") as c:
            row = c.execute(sa.select(t.jobs).where(t.jobs.c.id == job_id).with_for_update()).mappings().first()
            if row is None:
                raise KeyError(f"job {job_id}: no such job")
            job = Job.model_validate({**row, **fields})
            if fields:
                c.execute(t.jobs.update().where(t.jobs.c.id == job_id).values(**{k: getattr(job, k) for k in fields}))
            return job

    def job(self, job_id: int) -> Job | None:
        """One job, or ``None``."""
        rows = self._all(sa.select(t.jobs).where(t.jobs.c.id == job_id))
        return Job.model_validate(dict(rows[0])) if rows else None

    def jobs(self, *, status: Sequence[str] | None = None, appliance_id: str | None = None,
             camera_id: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first."""
        j = t.jobs.c
        query = sa.select(t.jobs).order_by(j.created_at.desc(), j.id.desc()).limit(limit)
        if status is not None:
            query = query.where(j.status.in_(list(status)))
        if appliance_id is not None:
            query = query.where(j.appliance_id == appliance_id)
        if camera_id is not None:
            query = query.where(j.camera_id == camera_id)
        return [Job.model_validate(dict(r)) for r in self._all(query)]

    # ---------------------------------------------------------------- models and evaluations
    def add_model(self, model: Model) -> Model:
        """Record a model, or update every field of the one with its id.

        Raises:
            KeyError: its appliance, dataset or job does not exist.

        """
        row = model.model_dump()
        stmt = self._insert(t.models).values(**row)
        stmt = stmt.on_conflict_do_update(index_elements=[t.models.c.id],
                                          set_={k: stmt.excluded[k] for k in row if k != "id"})
        with self._write(f"model {model.id!r}") as c:
            c.execute(stmt)
        return model

    def model(self, model_id: str) -> Model | None:
        """One model, or ``None``."""
        rows = self._all(sa.select(t.models).where(t.models.c.id == model_id))
        return Model.model_validate(dict(rows[0])) if rows else None

    def models(self, appliance_id: str | None = None, camera_id: str | None = None,
               status: str | None = None) -> list[Model]:
        """Models, newest first."""
        m = t.models.c
        query = sa.select(t.models).order_by(m.created_at.desc(), m.id.desc())
        for column, value in ((m.appliance_id, appliance_id), (m.camera_id, camera_id), (m.status, status)):
            if value is not None:
                query = query.where(column == value)
        return [Model.model_validate(dict(r)) for r in self._all(query)]

    def add_evaluation(self, model_id: str, baseline_model_id: str | None, dataset_id: int, passed: bool,
                       metrics: dict[str, Any], at: float) -> Evaluation:
        """Keep a gate evaluation.

        Raises:
            KeyError: the model or the dataset is not in the catalogue.

        """
        row = Evaluation(id=0, model_id=model_id, baseline_model_id=baseline_model_id, dataset_id=dataset_id,
                         passed=passed, metrics=t.finite(metrics), created_at=at).model_dump(exclude={"id"})
        with self._write(f"evaluation of model {model_id!r}") as c:
            evaluation_id = c.execute(t.evaluations.insert().values(**row)).inserted_primary_key[0]
        return Evaluation(id=evaluation_id, **row)

    def evaluations(self, model_id: str | None = None) -> list[Evaluation]:
        """Evaluations, newest first."""
        e = t.evaluations.c
        query = sa.select(t.evaluations).order_by(e.created_at.desc(), e.id.desc())
        if model_id is not None:
            query = query.where(e.model_id == model_id)
        return [Evaluation.model_validate(dict(r)) for r in self._all(query)]
