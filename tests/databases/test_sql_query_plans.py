"""Finding work stays an index scan at 100,000 in-progress workflows (PostgreSQL).

The test seeds a fresh database of its own (``sayiir_plans`` on the server of ``postgres_url``,
dropped and created anew, migrated) with bulk Core inserts of exactly the rows ``save_snapshot``
writes for a workflow at ``AtTask("t")`` (``SqlBackend._write_snapshot`` / ``_insert_ready``),
since 100,000 ``save_snapshot`` calls would take minutes. It then captures the SQL that
``find_available_tasks`` and ``claim_available_tasks`` send (a ``before_cursor_execute`` hook on
the backend's engine), runs ``EXPLAIN (FORMAT JSON)`` on their candidate query with the same
parameters, and checks that the plan reads ``sayiir_ready_tasks`` through its order index and
never sequentially.

Run with ``pytest -s`` to see the plan summary and the latency of ``find_available_tasks``
at 1,000 and at 100,000 rows (printed, not asserted: timings depend on the machine).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sayiir_persistence import AtTask, WorkflowStatus, migrate
from sayiir_persistence.sql import codec
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.sql.schema import ready_tasks, task_claims, task_results, workflows
from sayiir_persistence.validation import MAX_PRIORITY, MIN_PRIORITY

pytestmark = pytest.mark.postgres

#: The database of this module's own, dropped and created anew by each run.
OWN_DATABASE = "sayiir_plans"
SMALL_WORKFLOWS = 1_000
LARGE_WORKFLOWS = 100_000
INSERT_BATCH = 10_000
#: Every CLAIMED_EVERY-th seeded task is held by a live claim (busy workers), so that the plan
#: is made against a claims table that is not empty.
CLAIMED_EVERY = 10
#: find_available_tasks calls timed at each size (the p50 is printed).
TIMED_CALLS = 50
FIND_LIMIT = 10

#: The index that serves the order of find/claim_available_tasks within one priority.
ORDER_INDEX = next(
    index.name
    for index in ready_tasks.indexes
    if [column.name for column in index.columns]
    == ["priority", "updated_at", "instance_id", "task_id"]
)
INDEX_SCANS = frozenset({"Index Scan", "Index Only Scan"})
#: What marks the candidate query among the statements a call sends.
CANDIDATE_MARK = "FROM sayiir_ready_tasks"


@pytest.fixture
def plans_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database of this module's own on the PostgreSQL server."""
    server = make_url(postgres_url)
    admin = sa.create_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT")

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{OWN_DATABASE}" WITH (FORCE)')

    try:
        drop()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{OWN_DATABASE}"')
        url = server.set(database=OWN_DATABASE).render_as_string(hide_password=False)
        migrate(url)
        yield url
        drop()
    finally:
        admin.dispose()


def _seed(url: str, start: int, stop: int, initial_input: bytes = b"input") -> None:
    """Bulk-insert in-progress workflows ``start..stop-1`` at AtTask("t"), then ANALYZE.

    The values are those ``save_snapshot`` of ``WorkflowSnapshot.new(..., first_task="t")``
    writes: the workflow row (version 1) and one ready-task row per runnable task; every
    CLAIMED_EVERY-th task also gets the live claim row ``claim_task`` would write.
    """
    rng = random.Random(start)
    claimed_at = datetime.now(UTC)
    base = claimed_at - timedelta(hours=1)
    position = codec.encode_position(AtTask("t"))
    no_tags = codec.encode_tags(frozenset())
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        for first in range(start, stop, INSERT_BATCH):
            workflow_rows, ready_rows, claim_rows = [], [], []
            for number in range(first, min(first + INSERT_BATCH, stop)):
                instance_id = f"plan-{number:06d}"
                priority = rng.randint(1, 5)
                saved_at = base + timedelta(milliseconds=number)
                workflow_rows.append(
                    {
                        "instance_id": instance_id,
                        "definition_hash": "plan-definition",
                        "status": WorkflowStatus.IN_PROGRESS.value,
                        "position": position,
                        "last_completed_task_id": None,
                        "input_task_id": None,
                        "initial_input": initial_input,
                        "output": None,
                        "error": None,
                        "cancel_request": codec.encode_request(None),
                        "pause_request": codec.encode_request(None),
                        "priority": priority,
                        "tags": no_tags,
                        "created_at": saved_at,
                        "updated_at": saved_at,
                        "version": 1,
                    }
                )
                ready_rows.append(
                    {
                        "instance_id": instance_id,
                        "task_id": "t",
                        "priority": priority,
                        "updated_at": saved_at,
                        "wake_at": None,
                        "has_tags": False,
                    }
                )
                if number % CLAIMED_EVERY == 0:
                    claim_rows.append(
                        {
                            "instance_id": instance_id,
                            "task_id": "t",
                            "worker_id": "busy-worker",
                            "token": 1,
                            "claimed_at": claimed_at,
                            "expires_at": claimed_at + timedelta(hours=1),
                            "released": False,
                        }
                    )
            with engine.begin() as conn:
                conn.execute(sa.insert(workflows), workflow_rows)
                conn.execute(sa.insert(ready_tasks), ready_rows)
                conn.execute(sa.insert(task_claims), claim_rows)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


def _p50_find_ms(backend: SqlBackend) -> float:
    backend.find_available_tasks("plan-worker", FIND_LIMIT)  # warm the pool and caches
    durations = []
    for _ in range(TIMED_CALLS):
        started = time.perf_counter()
        found = backend.find_available_tasks("plan-worker", FIND_LIMIT)
        durations.append((time.perf_counter() - started) * 1000)
        assert len(found) == FIND_LIMIT
    return statistics.median(durations)


def _sent_statements(backend: SqlBackend, call: Any) -> list[tuple[str, Any]]:
    """The statements ``call()`` sends, with their parameters."""
    captured: list[tuple[str, Any]] = []

    def capture(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        captured.append((statement, parameters))

    sa.event.listen(backend.engine, "before_cursor_execute", capture)
    try:
        call()
    finally:
        sa.event.remove(backend.engine, "before_cursor_execute", capture)
    return captured


def _candidate_statements(backend: SqlBackend, call: Any) -> list[tuple[str, Any]]:
    """The statements ``call()`` sends that read sayiir_ready_tasks, with their parameters."""
    captured = _sent_statements(backend, call)
    # The candidate query is the one that merges one ordered scan per priority (the locks
    # claim_available_tasks takes afterwards also name the table but look up given keys).
    return [
        (statement, parameters)
        for statement, parameters in captured
        if CANDIDATE_MARK in statement and "UNION ALL" in statement
    ]


def _explain(
    url: str, statement: str, parameters: Any, *, without_seqscan: bool = False
) -> dict[str, Any]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            if without_seqscan:  # the plan the indexes allow, whatever the planner prefers
                cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            row = cursor.fetchone()
            assert row is not None
            document = row[0]
            raw.rollback()
        finally:
            raw.close()
    finally:
        engine.dispose()
    plan = json.loads(document) if isinstance(document, str) else document
    return plan[0]["Plan"]  # type: ignore[no-any-return]


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _summary(plan: dict[str, Any], depth: int = 0) -> list[str]:
    """One line per plan node: type, relation, index and estimated rows."""
    parts = [plan["Node Type"]]
    if "Relation Name" in plan:
        parts.append(f"on {plan['Relation Name']}")
    if "Index Name" in plan:
        parts.append(f"using {plan['Index Name']}")
    if "Index Cond" in plan:
        parts.append(f"[{plan['Index Cond']}]")
    parts.append(f"(rows={plan.get('Plan Rows')}, cost={plan.get('Total Cost')})")
    lines = ["  " * depth + " ".join(parts)]
    for child in plan.get("Plans", []):
        lines.extend(_summary(child, depth + 1))
    return lines


def _check_plan(plan: dict[str, Any], label: str) -> None:
    ready_scans = [node for node in _nodes(plan) if node.get("Relation Name") == ready_tasks.name]
    print(f"\n[{label}] EXPLAIN (FORMAT JSON) summary:\n" + "\n".join(_summary(plan)))
    assert ready_scans, f"{label}: the plan does not read {ready_tasks.name}"
    sequential = [
        node["Relation Name"]
        for node in _nodes(plan)
        if node["Node Type"] == "Seq Scan"
        and node.get("Relation Name") in (ready_tasks.name, task_claims.name)
    ]
    assert not sequential, f"{label}: sequential scan on {sequential}"
    ordered = [
        node
        for node in ready_scans
        if node["Node Type"] in INDEX_SCANS and node.get("Index Name") == ORDER_INDEX
    ]
    assert ordered, (
        f"{label}: no index scan using {ORDER_INDEX}; scans of {ready_tasks.name}: "
        f"{[(node['Node Type'], node.get('Index Name')) for node in ready_scans]}"
    )


def test_find_and_claim_available_tasks_use_the_ready_tasks_index_at_100k(
    plans_url: str,
) -> None:
    backend = SqlBackend(plans_url)
    try:
        _seed(plans_url, 0, SMALL_WORKFLOWS)
        small_p50 = _p50_find_ms(backend)
        _seed(plans_url, SMALL_WORKFLOWS, LARGE_WORKFLOWS)
        large_p50 = _p50_find_ms(backend)

        statements = {
            "find_available_tasks": _candidate_statements(
                backend, lambda: backend.find_available_tasks("plan-worker", FIND_LIMIT)
            ),
            "claim_available_tasks": _candidate_statements(
                backend,
                lambda: backend.claim_available_tasks(
                    "plan-worker", FIND_LIMIT, timedelta(minutes=5)
                ),
            ),
        }
        for label, captured in statements.items():
            assert len(captured) == 1, f"{label}: expected one candidate query, got {captured}"
            statement, parameters = captured[0]
            _check_plan(_explain(plans_url, statement, parameters), label)
    finally:
        backend.close()

    print(
        f"\n[find_available_tasks(limit={FIND_LIMIT})] p50 over {TIMED_CALLS} calls: "
        f"{small_p50:.2f} ms at {SMALL_WORKFLOWS:,} rows, {large_p50:.2f} ms at "
        f"{LARGE_WORKFLOWS:,} rows (ratio {large_p50 / small_p50:.2f})"
    )


# -- store_stats ------------------------------------------------------------------------------

#: Every FINISHED_EVERY-th seeded workflow is completed (its ready row gone), so that the
#: status counts read a table holding more than one status.
FINISHED_EVERY = 5
#: The tables a stats query must never read sequentially.
BIG_TABLES = frozenset({workflows.name, ready_tasks.name, task_claims.name, task_results.name})
#: What marks the stats queries among the statements store_stats sends (not the clock read).
STATS_MARK = "FROM sayiir_"
#: The workflows' input in the stats test: a workflow row as wide as a modest real one (a
#: 5-byte input makes the table so narrow that reading it whole is as cheap as its index).
REALISTIC_INPUT = bytes(range(256)) * 2


def _seed_history(url: str, start: int, stop: int) -> None:
    """Give workflows ``start..stop-1`` a finished first task ``s``: its result (recorded over
    the last 24 hours, oldest first) and its released claim; complete every FINISHED_EVERY-th
    workflow (its ready row deleted, as a completing save does). Then VACUUM ANALYZE, as
    autovacuum would have by then (index-only scans need the visibility map)."""
    now = datetime.now(UTC)
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        for first in range(start, stop, INSERT_BATCH):
            numbers = range(first, min(first + INSERT_BATCH, stop))
            span = timedelta(hours=24) / (stop - start)
            result_rows = [
                {
                    "instance_id": f"plan-{number:06d}",
                    "task_id": "s",
                    "output": b"output",
                    "completed_at": now - timedelta(hours=24) + span * (number - start),
                }
                for number in numbers
            ]
            claim_rows = [
                {
                    "instance_id": f"plan-{number:06d}",
                    "task_id": "s",
                    "worker_id": f"worker-{number % 8}",
                    "token": 1,
                    "claimed_at": now - timedelta(hours=25),
                    "expires_at": now - timedelta(hours=24),
                    "released": True,
                }
                for number in numbers
            ]
            finished = [f"plan-{number:06d}" for number in numbers if number % FINISHED_EVERY == 1]
            with engine.begin() as conn:
                conn.execute(sa.insert(task_results), result_rows)
                conn.execute(sa.insert(task_claims), claim_rows)
                conn.execute(
                    sa.update(workflows)
                    .where(workflows.c.instance_id.in_(finished))
                    .values(status=WorkflowStatus.COMPLETED.value)
                )
                conn.execute(sa.delete(ready_tasks).where(ready_tasks.c.instance_id.in_(finished)))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    finally:
        engine.dispose()


def _stats_statements(backend: SqlBackend) -> list[tuple[str, Any]]:
    """The statements ``store_stats`` sends that read a table, with their parameters."""
    captured = _sent_statements(backend, backend.store_stats)
    return [
        (statement, parameters) for statement, parameters in captured if STATS_MARK in statement
    ]


def test_store_stats_queries_are_served_by_indexes_at_100k(plans_url: str) -> None:
    _seed(plans_url, 0, LARGE_WORKFLOWS, REALISTIC_INPUT)
    _seed_history(plans_url, 0, LARGE_WORKFLOWS)
    backend = SqlBackend(plans_url)
    try:
        stats = backend.store_stats()
        statements = _stats_statements(backend)
        started = time.perf_counter()
        backend.store_stats()
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        backend.close()

    # The seeded figures, so that the plans below are those of a query that works.
    finished = len(range(1, LARGE_WORKFLOWS, FINISHED_EVERY))
    assert stats.workflows[WorkflowStatus.COMPLETED] == finished
    assert stats.workflows[WorkflowStatus.IN_PROGRESS] == LARGE_WORKFLOWS - finished
    claimed = len(range(0, LARGE_WORKFLOWS, CLAIMED_EVERY))  # none of them finished
    assert stats.runnable_total == LARGE_WORKFLOWS - finished - claimed
    assert [(c.worker_id, c.live, c.expired) for c in stats.claims] == [("busy-worker", claimed, 0)]
    assert 0 < stats.completed_last_hour < 2 * LARGE_WORKFLOWS / 24

    read = set()
    assert len(statements) == 4, [statement for statement, _ in statements]
    for statement, parameters in statements:
        label = statement.split("FROM", 1)[1].split()[0]
        # The runnable count reads whole priorities of the narrow ready rows (a fifth of the
        # table each here), where reading the table in sequence costs the planner about as
        # much as the index ranges: its choice flips between runs. What is checked there is
        # that the order index serves each priority (seqscan off); elsewhere the plan itself.
        ready = label == ready_tasks.name
        plan = _explain(plans_url, statement, parameters, without_seqscan=ready)
        print(f"\n[store_stats, FROM {label}] EXPLAIN (FORMAT JSON) summary:")
        print("\n".join(_summary(plan)))
        sequential = [
            node["Relation Name"]
            for node in _nodes(plan)
            if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in BIG_TABLES
        ]
        assert not sequential, f"store_stats ({label}): sequential scan on {sequential}"
        if ready:
            ranges = [
                node
                for node in _nodes(plan)
                if node.get("Index Name") == ORDER_INDEX
                and "priority" in node.get("Index Cond", "")
            ]
            assert len(ranges) == MAX_PRIORITY - MIN_PRIORITY + 1, _summary(plan)
        read |= {node.get("Relation Name") for node in _nodes(plan)}
    assert read >= BIG_TABLES, f"store_stats read only {read & BIG_TABLES}"
    print(f"\n[store_stats] one call at {LARGE_WORKFLOWS:,} workflows: {elapsed_ms:.1f} ms")
