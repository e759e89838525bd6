"""Deleting whole workflows on SQL: the rows attached to them, their token floors first.

``delete_snapshot`` and ``prune_workflows`` delete a workflow's rows in every child table
(``schema.CHILD_TABLES``), in the global lock order (ready rows before claim rows). Just before
the claim rows go, the greatest token among them is recorded as the instance's token floor
(``schema.token_floors``), in the same transaction: a re-created instance's first claims go on
from it, so tokens never repeat for an (instance id, task id) (docs/contract.md#claims).

Why the floor read is exact under READ COMMITTED: the caller holds the workflow rows, and has
deleted (so locked) their ready rows before the floor is read. Every claim of a task locks its
ready row (``claim_task``, ``claim_available_tasks``) or its workflow row (next claims of
``complete_tasks``) before it writes a token, so a claim that locked first has committed by
then (its token is read), and one that comes later finds the rows gone.
"""

from __future__ import annotations

from sqlalchemy import BindParameter, Connection, Delete, Table, bindparam, delete

from .dialects import SqlDialect
from .schema import CHILD_TABLES, task_claims


class AttachedRows:
    """The deletes of the rows attached to the workflows ``p_ids`` (expanding), built once."""

    def __init__(self) -> None:
        ids: BindParameter[list[str]] = bindparam("p_ids", expanding=True)
        self.deletes: list[tuple[Table, Delete]] = [
            (table, delete(table).where(table.c.instance_id.in_(ids))) for table in CHILD_TABLES
        ]


ATTACHED_ROWS = AttachedRows()


def delete_attached(conn: Connection, dialect: SqlDialect, instance_ids: list[str]) -> None:
    """Delete what is attached to the locked workflows ``instance_ids`` (not their own rows),
    recording their token floors before their claim rows go."""
    for table, statement in ATTACHED_ROWS.deletes:
        if table is task_claims:
            dialect.record_token_floors(conn, instance_ids)
        conn.execute(statement, {"p_ids": instance_ids})
