"""Workflows carry a deadline (the workflow-level timeout), indexed for the overdue sweep.

Revision ID: a8c3f5e0d214
Revises: e5b7d2c91f40
Create Date: 2026-11-30 14:10:00.000000

``sayiir_workflows.deadline`` (NULL: none). ``fail_overdue_workflows`` finds the in-progress
and paused workflows whose deadline has passed through ``ix_sayiir_workflows_deadline``.

Frozen history: do not import the live ``metadata`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sayiir_persistence.sql.types import UtcDateTime

# revision identifiers, used by Alembic.
revision: str = "a8c3f5e0d214"
down_revision: str | Sequence[str] | None = "e5b7d2c91f40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``sayiir_workflows.deadline`` and its index."""
    with op.batch_alter_table("sayiir_workflows") as batch:
        batch.add_column(sa.Column("deadline", UtcDateTime(), nullable=True))
    op.create_index("ix_sayiir_workflows_deadline", "sayiir_workflows", ["deadline"])


def downgrade() -> None:
    """Drop the index and ``sayiir_workflows.deadline``."""
    op.drop_index("ix_sayiir_workflows_deadline", table_name="sayiir_workflows")
    with op.batch_alter_table("sayiir_workflows") as batch:
        batch.drop_column("deadline")
