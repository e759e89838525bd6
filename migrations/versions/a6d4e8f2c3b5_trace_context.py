"""Workflows carry a trace context: one workflow is one trace across workers.

Revision ID: a6d4e8f2c3b5
Revises: d2f6a8b4c0e1
Create Date: 2026-11-30 19:45:00.000000

``sayiir_workflows.trace_context`` (NULL: none): the W3C ``traceparent`` that every task span
of the workflow continues (docs/contract.md#trace-context). Written when the workflow's row
is created (or replaced by a new run), never updated; returned by every claim path. Adding a
nullable column without a default is a catalogue change on PostgreSQL and an instant ADD
COLUMN on MariaDB 10.3+, so the upgrade does not rewrite the table.

Frozen history: do not import the live ``metadata`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "a6d4e8f2c3b5"
down_revision: str | Sequence[str] | None = "d2f6a8b4c0e1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``sayiir_workflows.trace_context``."""
    with op.batch_alter_table("sayiir_workflows") as batch:
        batch.add_column(sa.Column("trace_context", sa.String(55), nullable=True))


def downgrade() -> None:
    """Drop ``sayiir_workflows.trace_context`` (workflows then start new traces per task)."""
    with op.batch_alter_table("sayiir_workflows") as batch:
        batch.drop_column("trace_context")
