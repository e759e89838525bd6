"""``prune_workflows`` on SQL: set-based batches, the re-check in the write, waiting for a
concurrent pruner's batch, and the status index.

The rules themselves are checked on every backend by ``RetentionContract``; these tests check
how ``SqlBackend`` keeps them (docs/contract.md#prune_workflows, ``sql/pruning.py``).
Each test has a database of its own (``isolated_database``): other runs may share the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from helpers.isolated_db import isolated_database
from sayiir_persistence import SqlBackend, WorkflowSnapshot, WorkflowStatus, migrate
from sayiir_persistence.sql.schema import CHILD_TABLES, token_floors, workflows

LONG_TTL = timedelta(minutes=10)
CUTOFF_AGE = timedelta(days=1)


@pytest.fixture
def backend(sql_url: str) -> Iterator[SqlBackend]:
    with isolated_database(sql_url) as url:
        migrate(url)
        with SqlBackend(url) as backend:
            yield backend


def finish(backend: SqlBackend, instance_id: str, status: WorkflowStatus) -> None:
    """A workflow that ran one task (a result, a released claim), then ended in ``status``."""
    snapshot = WorkflowSnapshot.new(instance_id, "h", first_task="t")
    backend.save_snapshot(snapshot)
    claim = backend.claim_task(instance_id, "t", "w", LONG_TTL)
    assert claim is not None
    backend.save_task_result(instance_id, "t", b"out")
    backend.release_task_claim(instance_id, "t", "w", token=claim.token)
    snapshot = backend.load_snapshot(instance_id)
    if status is WorkflowStatus.COMPLETED:
        snapshot.mark_completed(b"done")
    else:
        snapshot.mark_failed("broken")
    backend.save_snapshot(snapshot)


def backdate(backend: SqlBackend, instance_ids: list[str], age: timedelta) -> None:
    """Make workflows look finished ``age`` ago (a store only sets updated_at to its now)."""
    with backend.engine.begin() as conn:
        conn.execute(
            sa.update(workflows)
            .where(workflows.c.instance_id.in_(instance_ids))
            .values(updated_at=datetime.now(UTC) - age)
        )


def old_workflows(backend: SqlBackend, count: int) -> list[str]:
    instance_ids = [f"old-{index:03d}" for index in range(count)]
    for instance_id in instance_ids:
        finish(backend, instance_id, WorkflowStatus.COMPLETED)
    backdate(backend, instance_ids, 2 * CUTOFF_AGE)
    return instance_ids


def cutoff() -> datetime:
    return datetime.now(UTC) - CUTOFF_AGE


def rows_of(backend: SqlBackend, instance_id: str) -> int:
    with backend.engine.connect() as conn:
        return sum(
            conn.execute(
                sa.select(sa.func.count()).where(table.c.instance_id == instance_id)
            ).scalar_one()
            for table in (workflows, *CHILD_TABLES)
        )


def is_lock(statement: str) -> bool:
    """The statement locking a batch's workflow rows (``FOR UPDATE``, except on SQLite)."""
    return (
        statement.lstrip().startswith("SELECT") and "sayiir_workflows.instance_id IN" in statement
    )


def is_candidate_read(statement: str) -> bool:
    return (
        statement.lstrip().startswith("SELECT")
        and "FROM sayiir_workflows" in statement
        and "LIMIT" in statement
        and "FOR UPDATE" not in statement
    )


class Statements:
    """The statements the backend's engine sends while this is listening (per thread name)."""

    def __init__(self, backend: SqlBackend) -> None:
        self.engine = backend.engine
        self.sent: list[tuple[str, str, Any]] = []
        self.hooks: list[Callable[[str], None]] = []

    def _before(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        self.sent.append((threading.current_thread().name, statement, parameters))
        for hook in self.hooks:
            hook(statement)

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._before)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._before)

    def of(self, thread: str, which: Callable[[str], bool] = lambda _: True) -> list[str]:
        return [
            statement for name, statement, _ in self.sent if name == thread and which(statement)
        ]


def test_a_batch_is_a_few_set_based_statements_whatever_its_size(backend: SqlBackend) -> None:
    old = old_workflows(backend, 40)
    assert rows_of(backend, old[0]) == 3  # the workflow, its result, its released claim
    this = threading.current_thread().name
    with Statements(backend) as small:
        assert backend.prune_workflows(finished_before=cutoff(), batch_size=2) == 2
    with Statements(backend) as large:
        assert backend.prune_workflows(finished_before=cutoff(), batch_size=38) == 38
    # One candidate read, one lock, a delete per child table, one upsert of the token floors,
    # the workflows' delete (and SQLite's BEGIN IMMEDIATE): the same for 2 workflows as for 38.
    assert len(large.of(this)) == len(small.of(this)) <= len(CHILD_TABLES) + 5
    assert len(large.of(this, is_lock)) == 1
    assert backend.list_snapshots() == []
    assert all(rows_of(backend, instance_id) == 0 for instance_id in old)
    # What is left of each: its token floor (its claim's token), never pruned.
    with backend.engine.connect() as conn:
        floors = {row.instance_id: row.token_floor for row in conn.execute(sa.select(token_floors))}
    assert floors == dict.fromkeys(old, 1)


def test_the_write_rechecks_status_and_age_after_the_candidates_were_read(
    backend: SqlBackend,
) -> None:
    """Workflows deleted and created anew between the candidate read and the lock are kept:
    ``a`` is running now, ``b`` finished just now. Only ``c`` still matches."""
    if backend.engine.dialect.name == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing can come in between")
    for instance_id in ("a", "b", "c"):
        finish(backend, instance_id, WorkflowStatus.COMPLETED)
    backdate(backend, ["a", "b", "c"], 2 * CUTOFF_AGE)
    done = threading.Event()

    def recreate() -> None:
        backend.delete_snapshot("a")
        backend.save_snapshot(WorkflowSnapshot.new("a", "h", first_task="t"))
        backend.delete_snapshot("b")
        finish(backend, "b", WorkflowStatus.FAILED)

    def between_read_and_lock(statement: str) -> None:
        if is_lock(statement) and not done.is_set():
            done.set()
            meanwhile = threading.Thread(target=recreate)  # other connections, committed
            meanwhile.start()
            meanwhile.join(timeout=30)
            assert not meanwhile.is_alive()

    with Statements(backend) as sent:
        sent.hooks.append(between_read_and_lock)
        assert backend.prune_workflows(finished_before=cutoff()) == 1
    assert done.is_set()
    assert backend.list_snapshots() == ["a", "b"]
    assert backend.load_snapshot("a").status is WorkflowStatus.IN_PROGRESS
    assert backend.load_snapshot("b").status is WorkflowStatus.FAILED
    assert rows_of(backend, "b") == 3  # the new b's result and claim are kept too
    assert backend.prune_workflows(finished_before=cutoff()) == 0


def test_a_batch_being_deleted_is_waited_for_then_the_rest_is_pruned(
    backend: SqlBackend,
) -> None:
    """Pruner B reads the very candidates that pruner A has locked and is deleting: it waits
    for A's commit, then reads again and prunes the rest, instead of returning 0 too early."""
    if backend.engine.dialect.name == "sqlite":
        pytest.skip("SQLite runs one writer at a time: B waits for A at BEGIN")
    old_workflows(backend, 4)
    a_locked, b_locking, release_a = threading.Event(), threading.Event(), threading.Event()
    counts: dict[str, int] = {}

    def hold(statement: str) -> None:
        if threading.current_thread().name == "pruner-b" and is_lock(statement):
            b_locking.set()

    def prune(name: str, batch_size: int) -> None:
        counts[name] = backend.prune_workflows(finished_before=cutoff(), batch_size=batch_size)

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if threading.current_thread().name == "pruner-a" and is_lock(statement):
            a_locked.set()
            assert release_a.wait(timeout=30)  # A holds its batch's locks until released

    with Statements(backend) as sent:
        sent.hooks.append(hold)
        sa.event.listen(backend.engine, "after_cursor_execute", after)
        try:
            a = threading.Thread(target=prune, args=("pruner-a", 2), name="pruner-a")
            a.start()
            assert a_locked.wait(timeout=30)
            b = threading.Thread(target=prune, args=("pruner-b", 2), name="pruner-b")
            b.start()
            assert b_locking.wait(timeout=30)
            time.sleep(0.5)  # B's lock statement is now waiting for A's rows
            release_a.set()
            a.join(timeout=30)
            b.join(timeout=30)
        finally:
            release_a.set()
            sa.event.remove(backend.engine, "after_cursor_execute", after)
    assert counts == {"pruner-a": 2, "pruner-b": 2}
    # B locked nothing the first time (A deleted it all), read again and took the other two.
    assert len(sent.of("pruner-b", is_lock)) == 2
    assert backend.list_snapshots() == []


def test_candidates_are_read_through_the_status_index(backend: SqlBackend) -> None:
    """Each candidate read is a range scan of the (status, instance_id) index, never a full
    scan of the workflows."""
    dialect = backend.engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        pytest.skip(f"no plan check for {dialect}")
    with Statements(backend) as sent:
        backend.prune_workflows(finished_before=cutoff(), statuses=[WorkflowStatus.FAILED])
    [(statement, parameters)] = [
        (statement, parameters) for _, statement, parameters in sent.sent
        if is_candidate_read(statement)
    ]  # fmt: skip
    with backend.engine.connect() as conn:
        if dialect == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " ".join(str(row[-1]) for row in rows)
        else:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            plan = " ".join(str(row[0]) for row in rows)
    assert "ix_sayiir_workflows_status_instance_id" in plan, plan
