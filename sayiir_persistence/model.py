"""The data model: workflow snapshots, positions, claims and signals.

Everything here is plain data. Snapshots are mutable (their mutators enforce the status
rules); positions, claims and tasks are frozen. Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import NoReturn, Self, TypeAlias

from .errors import InvalidInputError, InvalidStateError
from .validation import (
    check_aware,
    check_bytes,
    check_id,
    check_optional_aware,
    check_optional_bytes,
    check_optional_id,
    check_optional_traceparent,
    check_priority,
    check_tags,
    check_text,
)


def utc_now() -> datetime:
    """The current time as an aware UTC ``datetime``."""
    return datetime.now(UTC)


class WorkflowStatus(StrEnum):
    """Lifecycle of a workflow instance. Completed, failed and cancelled are terminal."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED})


class SignalKind(StrEnum):
    """An operator's request to a running workflow."""

    CANCEL = "cancel"
    PAUSE = "pause"


class IfExists(StrEnum):
    """What ``start_workflow`` does when the instance is stored already
    (docs/contract.md#start_workflow)."""

    FAIL = "fail"
    """Refuse with ``ConflictError``; nothing is written."""
    USE_EXISTING = "use_existing"
    """Return the stored instance unchanged if it runs the same definition (same
    ``definition_hash``); ``ConflictError`` otherwise."""
    TERMINATE_EXISTING = "terminate_existing"
    """Replace it atomically: everything attached to the old run goes, its claims' holders
    are fenced off, the new snapshot starts at version 1."""


@dataclass(frozen=True)
class SignalRequest:
    """Who asked for a cancel or pause, when and why."""

    reason: str | None = None
    requested_by: str | None = None
    requested_at: datetime = field(default_factory=utc_now)


# --- positions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NotStarted:
    """The workflow has not reached its first task yet."""


@dataclass(frozen=True)
class AtTask:
    """The workflow waits for one task to run."""

    task_id: str

    def __post_init__(self) -> None:
        check_id(self.task_id, "AtTask.task_id")


@dataclass(frozen=True)
class AtFork:
    """Several branches are runnable in parallel; each branch is a task id."""

    fork_id: str
    branch_task_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        check_id(self.fork_id, "AtFork.fork_id")
        if isinstance(self.branch_task_ids, str) or not isinstance(
            self.branch_task_ids, tuple | list
        ):
            raise_invalid("AtFork.branch_task_ids must be a tuple of str")
        # Accept a list for convenience but store the immutable form.
        object.__setattr__(self, "branch_task_ids", tuple(self.branch_task_ids))
        for task_id in self.branch_task_ids:
            check_id(task_id, "AtFork.branch_task_ids item")


@dataclass(frozen=True)
class AtDelay:
    """A timer: once ``wake_at`` has passed, ``next_task_id`` is runnable."""

    delay_id: str
    wake_at: datetime
    next_task_id: str | None = None

    def __post_init__(self) -> None:
        check_id(self.delay_id, "AtDelay.delay_id")
        object.__setattr__(self, "wake_at", check_aware(self.wake_at, "AtDelay.wake_at"))
        check_optional_id(self.next_task_id, "AtDelay.next_task_id")


@dataclass(frozen=True)
class AtSignal:
    """Parked until an event named ``signal_name`` arrives (see ``send_event``)."""

    signal_id: str
    signal_name: str
    wake_at: datetime | None = None
    next_task_id: str | None = None

    def __post_init__(self) -> None:
        check_id(self.signal_id, "AtSignal.signal_id")
        check_id(self.signal_name, "AtSignal.signal_name")
        object.__setattr__(self, "wake_at", check_optional_aware(self.wake_at, "AtSignal.wake_at"))
        check_optional_id(self.next_task_id, "AtSignal.next_task_id")


Position: TypeAlias = NotStarted | AtTask | AtFork | AtDelay | AtSignal
POSITION_TYPES = (NotStarted, AtTask, AtFork, AtDelay, AtSignal)


def raise_invalid(message: str) -> NoReturn:
    raise InvalidInputError(message)


# --- snapshot --------------------------------------------------------------------------------


@dataclass
class WorkflowSnapshot:
    """The whole execution state of one workflow instance.

    Build one with :meth:`new`, move it on with the mutators, and save it with a backend.
    ``version`` is 0 until the first save and is set by the store on each save.
    Payload sizes are checked when the snapshot is saved, against the backend's
    ``max_payload_bytes``; the mutators check types only.

    ``input_task_id`` is bookkeeping for :class:`AvailableTask.input`: the task whose output
    feeds the current position (``None``: the initial input). :meth:`move_to` sets it.

    ``deadline``: the workflow-level timeout. Once the store clock passes it, a workflow still
    in progress or paused is failed (docs/contract.md#fail_overdue_workflows).

    ``trace_context``: the W3C ``traceparent`` the workflow's task spans continue, so one
    workflow is one trace across workers (docs/contract.md#trace-context). Stored when the
    workflow is created and kept by every later write.
    """

    instance_id: str
    definition_hash: str
    status: WorkflowStatus = WorkflowStatus.IN_PROGRESS
    position: Position = field(default_factory=NotStarted)
    completed_tasks: dict[str, bytes] = field(default_factory=dict)
    last_completed_task_id: str | None = None
    initial_input: bytes | None = None
    output: bytes | None = None
    error: str | None = None
    cancel_request: SignalRequest | None = None
    pause_request: SignalRequest | None = None
    priority: int = 3
    tags: frozenset[str] = field(default_factory=frozenset)
    created_at: datetime = field(default_factory=utc_now)
    updated_at: datetime = field(default_factory=utc_now)
    version: int = 0
    input_task_id: str | None = None
    deadline: datetime | None = None
    trace_context: str | None = None

    @classmethod
    def new(
        cls,
        instance_id: str,
        definition_hash: str,
        *,
        initial_input: bytes | None = None,
        first_task: str | None = None,
        priority: int = 3,
        tags: tuple[str, ...] | frozenset[str] | list[str] | set[str] = (),
        deadline: datetime | None = None,
        trace_context: str | None = None,
    ) -> Self:
        """A new in-progress snapshot at ``AtTask(first_task)`` (or ``NotStarted()``), failed
        by the store once ``deadline`` has passed (``None``: no workflow-level timeout), whose
        task spans continue ``trace_context`` (a W3C ``traceparent``; ``None``: the span
        current when it is started, if any)."""
        check_id(instance_id, "instance_id")
        check_id(definition_hash, "definition_hash")
        check_optional_bytes(initial_input, "initial_input")
        position: Position = NotStarted() if first_task is None else AtTask(first_task)
        now = utc_now()
        return cls(
            instance_id=instance_id,
            definition_hash=definition_hash,
            position=position,
            initial_input=initial_input,
            priority=check_priority(priority),
            tags=check_tags(tags),
            created_at=now,
            updated_at=now,
            deadline=check_optional_aware(deadline, "deadline"),
            trace_context=check_optional_traceparent(trace_context, "trace_context"),
        )

    # -- mutators (only while in progress) --

    def _require_in_progress(self, action: str) -> None:
        if self.status is not WorkflowStatus.IN_PROGRESS:
            raise InvalidStateError(
                f"cannot {action}: workflow {self.instance_id!r} is {self.status.value}"
            )

    def mark_task_completed(self, task_id: str, output: bytes) -> None:
        """Record ``output`` as the result of ``task_id``."""
        check_id(task_id, "task_id")
        check_bytes(output, "output")
        self._require_in_progress("mark a task completed")
        self.completed_tasks[task_id] = output
        self.last_completed_task_id = task_id

    def move_to(self, position: Position) -> None:
        """Move to ``position``; its tasks take the output of the last completed task."""
        if not isinstance(position, POSITION_TYPES):
            raise_invalid(f"position must be a Position, got {type(position).__name__}")
        self._require_in_progress("move")
        self.position = position
        self.input_task_id = self.last_completed_task_id

    def mark_completed(self, output: bytes) -> None:
        """Finish the workflow with ``output``."""
        check_bytes(output, "output")
        self._require_in_progress("complete")
        self.status = WorkflowStatus.COMPLETED
        self.output = output

    def mark_failed(self, error: str) -> None:
        """Fail the workflow with an error message."""
        check_text(error, "error", optional=False)
        self._require_in_progress("fail")
        self.status = WorkflowStatus.FAILED
        self.error = error

    # -- queries --

    def runnable_task_ids(self, now: datetime | None = None) -> tuple[str, ...]:
        """Tasks that may run now, by position; never a completed task.

        A workflow that is not in progress has none.
        """
        if self.status is not WorkflowStatus.IN_PROGRESS:
            return ()
        moment = utc_now() if now is None else check_aware(now, "now")
        return tuple(
            task_id
            for task_id in position_task_ids(self.position, moment)
            if task_id not in self.completed_tasks
        )

    @property
    def input_for_position(self) -> bytes | None:
        """The input handed to the tasks of the current position."""
        if self.input_task_id is None:
            return self.initial_input
        return self.completed_tasks.get(self.input_task_id)


def position_task_ids(position: Position, now: datetime | None) -> tuple[str, ...]:
    """Task ids a position makes runnable (completion not considered).

    With ``now=None`` a delay counts as runnable whatever its ``wake_at`` (stores keep the
    wake time apart and judge it with their own clock).
    """
    match position:
        case AtTask(task_id=task_id):
            return (task_id,)
        case AtFork(branch_task_ids=branches):
            return tuple(dict.fromkeys(branches))
        case AtDelay(wake_at=wake_at, next_task_id=next_task_id) if next_task_id is not None:
            return (next_task_id,) if now is None or wake_at <= now else ()
        case _:
            return ()


# --- claims and available tasks ---------------------------------------------------------------


@dataclass(frozen=True)
class TaskClaim:
    """A worker's exclusive right to run one task until ``expires_at``.

    ``token`` is a fencing token: it strictly increases each time the task is claimed anew.
    ``pending_signals`` are the cancel/pause requests pending when the call that returned
    this claim ran: a heartbeat learns from them that it should stop.

    ``attempt`` counts the claims of this task (1 at its first, +1 at each later one,
    takeovers after expiry included; ``sayiir-persistence retry`` counts anew).
    ``deadline``: past it the claim can no longer be renewed or written under (``None``: no
    deadline); ``expires_at`` is never later. ``last_error``: the error an earlier attempt
    recorded (``TaskCompletion.retry_after``), if any.
    See docs/contract.md#attempts-and-deadlines.
    """

    instance_id: str
    task_id: str
    worker_id: str
    claimed_at: datetime
    expires_at: datetime | None
    token: int
    pending_signals: frozenset[SignalKind] = frozenset()
    attempt: int = 1
    deadline: datetime | None = None
    last_error: str | None = None

    def is_expired(self, now: datetime | None = None) -> bool:
        """True from ``expires_at`` on (expired at exactly ``expires_at``)."""
        if self.expires_at is None:
            return False
        moment = utc_now() if now is None else check_aware(now, "now")
        return moment >= self.expires_at


@dataclass(frozen=True)
class AvailableTask:
    """A task that may be claimed, with what its worker needs to run it."""

    instance_id: str
    task_id: str
    definition_hash: str
    input: bytes | None
    priority: int
    tags: frozenset[str]
    snapshot_version: int
    trace_context: str | None = None
    """The workflow's W3C ``traceparent`` (:attr:`WorkflowSnapshot.trace_context`)."""


@dataclass(frozen=True)
class ClaimedTask:
    """A task handed out by ``claim_available_tasks``, with its claim."""

    claim: TaskClaim
    task: AvailableTask


# --- completions -----------------------------------------------------------------------------

Advance = Callable[["WorkflowSnapshot"], None]
"""Moves a snapshot past its current position when that position is finished.

Called with the stored snapshot, the finished task's result already in ``completed_tasks``.
It decides from the snapshot alone (``position`` and ``completed_tasks``): move on with
``move_to`` / ``mark_completed`` / ``mark_failed`` when every task of the position is
completed, do nothing otherwise. It must be quick and deterministic and must not call the
backend (it may run inside the store's transaction).
"""


@dataclass(frozen=True)
class TaskCompletion:
    """A finished execution of a claimed task, for ``complete_tasks``.

    Exactly one of ``output`` (the task's result) and ``error`` (the task failed: the
    workflow is failed with this message) is given. With ``error`` and ``retry_after``, the
    attempt is recorded as failed instead and the task is not handed out again before
    ``retry_after`` has passed by the store clock (docs/contract.md#attempts-and-deadlines).
    """

    instance_id: str
    task_id: str
    worker_id: str
    token: int
    output: bytes | None = None
    error: str | None = None
    advance: Advance | None = None
    retry_after: timedelta | None = None


class CompletionOutcome(StrEnum):
    """What ``complete_tasks`` did with one completion (docs/contract.md#complete_tasks)."""

    RECORDED = "recorded"
    """Result (or failure) recorded, the workflow advanced, the claim released."""
    CLAIM_LOST = "claim_lost"
    """The worker no longer held a live claim with that token: nothing written."""
    NOT_IN_PROGRESS = "not_in_progress"
    """The workflow is completed, failed, cancelled or paused: nothing written."""
    NOT_RUNNABLE = "not_runnable"
    """The task is no longer at the workflow's position, or its result is stored: nothing
    written."""
    NOT_FOUND = "not_found"
    """The instance is absent."""
    ADVANCE_FAILED = "advance_failed"
    """The advance function raised or left an invalid snapshot: nothing written."""
    RETRY_SCHEDULED = "retry_scheduled"
    """A failed attempt (``error`` with ``retry_after``) recorded: the claim ended, the
    workflow unchanged, the task handed out again once ``retry_after`` has passed."""


@dataclass(frozen=True)
class CompletionResult:
    """The outcome of one completion, and the next tasks claimed with it."""

    outcome: CompletionOutcome
    version: int | None = None
    """The workflow's new version when recorded."""
    next_tasks: tuple[ClaimedTask, ...] = ()
    """Tasks of the same workflow claimed for the same worker in the same step."""
    error: str | None = None
    """Why the advance function failed (``ADVANCE_FAILED``)."""
