"""Constants, snapshot builders and assertion helpers shared by the contract's tests.

Not public API: the names the contract's modules share, outside ``__all__`` of
:mod:`sayiir_persistence.testing`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from ..backend import DEFAULT_AGING_INTERVAL, PersistentBackend
from ..model import (
    AvailableTask,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowSnapshot,
    WorkflowStatus,
)

T = TypeVar("T")


HASH = "def-hash"
WORKER = "worker-1"
OTHER = "worker-2"
LONG_TTL = timedelta(hours=1)
"""A claim that stays live for the whole test, on any clock."""
T0 = datetime(2030, 1, 1, tzinfo=UTC)
"""A fixed instant for the tests of the data model (no store, no clock)."""
NAIVE = datetime(2030, 1, 1)
BAD_INT: Any = 42
BAD_STR: Any = "not bytes"
BAD_KIND: Any = "bogus"


def make_snapshot(
    instance_id: str,
    *,
    first_task: str | None = "t1",
    initial_input: bytes | None = None,
    priority: int = 3,
    tags: Iterable[str] = (),
    deadline: datetime | None = None,
) -> WorkflowSnapshot:
    return WorkflowSnapshot.new(
        instance_id,
        HASH,
        initial_input=initial_input,
        first_task=first_task,
        priority=priority,
        tags=tuple(tags),
        deadline=deadline,
    )


def save_new(
    backend: PersistentBackend,
    instance_id: str,
    *,
    first_task: str | None = "t1",
    initial_input: bytes | None = None,
    priority: int = 3,
    tags: Iterable[str] = (),
) -> WorkflowSnapshot:
    """Save a new in-progress workflow at ``AtTask(first_task)`` (or not started)."""
    snapshot = make_snapshot(
        instance_id,
        first_task=first_task,
        initial_input=initial_input,
        priority=priority,
        tags=tags,
    )
    backend.save_snapshot(snapshot)
    return snapshot


def save_at(
    backend: PersistentBackend,
    instance_id: str,
    position: Position,
    *,
    completed: dict[str, bytes] | None = None,
    initial_input: bytes | None = None,
    priority: int = 3,
    tags: Iterable[str] = (),
) -> WorkflowSnapshot:
    """Save an in-progress workflow that completed ``completed`` (in order), then moved to
    ``position``."""
    snapshot = make_snapshot(
        instance_id, first_task=None, initial_input=initial_input, priority=priority, tags=tags
    )
    for task_id, output in (completed or {}).items():
        snapshot.mark_task_completed(task_id, output)
    snapshot.move_to(position)
    backend.save_snapshot(snapshot)
    return snapshot


def make_request(reason: str = "test") -> SignalRequest:
    return SignalRequest(reason=reason, requested_by="tester")


def apply_signal(backend: PersistentBackend, instance_id: str, kind: SignalKind) -> None:
    backend.store_signal(instance_id, kind, make_request(f"{kind.value} it"))
    apply = backend.check_and_cancel if kind is SignalKind.CANCEL else backend.check_and_pause
    assert apply(instance_id)


def save_with_status(backend: PersistentBackend, instance_id: str, status: WorkflowStatus) -> None:
    """Store a workflow at ``AtTask("t1")`` in ``status``, reached by the public paths."""
    snapshot = save_new(backend, instance_id)
    if status is WorkflowStatus.COMPLETED:
        snapshot.mark_completed(b"done")
        backend.save_snapshot(snapshot)
    elif status is WorkflowStatus.FAILED:
        snapshot.mark_failed("boom")
        backend.save_snapshot(snapshot)
    elif status is WorkflowStatus.CANCELLED:
        apply_signal(backend, instance_id, SignalKind.CANCEL)
    elif status is WorkflowStatus.PAUSED:
        apply_signal(backend, instance_id, SignalKind.PAUSE)
    assert backend.load_snapshot(instance_id).status is status


def assert_utc(value: datetime | None) -> None:
    assert isinstance(value, datetime)
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0), f"{value!r} is not UTC"


def assert_same_state(loaded: WorkflowSnapshot, expected: WorkflowSnapshot) -> None:
    """Every field equal, except those the store sets (``version``, ``updated_at``)."""
    for field in dataclasses.fields(WorkflowSnapshot):
        if field.name not in ("version", "updated_at"):
            assert getattr(loaded, field.name) == getattr(expected, field.name), field.name


def task_pairs(tasks: Iterable[AvailableTask]) -> list[tuple[str, str]]:
    return [(task.instance_id, task.task_id) for task in tasks]


def offered_tasks(
    backend: PersistentBackend,
    via: str,
    *,
    tags: Iterable[str] = (),
    limit: int = 1000,
    aging_interval: timedelta = DEFAULT_AGING_INTERVAL,
) -> list[AvailableTask]:
    """Tasks handed to a worker by ``find_available_tasks`` or ``claim_available_tasks``."""
    if via == "find":
        return backend.find_available_tasks(WORKER, limit, tags=tags, aging_interval=aging_interval)
    claimed = backend.claim_available_tasks(
        WORKER, limit, LONG_TTL, tags=tags, aging_interval=aging_interval
    )
    return [item.task for item in claimed]


def run_in_threads(count: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(0..count-1)`` on ``count`` threads released together; their results."""
    barrier = threading.Barrier(count)

    def run(index: int) -> T:
        barrier.wait(timeout=60)
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(run, index) for index in range(count)]
        return [future.result() for future in futures]


#: Methods by which a worker is offered tasks; the selection tests run with both.
OFFER_METHODS = pytest.mark.parametrize("via", ["find", "claim"])
TERMINAL = [WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED]
NOT_IN_PROGRESS = [*TERMINAL, WorkflowStatus.PAUSED]
FINISHED = [WorkflowStatus.COMPLETED, WorkflowStatus.FAILED]

# Ids that differ only where lax collations (case-insensitive, PAD SPACE, Unicode-normalizing,
# UTF-16 ordered) would confuse or misorder them. Code point order is plain ``sorted``.
AWKWARD_IDS = ["a", "A", "a ", "B", "é", "e\u0301", "z", "\uff21", "日本", "😀", "a%", "a_"]

# A 255-character id with quotes, SQL wildcards and separators, emoji and accents.
LONGEST_ID = ("😀'\"%_;\\é-" * 30)[:255]
