"""Keyed calls: sayiir_sent_events, sayiir_consumed_events, sayiir_snapshot_writes.

Revision ID: b7e1c3d9a5f2
Revises: a8c3f5e0d214
Create Date: 2026-11-30 16:30:00.000000

``send_event(..., idempotency_key=k)`` records ``k`` in ``sayiir_sent_events`` (with the event
name and the payload's SHA-256) in the transaction that delivers or buffers the event;
``consume_event(..., consumer_key=k)`` records the event it took (name and payload) in
``sayiir_consumed_events``; ``save_snapshot(..., write_id=k)`` records the version it got (and
the snapshot's SHA-256) in ``sayiir_snapshot_writes``. The primary key ``(instance_id, key)``
makes a repeated key write once. Rows belong to their workflow and are deleted with it.

Frozen history: do not import the live ``metadata`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sayiir_persistence.sql.types import Identifier, Payload, UtcDateTime

# revision identifiers, used by Alembic.
revision: str = "b7e1c3d9a5f2"
down_revision: str | Sequence[str] | None = "a8c3f5e0d214"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    """Create ``sayiir_sent_events``, ``sayiir_consumed_events``, ``sayiir_snapshot_writes``."""
    op.create_table(
        "sayiir_sent_events",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("idempotency_key", Identifier(), nullable=False),
        sa.Column("name", Identifier(), nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("sent_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "instance_id", "idempotency_key", name=op.f("pk_sayiir_sent_events")
        ),
        **_MYSQL,
    )
    op.create_table(
        "sayiir_consumed_events",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("consumer_key", Identifier(), nullable=False),
        sa.Column("name", Identifier(), nullable=False),
        sa.Column("payload", Payload(), nullable=False),
        sa.Column("consumed_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "instance_id", "consumer_key", name=op.f("pk_sayiir_consumed_events")
        ),
        **_MYSQL,
    )
    op.create_table(
        "sayiir_snapshot_writes",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("write_id", Identifier(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("snapshot_sha256", sa.String(64), nullable=False),
        sa.Column("written_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "write_id", name=op.f("pk_sayiir_snapshot_writes")),
        **_MYSQL,
    )


def downgrade() -> None:
    """Drop the three tables."""
    op.drop_table("sayiir_snapshot_writes")
    op.drop_table("sayiir_consumed_events")
    op.drop_table("sayiir_sent_events")
