"""``prune_workflows`` on SQL: one batch of finished workflows deleted in one transaction.

Per call (docs/contract.md#prune_workflows), whatever the batch size, a few statements:

1. read up to ``batch_size`` candidate ids, one status after the other, without locking: each
   read is one range scan of the ``(status, instance_id)`` index in id order, stopped by the
   limit, whatever the size of the table;
2. lock those workflow rows in id order (the order ``complete_tasks`` locks them in too), the
   locking statement checking status and age again: a row deleted, or deleted and created
   anew, since step 1 is left out. The lock waits for a concurrent pruner's batch instead of
   skipping it (no ``SKIP LOCKED``): when that batch's rows are gone once it commits, the
   candidates are read again, so a call returns 0 only when nothing is left to prune;
3. delete the locked workflows' rows of every child table (ready rows before claim rows, the
   global lock order), recording their token floors before their claim rows go
   (``deleting.py``; floors are never pruned), then the workflow rows, a ``DELETE`` that
   checks status and age once more.

Step 1 takes no lock and steps 2-3 touch only the batch's rows: the transaction holds few
locks, for the time of a handful of statements. On SQLite the transaction holds the database's
write lock (``BEGIN IMMEDIATE``), so nothing changes between the steps at all.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BindParameter, Connection, Integer, and_, bindparam, delete, select

from ..model import WorkflowStatus
from ..retention import PRUNABLE_STATUSES
from .deleting import delete_attached
from .dialects import SqlDialect
from .errors import RetryableConflict
from .schema import workflows

# Rounds of read-then-lock in one call while every candidate read was deleted by a concurrent
# pruner before it could be locked. Each round follows another caller's commit, so this is
# only reached if the two statements disagree (a bug): the transaction is then run again.
_LOOKS = 100


class PruneStatements:
    """The statements of :func:`prune_workflows`, built once per backend."""

    def __init__(self) -> None:
        ids: BindParameter[list[str]] = bindparam("p_ids", expanding=True)
        old = workflows.c.updated_at < bindparam("p_before")
        prunable = and_(workflows.c.status.in_(bindparam("p_statuses", expanding=True)), old)
        self.candidates = (
            select(workflows.c.instance_id)
            .where(workflows.c.status == bindparam("p_status"), old)
            .order_by(workflows.c.instance_id)
            .limit(bindparam("p_limit", type_=Integer()))
        )
        self.lock = (
            select(workflows.c.instance_id)
            .where(workflows.c.instance_id.in_(ids), prunable)
            .order_by(workflows.c.instance_id)
            .with_for_update()
        )
        self.delete_workflows = delete(workflows).where(workflows.c.instance_id.in_(ids), prunable)


def prune_workflows(
    conn: Connection,
    sql: PruneStatements,
    dialect: SqlDialect,
    finished_before: datetime,
    statuses: frozenset[WorkflowStatus],
    batch_size: int,
) -> int:
    """Delete one batch in the transaction of ``conn``; how many workflows it deleted.

    Raises:
        RetryableConflict: the batch could not be locked or deleted as read (the caller runs
            the transaction again).
    """
    # A fixed order of statuses: concurrent pruners read (and so lock) alike.
    ordered = [status.value for status in PRUNABLE_STATUSES if status in statuses]
    guard = {"p_statuses": ordered, "p_before": finished_before}
    for _ in range(_LOOKS):
        candidates = _candidates(conn, sql, ordered, finished_before, batch_size)
        if not candidates:
            return 0
        locked = list(conn.scalars(sql.lock, {"p_ids": candidates, **guard}))
        if locked:
            break
        # Every candidate went while we waited for its lock: read what is left.
    else:
        raise RetryableConflict(f"prune_workflows could not lock a batch in {_LOOKS} rounds")
    delete_attached(conn, dialect, locked)
    deleted = conn.execute(sql.delete_workflows, {"p_ids": locked, **guard}).rowcount
    if deleted != len(locked):
        # Cannot happen while we hold the rows' locks; never commit children without parents.
        raise RetryableConflict(f"prune_workflows locked {len(locked)} rows, deleted {deleted}")
    return deleted


def _candidates(
    conn: Connection,
    sql: PruneStatements,
    statuses: list[str],
    finished_before: datetime,
    batch_size: int,
) -> list[str]:
    """Up to ``batch_size`` ids of prunable workflows, the statuses in order, ids ascending."""
    found: list[str] = []
    for status in statuses:
        parameters = {
            "p_status": status,
            "p_before": finished_before,
            "p_limit": batch_size - len(found),
        }
        found += conn.scalars(sql.candidates, parameters)
        if len(found) == batch_size:
            break
    return found
