"""Corrupt stored data on every database (docs/contract.md#errors).

Garbage is written into one column of one workflow with raw SQL, as a careless hand or
another program would; the calls that must decode it then raise ``CorruptDataError`` naming
the instance and the column (never a raw ``JSONDecodeError``, ``KeyError`` or ``ValueError``),
write nothing, and leave the other workflows usable. ``delete_snapshot`` and
``start_workflow(TERMINATE_EXISTING)`` get rid of the corrupt instance.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from helpers.isolated_db import isolated_database
from sayiir_persistence import (
    AtFork,
    AtSignal,
    AtTask,
    CompletionOutcome,
    ConflictError,
    CorruptDataError,
    IfExists,
    NotFoundError,
    SqlBackend,
    TaskCompletion,
    WorkflowSnapshot,
    migrate,
)
from sayiir_persistence.inspection import StoreInspector

TTL = timedelta(minutes=10)
VICTIM = "victim-1"
HEALTHY = "healthy-1"

# (column, garbage): each cannot be decoded; ids name the reason.
GARBAGE = [
    pytest.param("position", "not json", id="position-not-json"),
    pytest.param("position", '{"kind": "teleport"}', id="position-unknown-kind"),
    pytest.param("position", '["task", "t1"]', id="position-not-an-object"),
    pytest.param("position", '{"kind": "task"}', id="position-missing-task-id"),
    pytest.param("position", '{"kind": "task", "task_id": ""}', id="position-empty-task-id"),
    pytest.param("position", '{"kind": "task", "task_id": 7}', id="position-task-id-not-str"),
    pytest.param(
        "position",
        '{"kind": "fork", "fork_id": "f", "branch_task_ids": "ab"}',
        id="position-branches-not-a-list",
    ),
    pytest.param(
        "position",
        '{"kind": "delay", "delay_id": "d", "wake_at": "yesterday", "next_task_id": null}',
        id="position-bad-wake-at",
    ),
    pytest.param(
        "position",
        '{"kind": "delay", "delay_id": "d", "wake_at": "2030-01-01T00:00:00", '
        '"next_task_id": null}',
        id="position-naive-wake-at",
    ),
    pytest.param("tags", "[gpu", id="tags-not-json"),
    pytest.param("tags", '"gpu"', id="tags-a-string"),
    pytest.param("tags", '{"gpu": true}', id="tags-an-object"),
    pytest.param("tags", "[1]", id="tags-not-str"),
    pytest.param("status", "exploded", id="status-unknown"),
    pytest.param("cancel_request", "{", id="cancel-request-not-json"),
    pytest.param("cancel_request", '{"reason": null}', id="cancel-request-missing-keys"),
    pytest.param(
        "pause_request",
        '{"reason": 1, "requested_by": null, "requested_at": "2024-01-01T00:00:00+00:00"}',
        id="pause-request-reason-not-str",
    ),
    pytest.param(
        "pause_request",
        '{"reason": null, "requested_by": null, "requested_at": "2024-01-01T00:00:00"}',
        id="pause-request-naive-time",
    ),
]


@pytest.fixture
def backend(sql_url: str) -> Iterator[SqlBackend]:
    """A backend on a private, migrated database (its tables are ours to spoil)."""
    with isolated_database(sql_url) as url:
        migrate(url)
        with SqlBackend(url) as backend:
            yield backend


def corrupt(backend: SqlBackend, instance_id: str, column: str, garbage: str) -> None:
    """Write ``garbage`` into one column of one workflow row, behind the store's back."""
    # The column name comes from this module's own table above, never from input.
    statement = sa.text(f"UPDATE sayiir_workflows SET {column} = :garbage WHERE instance_id = :id")
    with backend.engine.begin() as conn:
        assert conn.execute(statement, {"garbage": garbage, "id": instance_id}).rowcount == 1


def start(backend: SqlBackend, instance_id: str, *, priority: int = 3) -> WorkflowSnapshot:
    return backend.start_workflow(
        WorkflowSnapshot.new(instance_id, "h", first_task="t1", priority=priority)
    )


def assert_names_the_row(error: CorruptDataError, column: str) -> None:
    message = str(error)
    assert VICTIM in message and f"sayiir_workflows.{column}" in message, message
    assert (error.instance_id, error.column) == (VICTIM, f"sayiir_workflows.{column}")
    assert isinstance(error.__cause__, ValueError | TypeError | KeyError)


def corruption_raised(column: str) -> pytest.RaisesExc[CorruptDataError]:
    return pytest.raises(CorruptDataError, match=re.escape(f"sayiir_workflows.{column}"))


@pytest.mark.parametrize(("column", "garbage"), GARBAGE)
def test_loading_a_corrupt_row_names_the_instance_and_the_column(
    backend: SqlBackend, column: str, garbage: str
) -> None:
    start(backend, VICTIM)
    healthy = start(backend, HEALTHY)
    corrupt(backend, VICTIM, column, garbage)

    with corruption_raised(column) as raised:
        backend.load_snapshot(VICTIM)
    assert_names_the_row(raised.value, column)

    # The others go on, and so do the calls that do not decode the row.
    assert backend.load_snapshot(HEALTHY) == healthy
    assert backend.list_snapshots() == [HEALTHY, VICTIM]
    assert backend.load_task_result(VICTIM, "t1") is None


@pytest.mark.parametrize(("column", "garbage"), GARBAGE)
def test_a_corrupt_row_is_deleted_or_replaced(
    backend: SqlBackend, column: str, garbage: str
) -> None:
    start(backend, VICTIM)
    start(backend, "victim-2")
    corrupt(backend, VICTIM, column, garbage)
    corrupt(backend, "victim-2", column, garbage)

    with pytest.raises(ConflictError, match=VICTIM):
        start(backend, VICTIM)  # FAIL needs no decoding
    with corruption_raised(column):
        backend.start_workflow(
            WorkflowSnapshot.new(VICTIM, "h", first_task="t1"), if_exists=IfExists.USE_EXISTING
        )

    replaced = backend.start_workflow(
        WorkflowSnapshot.new(VICTIM, "h2", first_task="t2"),
        if_exists=IfExists.TERMINATE_EXISTING,
    )
    assert backend.load_snapshot(VICTIM) == replaced
    assert (replaced.version, replaced.position) == (1, AtTask("t2"))

    backend.delete_snapshot("victim-2")
    with pytest.raises(NotFoundError):
        backend.load_snapshot("victim-2")


@pytest.mark.parametrize("garbage", ["not json", '"gpu"', "[1]"])
def test_available_tasks_of_a_corrupt_row_are_refused_and_nothing_is_claimed(
    backend: SqlBackend, garbage: str
) -> None:
    start(backend, HEALTHY, priority=1)  # handed out before the victim
    start(backend, VICTIM, priority=5)
    corrupt(backend, VICTIM, "tags", garbage)

    # A worker whose tasks do not include the victim's is served.
    [first] = backend.find_available_tasks("w", 1)
    assert first.instance_id == HEALTHY
    for call in (
        lambda: backend.find_available_tasks("w", 10),
        lambda: backend.claim_available_tasks("w", 10, TTL),
    ):
        with corruption_raised("tags") as raised:
            call()
        assert_names_the_row(raised.value, "tags")

    # The refused claim took nothing: both tasks are still free, with their first token.
    [claimed] = backend.claim_available_tasks("w", 1, TTL)
    assert (claimed.task.instance_id, claimed.claim.token) == (HEALTHY, 1)
    victim = backend.claim_task(VICTIM, "t1", "w", TTL)  # decodes nothing: still works
    assert victim is not None and victim.token == 1


def test_completions_and_results_of_a_corrupt_row_are_refused_whole(
    backend: SqlBackend,
) -> None:
    start(backend, HEALTHY)
    start(backend, VICTIM)
    healthy = backend.claim_task(HEALTHY, "t1", "w", TTL)
    victim = backend.claim_task(VICTIM, "t1", "w", TTL)
    assert healthy is not None and victim is not None
    corrupt(backend, VICTIM, "position", "{oops")

    completions = [
        TaskCompletion(HEALTHY, "t1", "w", healthy.token, output=b"ok"),
        TaskCompletion(VICTIM, "t1", "w", victim.token, output=b"ok"),
    ]
    with corruption_raised("position") as raised:
        backend.complete_tasks(completions, ttl=TTL)
    assert_names_the_row(raised.value, "position")
    with corruption_raised("position"):
        backend.save_task_result(VICTIM, "t1", b"ok")
    assert backend.load_task_result(VICTIM, "t1") is None
    assert backend.load_task_result(HEALTHY, "t1") is None  # the batch wrote nothing

    [done] = backend.complete_tasks(completions[:1], ttl=TTL)
    assert done.outcome is CompletionOutcome.RECORDED


def test_a_corrupt_signal_kind_is_named(backend: SqlBackend) -> None:
    start(backend, VICTIM)
    claim = backend.claim_task(VICTIM, "t1", "w", TTL)
    assert claim is not None
    insert = sa.text(
        "INSERT INTO sayiir_signals (instance_id, kind, requested_at) VALUES (:id, 'explode', :at)"
    )
    with backend.engine.begin() as conn:
        conn.execute(insert, {"id": VICTIM, "at": "2024-01-01 00:00:00"})

    with pytest.raises(CorruptDataError, match=r"sayiir_signals\.kind") as raised:
        backend.extend_task_claim(VICTIM, "t1", "w", TTL)
    assert VICTIM in str(raised.value) and raised.value.column == "sayiir_signals.kind"


def test_stalled_fork_sweep_and_inspection_name_the_corrupt_row(backend: SqlBackend) -> None:
    parked = WorkflowSnapshot.new(VICTIM, "h")
    parked.move_to(AtSignal("s", "go"))  # in progress, nothing runnable: a sweep reads it
    backend.start_workflow(parked)
    fork = WorkflowSnapshot.new(HEALTHY, "h")
    fork.move_to(AtFork("f", ("a",)))
    backend.start_workflow(fork)
    corrupt(backend, VICTIM, "position", '{"kind": "signal"}')

    with corruption_raised("position"):
        backend.list_stalled_forks()

    corrupt(backend, VICTIM, "status", "exploded")
    inspector = StoreInspector(backend.engine)
    [summary] = inspector.summaries([HEALTHY])
    assert summary.instance_id == HEALTHY
    with corruption_raised("status") as raised:
        inspector.summaries([HEALTHY, VICTIM])
    assert_names_the_row(raised.value, "status")
