"""What a task function sees (``TaskContext``) and how its executions end (``TaskOutcome``)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from ..backend import PersistentBackend
from ..errors import ClaimLostError
from ..model import AvailableTask, ClaimedTask, TaskClaim
from .lease import Lease

TaskFunction = Callable[["TaskContext"], bytes]
"""Runs one task: gets its context (input, claim, ...) and returns the task's output."""


class TaskContext:
    """The context of one execution of a task, passed to its :data:`TaskFunction`.

    A long task should check :attr:`claim_lost` (or call :meth:`raise_if_lost`) from time to
    time: once it is set, another worker may already be running the same task and this
    execution's result will be thrown away.
    """

    def __init__(
        self,
        backend: PersistentBackend,
        claimed: ClaimedTask,
        worker_id: str,
        *,
        lease: Lease | None = None,
    ) -> None:
        self.task: AvailableTask = claimed.task
        """The task as it was claimed (ids, input, priority, tags)."""
        self.worker_id = worker_id
        self.execution_id = uuid.uuid4().hex
        """Unique per execution: a re-run of the same task after a takeover gets a new one."""
        self.claim_lost = threading.Event()
        """Set when the claim was lost (expired and taken over, cancelled, paused, not renewed
        in time, or the worker stopped): stop working, the result will not be saved."""
        self._backend = backend
        self._lock = threading.Lock()
        self._claim = claimed.claim
        # Until when the claim is surely held (default: from now, without margin).
        self._lease = lease or Lease.of_claim(claimed.claim, time.monotonic(), 0.0)
        self._lost_reason: str | None = None

    @property
    def instance_id(self) -> str:
        return self.task.instance_id

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def definition_hash(self) -> str:
        return self.task.definition_hash

    @property
    def input(self) -> bytes | None:
        """The initial input, or the output of the task completed before this position."""
        return self.task.input

    @property
    def claim(self) -> TaskClaim:
        """The latest view of this execution's claim (renewed by each heartbeat)."""
        with self._lock:
            return self._claim

    @property
    def lost_reason(self) -> str | None:
        """Why the claim was lost, ``None`` while it is held."""
        with self._lock:
            return self._lost_reason

    def result_of(self, task_id: str) -> bytes | None:
        """The stored output of another task of this workflow (``None``: not completed)."""
        return self._backend.load_task_result(self.instance_id, task_id)

    def raise_if_lost(self) -> None:
        """Raise :class:`~sayiir_persistence.ClaimLostError` if the claim was lost."""
        if self.claim_lost.is_set():
            raise ClaimLostError(
                f"task {self.task_id!r} of {self.instance_id!r}: {self.lost_reason}"
            )

    def __repr__(self) -> str:
        return (
            f"TaskContext({self.instance_id!r}, {self.task_id!r}, "
            f"token={self.claim.token}, worker={self.worker_id!r})"
        )

    # The worker's side: only it updates the claim and declares it lost.

    def _renewed(self, claim: TaskClaim, lease: Lease) -> None:
        with self._lock:
            self._claim = claim
            self._lease = lease

    @property
    def _current_lease(self) -> Lease:
        with self._lock:
            return self._lease

    def _lose(self, reason: str) -> bool:
        """Mark the claim lost; ``False`` if it already was (the first reason is kept)."""
        with self._lock:
            if self._lost_reason is not None:
                return False
            self._lost_reason = reason
        self.claim_lost.set()
        return True


class TaskOutcome(StrEnum):
    """How one execution of a task ended, as reported to ``on_outcome``."""

    RECORDED = "recorded"
    """The output was saved (fenced) and the workflow moved on."""
    FAILED = "failed"
    """The task function raised (or returned something other than bytes): the workflow was
    marked failed."""
    RETRYING = "retrying"
    """The task function raised and the worker's retry policy gives it another attempt: the
    failed attempt was recorded, and the task runs again after the policy's delay."""
    LOST = "lost"
    """The claim was lost before the result could be saved (expired and taken over, cancelled,
    paused, not renewed before the worker's lease on it ran out, or the fenced save was
    refused): nothing was written."""
    RELEASED = "released"
    """Not recorded, and the claim was given back so that another worker runs the task again
    (the worker stopped first, or the store could not be reached to save the result)."""
    UNHANDLED = "unhandled"
    """No task function or advance function for this task: the claim is left to expire, so
    a worker that knows the task can take it (route tasks with tags to avoid this)."""


@dataclass(frozen=True)
class WorkerStats:
    """Counters of a worker since it was created, one per :class:`TaskOutcome`."""

    claimed: int = 0
    recorded: int = 0
    failed: int = 0
    retrying: int = 0
    lost: int = 0
    released: int = 0
    unhandled: int = 0
