"""``store_stats`` on SQL: the figures of docs/contract.md#store_stats, in one read transaction.

The store clock is read once, first, and bound as ``p_now`` into every query, so that all the
figures are judged at the same moment (PostgreSQL's clock moves between statements). Each
query is served by an index (checked at 100,000 workflows by
``tests/databases/test_sql_query_plans.py``):

- workflows by status: ``sayiir_workflows (status, instance_id)``;
- runnable tasks: one range of ``sayiir_ready_tasks (priority, updated_at, ...)`` per
  priority, as ``find_available_tasks`` reads them; live claims through the claims index.
  The count reads every ready row of the backlog: where one priority holds nearly all of
  them, PostgreSQL rightly reads that table in sequence instead;
- claims: ``sayiir_task_claims (released, worker_id)``: unreleased claims are few next to the
  released ones every finished task leaves behind;
- completions: ``sayiir_task_results (completed_at)``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Select,
    SmallInteger,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    union_all,
)

from ..attempts import RETRY_WAIT_WORKER
from ..model import WorkflowStatus
from ..stats import (
    LAST_HOUR,
    LAST_MINUTE,
    PriorityBacklog,
    StoreStats,
    WorkerClaims,
    all_statuses,
)
from ..validation import MAX_PRIORITY, MIN_PRIORITY
from .dialects import SqlDialect
from .schema import ready_tasks, task_claims, task_results, workflows
from .statements import signal_pending
from .types import UtcDateTime


def _count_if(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


class StatsStatements:
    """The statements of :func:`read_stats`, built once per backend."""

    def __init__(self, dialect: SqlDialect) -> None:
        now = bindparam("p_now", type_=UtcDateTime())
        self.now: Select[Any] = select(dialect.now())
        self.workflows = select(workflows.c.status, func.count()).group_by(workflows.c.status)
        # find_available_tasks' rule (statements.candidate_query) without the tag filter and
        # without the claimed_until hint: the claim row decides (a renewal does not move the
        # hint, so the hint alone would count a renewed claim's task as runnable).
        live_claim = exists().where(
            task_claims.c.instance_id == ready_tasks.c.instance_id,
            task_claims.c.task_id == ready_tasks.c.task_id,
            task_claims.c.released.is_(False),
            or_(task_claims.c.expires_at.is_(None), task_claims.c.expires_at > now),
        )
        # One indexed scan per priority (its range of the order index), as find does.
        filters = (
            or_(ready_tasks.c.wake_at.is_(None), ready_tasks.c.wake_at <= now),
            not_(signal_pending()),
            not_(live_claim),
        )
        self.runnable = union_all(
            *(
                select(
                    literal(priority, SmallInteger()).label("priority"),
                    func.count().label("tasks"),
                    func.min(ready_tasks.c.updated_at).label("oldest"),
                ).where(ready_tasks.c.priority == priority, *filters)
                for priority in range(MIN_PRIORITY, MAX_PRIORITY + 1)
            )
        )
        live = or_(task_claims.c.expires_at.is_(None), task_claims.c.expires_at > now)
        self.claims = (
            select(
                task_claims.c.worker_id,
                _count_if(live).label("live"),
                _count_if(not_(live)).label("expired"),
            )
            .where(task_claims.c.released.is_(False))
            .group_by(task_claims.c.worker_id)
        )
        since_minute = bindparam("p_since_minute", type_=UtcDateTime())
        self.completions = select(
            _count_if(task_results.c.completed_at > since_minute).label("minute"),
            func.count().label("hour"),
        ).where(
            and_(
                task_results.c.completed_at > bindparam("p_since_hour", type_=UtcDateTime()),
                task_results.c.completed_at <= now,
            )
        )


def read_stats(conn: Connection, sql: StatsStatements) -> StoreStats:
    """The figures of docs/contract.md#store_stats, read in ``conn``'s transaction."""
    now: datetime = conn.execute(sql.now).scalar_one().astimezone(UTC)
    at_now = {"p_now": now}
    statuses = {
        WorkflowStatus(status): count for status, count in conn.execute(sql.workflows).all()
    }
    runnable = tuple(
        PriorityBacklog(row.priority, row.tasks, row.oldest.astimezone(UTC))
        for row in sorted(conn.execute(sql.runnable, at_now).all())
        if row.tasks
    )
    claims = []
    retry_waits = 0
    for row in sorted(conn.execute(sql.claims, at_now).all(), key=lambda row: row.worker_id):
        if row.worker_id == RETRY_WAIT_WORKER:
            retry_waits = int(row.live)  # an ended wait's task counts as runnable instead
        else:
            claims.append(WorkerClaims(row.worker_id, int(row.live), int(row.expired)))
    completions = conn.execute(
        sql.completions,
        {**at_now, "p_since_minute": now - LAST_MINUTE, "p_since_hour": now - LAST_HOUR},
    ).one()
    return StoreStats(
        taken_at=now,
        workflows=all_statuses(statuses),
        runnable=runnable,
        claims=tuple(claims),
        retry_waits=retry_waits,
        completed_last_minute=int(completions.minute),
        completed_last_hour=int(completions.hour),
    )
