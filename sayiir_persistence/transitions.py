"""State changes a store applies to a snapshot itself (not the worker's mutators).

Shared by every backend so they cannot drift apart: each function mutates a stored
snapshot in place and knows nothing about locking or persistence.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from .errors import CannotCancelError, CannotPauseError, InvalidStateError
from .model import (
    AtFork,
    AtSignal,
    AtTask,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowSnapshot,
    WorkflowStatus,
    position_task_ids,
)


def is_stalled_fork(snapshot: WorkflowSnapshot) -> bool:
    """In progress at an ``AtFork`` whose branches are all completed: nothing is runnable
    until a worker moves the workflow past the join (see ``list_stalled_forks``)."""
    position = snapshot.position
    return (
        snapshot.status is WorkflowStatus.IN_PROGRESS
        and isinstance(position, AtFork)
        and all(task_id in snapshot.completed_tasks for task_id in position.branch_task_ids)
    )


def unfinished_tasks(position: Position, completed: Iterable[str]) -> tuple[str, ...]:
    """The tasks of ``position`` without a result: of a failed workflow, those it failed at,
    which ``retry_workflow`` re-queues (a delay's next task whatever its ``wake_at``)."""
    done = set(completed)
    return tuple(task_id for task_id in position_task_ids(position, None) if task_id not in done)


def signal_already_applied(instance_id: str, status: WorkflowStatus, kind: SignalKind) -> bool:
    """Whether ``store_signal`` has nothing to do; raise if the signal is not allowed.

    Raises:
        CannotCancelError: cancel on a completed or failed workflow.
        CannotPauseError: pause on a completed, failed or cancelled workflow.
    """
    if kind is SignalKind.CANCEL:
        if status in (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED):
            raise CannotCancelError(f"workflow {instance_id!r} is {status.value}")
        return status is WorkflowStatus.CANCELLED
    if status.is_terminal:
        raise CannotPauseError(f"workflow {instance_id!r} is {status.value}")
    return status is WorkflowStatus.PAUSED


def is_signal_applicable(status: WorkflowStatus, kind: SignalKind) -> bool:
    """Whether ``check_and_cancel`` / ``check_and_pause`` may apply to this status."""
    if kind is SignalKind.CANCEL:
        return status in (WorkflowStatus.IN_PROGRESS, WorkflowStatus.PAUSED)
    return status is WorkflowStatus.IN_PROGRESS


def apply_signal(snapshot: WorkflowSnapshot, kind: SignalKind, request: SignalRequest) -> None:
    """Cancel or pause the workflow, recording the request that caused it."""
    if kind is SignalKind.CANCEL:
        snapshot.status = WorkflowStatus.CANCELLED
        snapshot.cancel_request = request
    else:
        snapshot.status = WorkflowStatus.PAUSED
        snapshot.pause_request = request


def unpause(snapshot: WorkflowSnapshot) -> None:
    snapshot.status = WorkflowStatus.IN_PROGRESS
    snapshot.pause_request = None


def retry(snapshot: WorkflowSnapshot) -> None:
    """Put a failed workflow back in progress at its position, its error cleared
    (docs/contract.md#retry_workflow). The store drops its claims and pending signals.

    Raises:
        InvalidStateError: the workflow is not failed (the message names its status).
    """
    if snapshot.status is not WorkflowStatus.FAILED:
        raise InvalidStateError(
            f"workflow {snapshot.instance_id!r} is {snapshot.status.value}, not failed: "
            "only a failed workflow can be retried"
        )
    snapshot.status = WorkflowStatus.IN_PROGRESS
    snapshot.error = None


def timed_out_error(deadline: datetime) -> str:
    """The error of a workflow failed by its deadline (docs/contract.md#fail_overdue_workflows)."""
    return f"workflow timed out: its deadline {deadline.isoformat()} passed"


def waits_for_event(snapshot: WorkflowSnapshot, name: str) -> bool:
    """True when an event ``name`` wakes this workflow instead of being buffered."""
    position = snapshot.position
    return (
        snapshot.status is WorkflowStatus.IN_PROGRESS
        and isinstance(position, AtSignal)
        and position.signal_name == name
    )


def deliver_event(snapshot: WorkflowSnapshot, payload: bytes) -> str:
    """Record ``payload`` as the result of the awaited signal and move the workflow on.

    Returns the signal id whose result was recorded. Call only when
    :func:`waits_for_event` is true.
    """
    position = snapshot.position
    assert isinstance(position, AtSignal)
    snapshot.completed_tasks[position.signal_id] = payload
    snapshot.last_completed_task_id = position.signal_id
    if position.next_task_id is None:
        snapshot.status = WorkflowStatus.COMPLETED
        snapshot.output = payload
    else:
        snapshot.position = AtTask(position.next_task_id)
        snapshot.input_task_id = position.signal_id
    return position.signal_id
