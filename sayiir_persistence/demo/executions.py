"""The demo's own bookkeeping table, ``demo_executions`` (not part of the library's schema): a
row per task execution, written in the worker processes and read by the run and the checks."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    case,
    func,
    insert,
    inspect,
    select,
    update,
)

from ..sql.backend import SqlBackend
from ..worker import TaskContext, TaskOutcome

_metadata = MetaData()
executions = Table(
    "demo_executions",
    _metadata,
    Column("execution_id", String(32), primary_key=True),
    Column("run_id", String(32), nullable=False, index=True),
    Column("instance_id", String(255), nullable=False),
    Column("task_id", String(64), nullable=False),
    Column("worker", String(64), nullable=False),
    Column("token", Integer, nullable=False),
    Column("outcome", String(16), nullable=True),
)


def prepare_executions_table(engine: Engine) -> None:
    """Create ``demo_executions``; one left by an older demo with other columns is replaced
    (it only ever holds demo bookkeeping)."""
    inspector = inspect(engine)
    if inspector.has_table(executions.name):
        existing = {column["name"] for column in inspector.get_columns(executions.name)}
        if existing != set(executions.columns.keys()):
            executions.drop(engine)
    _metadata.create_all(engine)


class Recorder:
    """Writes one ``demo_executions`` row per task execution (in the worker processes)."""

    def __init__(self, engine: Engine, run_id: str, worker: str) -> None:
        self._engine = engine
        self._run_id = run_id
        self._worker = worker

    def started(self, ctx: TaskContext) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                insert(executions).values(
                    execution_id=ctx.execution_id,
                    run_id=self._run_id,
                    instance_id=ctx.instance_id,
                    task_id=ctx.task_id,
                    worker=self._worker,
                    token=ctx.claim.token,
                )
            )

    def finished(self, ctx: TaskContext, outcome: TaskOutcome) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(executions)
                .where(executions.c.execution_id == ctx.execution_id)
                .values(outcome=outcome.value)
            )


def execution_counts(engine: Engine, run_id: str) -> dict[str, int]:
    # COUNT(CASE ...) rather than COUNT(*) FILTER (...), which MySQL lacks.
    takeovers = func.count(case((executions.c.token > 1, 1)))
    recorded = func.count(case((executions.c.outcome == TaskOutcome.RECORDED.value, 1)))
    with engine.connect() as conn:
        row = conn.execute(
            select(
                func.count().label("executions"),
                takeovers.label("takeovers"),
                recorded.label("recorded"),
            ).where(executions.c.run_id == run_id)
        ).one()
    return {"executions": row.executions, "takeovers": row.takeovers, "recorded": row.recorded}


def unsaved_by_worker(backend: SqlBackend, run_id: str) -> Counter[str]:
    """Per worker, the executions running now whose result is not stored yet: what a kill
    right now would abandon (an execution without outcome may already be saved)."""
    with backend.engine.connect() as conn:
        rows = conn.execute(
            select(executions.c.worker, executions.c.instance_id, executions.c.task_id).where(
                executions.c.run_id == run_id, executions.c.outcome.is_(None)
            )
        ).all()
    return Counter(
        row.worker for row in rows if backend.load_task_result(row.instance_id, row.task_id) is None
    )


def execution_rows(engine: Engine, run_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(select(executions).where(executions.c.run_id == run_id))
        return [dict(row._mapping) for row in result]
