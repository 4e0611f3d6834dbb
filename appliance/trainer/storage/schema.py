"""The catalogue's tables as SQLAlchemy Core objects: what the queries in ``sql.py`` are written against.

The migrations (``appliance/trainer/migrations/versions``) create these tables with frozen copies of
the definitions; a test compares a migrated database with this module so the two never drift apart.
Every appliance-scoped table is keyed by the appliance's own ids (inspection, label, event), which is
what makes a resend idempotent. Times are float seconds since the epoch, as in ``records``.
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

#: Constraint names spelled the same on every database, so later migrations can refer to them.
NAMING = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}

#: Surrogate ids: 64-bit on PostgreSQL; SQLite autoincrements only a column declared plain INTEGER.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.Double()


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (nested in lists and dicts) replaced by ``None``.

    JSON has no NaN: PostgreSQL refuses it outright while SQLite would keep Python's non-standard
    ``NaN``; mapping both to null makes the two catalogues store (and return) the same document.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class Document(sa.TypeDecorator):
    """A JSON document (settings, reasons, statistics, metrics): JSONB on PostgreSQL, JSON text on SQLite."""

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine:
        """JSONB where the database has it."""
        return dialect.type_descriptor(postgresql.JSONB() if dialect.name == "postgresql" else sa.JSON())

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        """Non-finite floats become null (see ``finite``)."""
        return finite(value)


DOC = Document()

metadata = sa.MetaData(naming_convention=NAMING)


def _appliance_fk() -> sa.ForeignKey:
    return sa.ForeignKey("appliances.id")


appliances = sa.Table(
    "appliances", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(), nullable=False, server_default=""),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", TIME, nullable=False),
    sa.Column("last_seen", TIME),
)

cameras = sa.Table(
    "cameras", metadata,
    sa.Column("appliance_id", sa.String(64), _appliance_fk(), primary_key=True),
    sa.Column("camera_id", sa.String(), primary_key=True),
    sa.Column("model_id", sa.String()),
    sa.Column("drift_state", sa.String()),
    sa.Column("drift_at", TIME),
    sa.Column("policy", sa.String(), nullable=False),
    sa.Column("backend", sa.String(), nullable=True),
    sa.Column("settings", DOC, nullable=False),
    sa.Column("schedule", sa.String()),
    sa.Column("updated_at", TIME),
)

frames = sa.Table(
    "frames", metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("appliance_id", sa.String(64), _appliance_fk(), nullable=False),
    sa.Column("camera_id", sa.String(), nullable=False),
    sa.Column("inspection_id", sa.String(), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("suffix", sa.String(8), nullable=False),
    sa.Column("size", sa.BigInteger(), nullable=False),
    sa.Column("captured_at", TIME, nullable=False),
    sa.Column("verdict", sa.String(8), nullable=False),
    sa.Column("score", TIME),
    sa.Column("raw_score", TIME),
    sa.Column("threshold", TIME),
    sa.Column("model_id", sa.String()),
    sa.Column("reasons", DOC, nullable=False),
    sa.Column("blob", sa.String(), nullable=False),
    sa.Column("uploaded_at", TIME, nullable=False),
    sa.UniqueConstraint("appliance_id", "inspection_id"),
    sa.Index(None, "appliance_id", "camera_id", "captured_at"),
)

labels = sa.Table(
    "labels", metadata,
    sa.Column("appliance_id", sa.String(64), _appliance_fk(), primary_key=True),
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("camera_id", sa.String(), nullable=False),
    sa.Column("inspection_id", sa.String(), nullable=False),
    sa.Column("label", sa.String(8), nullable=False),
    sa.Column("note", sa.Text()),
    sa.Column("who", sa.String(), nullable=False),
    sa.Column("at", TIME, nullable=False),
    sa.Column("undone_at", TIME),
    sa.Index(None, "appliance_id", "camera_id", "at"),
)

drift_events = sa.Table(
    "drift_events", metadata,
    sa.Column("appliance_id", sa.String(64), _appliance_fk(), primary_key=True),
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("camera_id", sa.String(), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("at", TIME, nullable=False),
    sa.Column("stats", DOC, nullable=False),
    sa.Index(None, "appliance_id", "camera_id", "at"),
)

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("appliance_id", sa.String(64), _appliance_fk(), nullable=False),
    sa.Column("camera_id", sa.String(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("rule", DOC, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("counts", DOC, nullable=False),
    sa.Column("created_at", TIME, nullable=False),
    sa.UniqueConstraint("appliance_id", "camera_id", "version"),
)

dataset_members = sa.Table(
    "dataset_members", metadata,
    sa.Column("dataset_id", ID, sa.ForeignKey("datasets.id"), primary_key=True),
    sa.Column("inspection_id", sa.String(), primary_key=True),
    sa.Column("frame", sa.String(), nullable=False),
    sa.Column("split", sa.String(16), nullable=False),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("appliance_id", sa.String(64), _appliance_fk(), nullable=False),
    sa.Column("camera_id", sa.String(), nullable=False),
    sa.Column("reason", sa.String(16), nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("created_at", TIME, nullable=False),
    sa.Column("started_at", TIME),
    sa.Column("finished_at", TIME),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("dataset_id", ID, sa.ForeignKey("datasets.id")),
    sa.Column("model_id", sa.String()),
    sa.Column("detail", sa.Text()),
    sa.Column("approved_by", sa.String()),
    sa.Index(None, "status"),
    sa.Index(None, "appliance_id", "camera_id"),
)

models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("appliance_id", sa.String(64), _appliance_fk(), nullable=False),
    sa.Column("camera_id", sa.String(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", TIME, nullable=False),
    sa.Column("dataset_id", ID, sa.ForeignKey("datasets.id")),
    sa.Column("job_id", ID, sa.ForeignKey("jobs.id")),
    sa.Column("bundle", sa.String()),
    sa.Column("detail", sa.Text()),
    sa.Index(None, "appliance_id", "camera_id"),
)

evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.String(), sa.ForeignKey("models.id"), nullable=False),
    sa.Column("baseline_model_id", sa.String()),
    sa.Column("dataset_id", ID, sa.ForeignKey("datasets.id"), nullable=False),
    sa.Column("passed", sa.Boolean(), nullable=False),
    sa.Column("metrics", DOC, nullable=False),
    sa.Column("created_at", TIME, nullable=False),
    sa.Index(None, "model_id"),
)
