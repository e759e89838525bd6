"""Initial schema: the seven sayiir_* tables and their indexes.

Revision ID: a3997d4a9bc0
Revises:
Create Date: 2026-11-28 18:06:19.410829

Frozen history: the tables are spelled out here rather than taken from the live ``metadata``,
so that later changes to ``sayiir_persistence/sql/schema.py`` need a new revision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from sayiir_persistence.sql.types import Identifier, LongText, Payload, UtcDateTime

# revision identifiers, used by Alembic.
revision: str = "a3997d4a9bc0"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MYSQL_OPTIONS: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    """Create the tables and indexes."""
    op.create_table(
        "sayiir_workflows",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("definition_hash", Identifier(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("position", LongText(), nullable=False),
        sa.Column("last_completed_task_id", Identifier(), nullable=True),
        sa.Column("input_task_id", Identifier(), nullable=True),
        sa.Column("initial_input", Payload(), nullable=True),
        sa.Column("output", Payload(), nullable=True),
        sa.Column("error", LongText(), nullable=True),
        sa.Column("cancel_request", LongText(), nullable=True),
        sa.Column("pause_request", LongText(), nullable=True),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("tags", LongText(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_sayiir_workflows")),
        **MYSQL_OPTIONS,
    )
    op.create_index(
        op.f("ix_sayiir_workflows_status_instance_id"),
        "sayiir_workflows",
        ["status", "instance_id"],
    )

    op.create_table(
        "sayiir_task_results",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("task_id", Identifier(), nullable=False),
        sa.Column("output", Payload(), nullable=False),
        sa.Column("completed_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "task_id", name=op.f("pk_sayiir_task_results")),
        **MYSQL_OPTIONS,
    )

    op.create_table(
        "sayiir_ready_tasks",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("task_id", Identifier(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("wake_at", UtcDateTime(), nullable=True),
        sa.Column("has_tags", sa.Boolean(create_constraint=False), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "task_id", name=op.f("pk_sayiir_ready_tasks")),
        **MYSQL_OPTIONS,
    )
    op.create_index(
        op.f("ix_sayiir_ready_tasks_priority_updated_at_instance_id_task_id"),
        "sayiir_ready_tasks",
        ["priority", "updated_at", "instance_id", "task_id"],
    )

    op.create_table(
        "sayiir_task_claims",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("task_id", Identifier(), nullable=False),
        sa.Column("worker_id", Identifier(), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("claimed_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=True),
        sa.Column("released", sa.Boolean(create_constraint=False), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "task_id", name=op.f("pk_sayiir_task_claims")),
        **MYSQL_OPTIONS,
    )

    op.create_table(
        "sayiir_signals",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", LongText(), nullable=True),
        sa.Column("requested_by", LongText(), nullable=True),
        sa.Column("requested_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "kind", name=op.f("pk_sayiir_signals")),
        **MYSQL_OPTIONS,
    )

    op.create_table(
        "sayiir_events",
        # SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("name", Identifier(), nullable=False),
        sa.Column("payload", Payload(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sayiir_events")),
        **MYSQL_OPTIONS,
    )
    op.create_index(
        op.f("ix_sayiir_events_instance_id_name_id"),
        "sayiir_events",
        ["instance_id", "name", "id"],
    )

    op.create_table(
        "sayiir_workflow_tags",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("tag", Identifier(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "tag", name=op.f("pk_sayiir_workflow_tags")),
        **MYSQL_OPTIONS,
    )


def downgrade() -> None:
    """Drop the tables (and with them their indexes and every stored workflow)."""
    for table in (
        "sayiir_workflow_tags",
        "sayiir_events",
        "sayiir_signals",
        "sayiir_task_claims",
        "sayiir_ready_tasks",
        "sayiir_task_results",
        "sayiir_workflows",
    ):
        op.drop_table(table)
