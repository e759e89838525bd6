"""The data model on its own, no store involved: ``WorkflowSnapshot`` (``new``, the mutators,
``runnable_task_ids``), positions, ``TaskClaim.is_expired`` and the validation of model values.

Moved out of ``BackendContract`` (they never touch a backend, so they run once here rather than
once per backend); the rules are in docs/contract.md, "Data model".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sayiir_persistence import (
    AtDelay,
    AtFork,
    AtSignal,
    AtTask,
    InvalidInputError,
    InvalidStateError,
    NotStarted,
    Position,
    TaskClaim,
    WorkflowSnapshot,
    WorkflowStatus,
)
from sayiir_persistence.testing.builders import (
    BAD_STR,
    HASH,
    NAIVE,
    NOT_IN_PROGRESS,
    T0,
    WORKER,
    assert_utc,
    make_snapshot,
)


def test_snapshot_new_defaults_in_progress_at_first_task() -> None:
    snapshot = WorkflowSnapshot.new("wf", HASH, first_task="t1")
    assert snapshot.status is WorkflowStatus.IN_PROGRESS
    assert snapshot.position == AtTask("t1")
    assert snapshot.priority == 3
    assert snapshot.version == 0
    assert snapshot.tags == frozenset()
    assert snapshot.completed_tasks == {}
    assert snapshot.last_completed_task_id is None
    assert snapshot.initial_input is None
    assert (snapshot.output, snapshot.error) == (None, None)
    assert (snapshot.cancel_request, snapshot.pause_request) == (None, None)
    assert_utc(snapshot.created_at)
    assert_utc(snapshot.updated_at)


def test_snapshot_new_without_first_task_is_not_started() -> None:
    assert WorkflowSnapshot.new("wf", HASH).position == NotStarted()


def test_snapshot_new_keeps_input_priority_and_tags() -> None:
    snapshot = WorkflowSnapshot.new(
        "wf", HASH, initial_input=b"in", first_task="t1", priority=1, tags=["gpu", "eu"]
    )
    assert snapshot.initial_input == b"in"
    assert snapshot.priority == 1
    assert snapshot.tags == frozenset({"gpu", "eu"})
    assert isinstance(snapshot.tags, frozenset)


@pytest.mark.parametrize("status", NOT_IN_PROGRESS)
@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: s.mark_task_completed("t1", b"x"), id="mark_task_completed"),
        pytest.param(lambda s: s.move_to(AtTask("t2")), id="move_to"),
        pytest.param(lambda s: s.mark_completed(b"x"), id="mark_completed"),
        pytest.param(lambda s: s.mark_failed("boom"), id="mark_failed"),
    ],
)
def test_snapshot_mutators_raise_invalid_state_unless_in_progress(
    status: WorkflowStatus, mutate: Callable[[WorkflowSnapshot], None]
) -> None:
    snapshot = make_snapshot("wf")
    snapshot.status = status
    before = dataclasses.replace(snapshot, completed_tasks=dict(snapshot.completed_tasks))
    with pytest.raises(InvalidStateError):
        mutate(snapshot)
    assert snapshot == before


def test_snapshot_mutators_record_results_and_outcomes() -> None:
    snapshot = make_snapshot("wf")
    snapshot.mark_task_completed("t1", b"one")
    assert snapshot.completed_tasks == {"t1": b"one"}
    assert snapshot.last_completed_task_id == "t1"
    snapshot.mark_completed(b"result")
    assert (snapshot.status, snapshot.output) == (WorkflowStatus.COMPLETED, b"result")

    failed = make_snapshot("wf2")
    failed.mark_failed("boom")
    assert (failed.status, failed.error) == (WorkflowStatus.FAILED, "boom")


def test_move_to_makes_last_completed_output_the_position_input() -> None:
    snapshot = make_snapshot("wf", initial_input=b"initial")
    assert snapshot.input_for_position == b"initial"
    snapshot.mark_task_completed("t1", b"one")
    snapshot.move_to(AtTask("t2"))
    assert snapshot.position == AtTask("t2")
    assert snapshot.input_for_position == b"one"
    # A branch finishing does not change the input of its siblings until the next move.
    snapshot.mark_task_completed("t2", b"two")
    snapshot.move_to(AtFork("f", ("a", "b")))
    snapshot.mark_task_completed("a", b"A")
    assert snapshot.input_for_position == b"two"


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        pytest.param(NotStarted(), (), id="not-started"),
        pytest.param(AtTask("t1"), ("t1",), id="at-task"),
        pytest.param(AtFork("f", ("a", "b", "c")), ("a", "b", "c"), id="at-fork"),
        pytest.param(
            AtDelay("d", T0 + timedelta(microseconds=1), "t2"), (), id="delay-before-wake"
        ),
        pytest.param(AtDelay("d", T0, "t2"), ("t2",), id="delay-exactly-at-wake"),
        pytest.param(AtDelay("d", T0 - timedelta(hours=1), "t2"), ("t2",), id="delay-woken"),
        pytest.param(AtDelay("d", T0 - timedelta(hours=1)), (), id="delay-without-next"),
        pytest.param(AtSignal("s", "go", None, "t2"), (), id="signal"),
        pytest.param(AtSignal("s", "go", T0 - timedelta(hours=1), "t2"), (), id="signal-woken"),
    ],
)
def test_runnable_task_ids_by_position(position: Position, expected: tuple[str, ...]) -> None:
    snapshot = make_snapshot("wf", first_task=None)
    snapshot.move_to(position)
    assert snapshot.runnable_task_ids(now=T0) == expected


def test_runnable_task_ids_never_include_completed_tasks() -> None:
    snapshot = make_snapshot("wf", first_task=None)
    snapshot.move_to(AtFork("f", ("a", "b")))
    snapshot.mark_task_completed("a", b"A")
    assert snapshot.runnable_task_ids(now=T0) == ("b",)
    at_task = make_snapshot("wf2")
    at_task.mark_task_completed("t1", b"one")
    assert at_task.runnable_task_ids(now=T0) == ()


@pytest.mark.parametrize("status", NOT_IN_PROGRESS)
def test_runnable_task_ids_empty_unless_in_progress(status: WorkflowStatus) -> None:
    snapshot = make_snapshot("wf")
    snapshot.status = status
    assert snapshot.runnable_task_ids(now=T0) == ()


def test_task_claim_is_expired_from_exactly_expires_at() -> None:
    claim = TaskClaim("wf", "t1", WORKER, T0, T0 + timedelta(seconds=30), 1)
    assert not claim.is_expired(T0 + timedelta(seconds=30, microseconds=-1))
    assert claim.is_expired(T0 + timedelta(seconds=30))
    assert claim.is_expired(T0 + timedelta(seconds=31))


def test_task_claim_without_expiry_never_expires() -> None:
    claim = TaskClaim("wf", "t1", WORKER, T0, None, 1)
    assert not claim.is_expired(datetime.max.replace(tzinfo=UTC))
    assert not claim.is_expired()


# -- invalid model values ----------------------------------------------------------------------

INVALID_MODEL_VALUES: list[Any] = [
    pytest.param(lambda: WorkflowSnapshot.new("", HASH), "instance_id", id="new-id-empty"),
    pytest.param(lambda: WorkflowSnapshot.new("w", HASH, priority=0), "priority", id="prio-0"),
    pytest.param(lambda: WorkflowSnapshot.new("w", HASH, priority=6), "priority", id="prio-6"),
    pytest.param(lambda: WorkflowSnapshot.new("w", HASH, initial_input=BAD_STR), "initial_input"),
    pytest.param(lambda: AtTask(""), "task_id", id="at-task-empty"),
    pytest.param(lambda: AtFork("f", ("a", "b" * 256)), "branch_task_ids", id="fork-branch"),
    pytest.param(lambda: AtDelay("d", NAIVE, "t2"), "wake_at", id="delay-naive"),
    pytest.param(lambda: AtSignal("s", "go", NAIVE, "t2"), "wake_at", id="signal-naive"),
]


@pytest.mark.parametrize(("make", "argument"), INVALID_MODEL_VALUES)
def test_invalid_model_value_raises_invalid_input_naming_it(
    make: Callable[[], object], argument: str
) -> None:
    with pytest.raises(InvalidInputError, match=argument):
        make()
