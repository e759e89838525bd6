"""``fail_overdue_workflows`` on SQL: one batch of workflows past their deadline, failed in
one transaction (docs/contract.md#fail_overdue_workflows).

The candidates are read through the deadline index, then each is failed by an ``UPDATE`` that
rechecks its status and deadline against the database clock in the write itself (a workflow
completed, retried or started anew since the read is left alone). Workflow rows are written
in id order, then their ready rows and claims (the global lock order), so concurrent sweeps
fail each workflow once.
"""

from __future__ import annotations

from sqlalchemy import BindParameter, Connection, bindparam, delete, or_, select, update

from ..model import WorkflowStatus
from ..transitions import timed_out_error
from .dialects import SqlDialect
from .schema import ready_tasks, task_claims, workflows

# Not terminal: the statuses a deadline can still fail.
_OPEN = (WorkflowStatus.IN_PROGRESS.value, WorkflowStatus.PAUSED.value)


class OverdueStatements:
    """The statements of :func:`fail_overdue`, built once per backend."""

    def __init__(self, dialect: SqlDialect) -> None:
        now = dialect.now()
        is_open = or_(*(workflows.c.status == status for status in _OPEN))
        self.candidates = (
            select(workflows.c.instance_id, workflows.c.deadline)
            .where(workflows.c.deadline <= now, is_open)
            .order_by(workflows.c.deadline, workflows.c.instance_id)
            .limit(bindparam("p_limit"))
        )
        self.fail = (
            update(workflows)
            .where(
                workflows.c.instance_id == bindparam("p_instance_id"),
                workflows.c.deadline <= now,
                is_open,
            )
            .values(
                status=WorkflowStatus.FAILED.value,
                error=bindparam("p_error"),
                version=workflows.c.version + 1,
                updated_at=now,
            )
        )
        keys: BindParameter[list[str]] = bindparam("p_instance_ids", expanding=True)
        self.clear_ready = delete(ready_tasks).where(ready_tasks.c.instance_id.in_(keys))
        # Dropped as a cancel drops them: holders are fenced off, tokens keep increasing.
        self.drop_claims = (
            update(task_claims).where(task_claims.c.instance_id.in_(keys)).values(released=True)
        )


def fail_overdue(conn: Connection, sql: OverdueStatements, limit: int) -> list[str]:
    """Fail up to ``limit`` overdue workflows in ``conn``'s transaction; their ids, in the
    order failed (earliest deadline first)."""
    candidates = conn.execute(sql.candidates, {"p_limit": limit}).all()
    failed = []
    for row in sorted(candidates, key=lambda r: r.instance_id):  # the lock order
        parameters = {"p_instance_id": row.instance_id, "p_error": timed_out_error(row.deadline)}
        if conn.execute(sql.fail, parameters).rowcount == 1:
            failed.append(row.instance_id)
    if failed:
        conn.execute(sql.clear_ready, {"p_instance_ids": failed})
        conn.execute(sql.drop_claims, {"p_instance_ids": failed})
    order = {row.instance_id: index for index, row in enumerate(candidates)}
    return sorted(failed, key=order.__getitem__)
