"""What :meth:`PersistentBackend.store_stats` returns: the queue as an operator sees it.

Every figure is judged at one moment of the store clock (``StoreStats.taken_at``); the exact
definitions are in docs/contract.md#store_stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .model import WorkflowStatus

__all__ = ["PriorityBacklog", "StoreStats", "WorkerClaims"]


@dataclass(frozen=True)
class PriorityBacklog:
    """The runnable tasks of one priority.

    Attributes:
        priority: the workflows' priority (1 runs first).
        count: how many tasks of that priority a worker would be handed now.
        oldest_waiting_since: the oldest ``updated_at`` among them (when the task's snapshot
            was last saved), aware UTC.
    """

    priority: int
    count: int
    oldest_waiting_since: datetime


@dataclass(frozen=True)
class WorkerClaims:
    """The unreleased claims of one worker.

    Attributes:
        worker_id: the worker holding them.
        live: claims not expired at ``StoreStats.taken_at``.
        expired: claims expired but neither released nor taken over yet (a worker that died
            or stalled leaves these behind).
    """

    worker_id: str
    live: int
    expired: int


@dataclass(frozen=True)
class StoreStats:
    """The figures of one store at one moment of its clock (docs/contract.md#store_stats).

    Attributes:
        taken_at: the store clock's now when the figures were read, aware UTC.
        workflows: the number of workflows in each status (every status is a key).
        runnable: runnable tasks by ascending priority (priorities without any are left out).
        claims: unreleased claims by worker id (code point order), retry waits left out.
        retry_waits: scheduled retries still waiting (claims held by no worker, not ended).
        completed_last_minute: task results recorded in the 60 s before ``taken_at``.
        completed_last_hour: task results recorded in the 3600 s before ``taken_at``.
    """

    taken_at: datetime
    workflows: dict[WorkflowStatus, int]
    runnable: tuple[PriorityBacklog, ...]
    claims: tuple[WorkerClaims, ...]
    retry_waits: int
    completed_last_minute: int
    completed_last_hour: int

    @property
    def runnable_total(self) -> int:
        """All runnable tasks, whatever their priority."""
        return sum(backlog.count for backlog in self.runnable)

    @property
    def oldest_waiting_since(self) -> datetime | None:
        """The oldest ``oldest_waiting_since`` of all priorities (``None``: nothing runnable)."""
        return min((backlog.oldest_waiting_since for backlog in self.runnable), default=None)

    def oldest_wait(self, backlog: PriorityBacklog) -> timedelta:
        """How long the oldest task of ``backlog`` has waited at ``taken_at`` (never negative)."""
        return max(self.taken_at - backlog.oldest_waiting_since, timedelta(0))


#: The windows of ``completed_last_minute`` and ``completed_last_hour``.
LAST_MINUTE = timedelta(seconds=60)
LAST_HOUR = timedelta(seconds=3600)


def all_statuses(counts: dict[WorkflowStatus, int]) -> dict[WorkflowStatus, int]:
    """``counts`` with every status present (0 where missing), in the enum's order."""
    return {status: counts.get(status, 0) for status in WorkflowStatus}
