"""Ready tasks carry when their claim expires (claimed_until), for the claim's own recheck.

Revision ID: c4e9a1f07b2d
Revises: a3997d4a9bc0
Create Date: 2026-11-30 10:20:00.000000

A claim writes its expiry on the task's ready row too, in the same transaction. A concurrent
claimer whose snapshot predates that commit then finds the row changed when it locks it, and
PostgreSQL rechecks the row's own condition (free, or claimed_until passed): the row is skipped
and the next candidate taken, instead of a lock that the claim statement refuses afterwards.
The claim rows stay the source of truth (fencing tokens); this column is a hint that is cleared
when a claim is released and may lag behind a renewal (a renewed claim is still excluded by its
claim row).

Frozen history: do not import the live ``metadata`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sayiir_persistence.sql.types import UtcDateTime

# revision identifiers, used by Alembic.
revision: str = "c4e9a1f07b2d"
down_revision: str | Sequence[str] | None = "a3997d4a9bc0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``sayiir_ready_tasks.claimed_until`` (NULL: not claimed)."""
    op.add_column("sayiir_ready_tasks", sa.Column("claimed_until", UtcDateTime(), nullable=True))


def downgrade() -> None:
    """Drop ``sayiir_ready_tasks.claimed_until``."""
    with op.batch_alter_table("sayiir_ready_tasks") as batch:
        batch.drop_column("claimed_until")
