"""Token floors: fencing tokens never repeat for an instance id, across delete and re-create.

Revision ID: d2f6a8b4c0e1
Revises: b7e1c3d9a5f2
Create Date: 2026-11-30 16:30:00.000000

``sayiir_token_floors`` holds, per deleted workflow instance that had claims, the greatest
fencing token its claims reached (written in the transaction that deletes its claim rows).
A task's first claim takes the floor + 1 as its token (and the floor as its attempt offset,
so attempts still count from 1). Rows are never deleted: dropping one would let a re-created
instance hand out tokens a holder of the deleted one still has.

Frozen history: do not import the live ``metadata`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sayiir_persistence.sql.types import Identifier

# revision identifiers, used by Alembic.
revision: str = "d2f6a8b4c0e1"
down_revision: str | Sequence[str] | None = "b7e1c3d9a5f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``sayiir_token_floors``."""
    op.create_table(
        "sayiir_token_floors",
        sa.Column("instance_id", Identifier(), nullable=False),
        sa.Column("token_floor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_sayiir_token_floors")),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    """Drop ``sayiir_token_floors`` (tokens of re-created instances may then repeat)."""
    op.drop_table("sayiir_token_floors")
