"""Claims carry attempts and deadlines: deadline, last_error, attempt_offset.

Revision ID: e5b7d2c91f40
Revises: c4e9a1f07b2d
Create Date: 2026-11-30 14:00:00.000000

Every claim of a task increments its fencing token, so the token already counts the task's
attempts; ``attempt_offset`` is the token at which they were last counted anew (the
operator's ``retry``), 0 before: attempt = token - attempt_offset. ``deadline``: past it the
claim is not renewed (its expiry never passes it). ``last_error``: the error of the last
attempt that failed with a retry to come (a claim whose worker is ``''`` is that retry's wait).

Frozen history: do not import the live ``metadata`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sayiir_persistence.sql.types import LongText, UtcDateTime

# revision identifiers, used by Alembic.
revision: str = "e5b7d2c91f40"
down_revision: str | Sequence[str] | None = "c4e9a1f07b2d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``deadline``, ``last_error`` and ``attempt_offset`` to ``sayiir_task_claims``."""
    with op.batch_alter_table("sayiir_task_claims") as batch:
        batch.add_column(sa.Column("deadline", UtcDateTime(), nullable=True))
        batch.add_column(sa.Column("last_error", LongText(), nullable=True))
        batch.add_column(
            sa.Column("attempt_offset", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    """Drop the three columns."""
    with op.batch_alter_table("sayiir_task_claims") as batch:
        batch.drop_column("attempt_offset")
        batch.drop_column("last_error")
        batch.drop_column("deadline")
