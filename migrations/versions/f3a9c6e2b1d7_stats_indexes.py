"""Stats indexes: ``store_stats`` reads completions and claims through an index.

Revision ID: f3a9c6e2b1d7
Revises: a6d4e8f2c3b5
Create Date: 2026-11-30 19:30:00.000000

- ``sayiir_task_results (completed_at)``: the results recorded in the last minute and hour
  are a range of it, however many results older workflows keep.
- ``sayiir_task_claims (released, worker_id)``: the unreleased claims by worker; released
  claims (one per task ever run, kept for the fencing tokens) are skipped by the index.
  ``expires_at`` is deliberately left out: a claim renewal writes only that column, and an
  update touching no indexed column stays a HOT update on PostgreSQL (no index entry
  written). The live/expired split reads it from the few unreleased rows.

Both indexes are maintained by every claim (insert or takeover: ``released`` and
``worker_id`` change) and every result insert. ``CREATE INDEX`` blocks writes to the table
while it builds (short on tables of finished work; prune first on a big store).

Frozen history: do not import the live ``metadata`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "f3a9c6e2b1d7"
down_revision: str | Sequence[str] | None = "a6d4e8f2c3b5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the two indexes of ``store_stats``."""
    op.create_index(
        op.f("ix_sayiir_task_results_completed_at"), "sayiir_task_results", ["completed_at"]
    )
    op.create_index(
        op.f("ix_sayiir_task_claims_released_worker_id"),
        "sayiir_task_claims",
        ["released", "worker_id"],
    )


def downgrade() -> None:
    """Drop them (``store_stats`` then scans those tables)."""
    op.drop_index(op.f("ix_sayiir_task_claims_released_worker_id"), table_name="sayiir_task_claims")
    op.drop_index(op.f("ix_sayiir_task_results_completed_at"), table_name="sayiir_task_results")
