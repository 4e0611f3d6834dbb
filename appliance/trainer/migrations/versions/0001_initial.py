"""The first catalogue: appliances, cameras, frames, labels, drift events, datasets, jobs, models, evaluations.

Revision ID: 0001
Revises:
Create Date: 2026-12-07

The definitions are frozen copies of ``storage/schema.py`` as it was at this revision (a migration
must keep doing what it did when the schema moves on), with every constraint named explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.Double()
APPLIANCE = sa.String(64)


def _to_appliances(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["appliance_id"], ["appliances.id"], name=f"fk_{table}_appliance_id_appliances")


def upgrade() -> None:
    """Create every table of the first catalogue."""
    op.create_table(
        "appliances",
        sa.Column("id", APPLIANCE, nullable=False),
        sa.Column("name", sa.String(), nullable=False, server_default=""),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("last_seen", TIME),
        sa.PrimaryKeyConstraint("id", name="pk_appliances"),
        sa.UniqueConstraint("token_sha256", name="uq_appliances_token_sha256"),
    )
    op.create_table(
        "cameras",
        sa.Column("appliance_id", APPLIANCE, nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("model_id", sa.String()),
        sa.Column("drift_state", sa.String()),
        sa.Column("drift_at", TIME),
        sa.Column("policy", sa.String(), nullable=False),
        sa.Column("backend", sa.String(), nullable=True),
        sa.Column("settings", DOC, nullable=False),
        sa.Column("schedule", sa.String()),
        sa.Column("updated_at", TIME),
        sa.PrimaryKeyConstraint("appliance_id", "camera_id", name="pk_cameras"),
        _to_appliances("cameras"),
    )
    op.create_table(
        "frames",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("appliance_id", APPLIANCE, nullable=False),
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
        sa.PrimaryKeyConstraint("id", name="pk_frames"),
        sa.UniqueConstraint("appliance_id", "inspection_id", name="uq_frames_appliance_id_inspection_id"),
        _to_appliances("frames"),
    )
    op.create_index("ix_frames_appliance_id_camera_id_captured_at", "frames",
                    ["appliance_id", "camera_id", "captured_at"])
    op.create_table(
        "labels",
        sa.Column("appliance_id", APPLIANCE, nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("inspection_id", sa.String(), nullable=False),
        sa.Column("label", sa.String(8), nullable=False),
        sa.Column("note", sa.Text()),
        sa.Column("who", sa.String(), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("undone_at", TIME),
        sa.PrimaryKeyConstraint("appliance_id", "id", name="pk_labels"),
        _to_appliances("labels"),
    )
    op.create_index("ix_labels_appliance_id_camera_id_at", "labels", ["appliance_id", "camera_id", "at"])
    op.create_table(
        "drift_events",
        sa.Column("appliance_id", APPLIANCE, nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("stats", DOC, nullable=False),
        sa.PrimaryKeyConstraint("appliance_id", "id", name="pk_drift_events"),
        _to_appliances("drift_events"),
    )
    op.create_index("ix_drift_events_appliance_id_camera_id_at", "drift_events", ["appliance_id", "camera_id", "at"])
    op.create_table(
        "datasets",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("appliance_id", APPLIANCE, nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("rule", DOC, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("counts", DOC, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_datasets"),
        sa.UniqueConstraint("appliance_id", "camera_id", "version", name="uq_datasets_appliance_id_camera_id_version"),
        _to_appliances("datasets"),
    )
    op.create_table(
        "dataset_members",
        sa.Column("dataset_id", ID, nullable=False),
        sa.Column("inspection_id", sa.String(), nullable=False),
        sa.Column("frame", sa.String(), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("dataset_id", "inspection_id", name="pk_dataset_members"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_dataset_members_dataset_id_datasets"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("appliance_id", APPLIANCE, nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("started_at", TIME),
        sa.Column("finished_at", TIME),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("dataset_id", ID),
        sa.Column("model_id", sa.String()),
        sa.Column("detail", sa.Text()),
        sa.Column("approved_by", sa.String()),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        _to_appliances("jobs"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_jobs_dataset_id_datasets"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_appliance_id_camera_id", "jobs", ["appliance_id", "camera_id"])
    op.create_table(
        "models",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("appliance_id", APPLIANCE, nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("dataset_id", ID),
        sa.Column("job_id", ID),
        sa.Column("bundle", sa.String()),
        sa.Column("detail", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        _to_appliances("models"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_models_dataset_id_datasets"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_models_job_id_jobs"),
    )
    op.create_index("ix_models_appliance_id_camera_id", "models", ["appliance_id", "camera_id"])
    op.create_table(
        "evaluations",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(), nullable=False),
        sa.Column("baseline_model_id", sa.String()),
        sa.Column("dataset_id", ID, nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("metrics", DOC, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evaluations"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_evaluations_model_id_models"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_evaluations_dataset_id_datasets"),
    )
    op.create_index("ix_evaluations_model_id", "evaluations", ["model_id"])


def downgrade() -> None:
    """Drop every table (children first)."""
    for table in ("evaluations", "models", "jobs", "dataset_members", "datasets", "drift_events", "labels",
                  "frames", "cameras", "appliances"):
        op.drop_table(table)
