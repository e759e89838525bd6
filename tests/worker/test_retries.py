"""The worker's retry policy and task deadlines, on every selected store.

Retries: a task that raises runs again after the policy's delay, up to ``max_attempts``;
``give_up_on`` errors fail at once. Deadlines: a task that hangs while its heartbeat goes on
loses its claim at ``task_timeout`` and runs again, and the hung execution's result is dropped.
(A task that kills its worker each time: tests/faults/test_crashes.py.)
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from helpers.worker_stores import Store, all_done, wait_until
from sayiir_persistence import RetryPolicy, WorkflowStatus
from sayiir_persistence.errors import InvalidInputError
from sayiir_persistence.worker import Pipeline, TaskContext, TaskOutcome

QUICK_RETRY = RetryPolicy(max_attempts=3, initial_delay=timedelta(milliseconds=50), jitter=0)


class Flaky:
    """A task function that raises ``error`` on its first ``failures`` attempts."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.attempts: list[tuple[int, str | None]] = []
        self.lock = threading.Lock()

    def __call__(self, ctx: TaskContext) -> bytes:
        with self.lock:
            self.attempts.append((ctx.claim.attempt, ctx.claim.last_error))
        if ctx.claim.attempt <= self.failures:
            raise self.error
        return f"done at attempt {ctx.claim.attempt}".encode()


class Outcomes:
    def __init__(self) -> None:
        self.seen: Counter[TaskOutcome] = Counter()
        self.lock = threading.Lock()

    def __call__(self, ctx: TaskContext, outcome: TaskOutcome) -> None:
        with self.lock:
            self.seen[outcome] += 1


def test_a_task_that_raises_runs_again_until_it_succeeds(real_time_store: Store) -> None:
    store = real_time_store
    pipeline = Pipeline("flaky")
    [instance_id] = store.start(pipeline)
    flaky, outcomes = Flaky(2, OSError("connection reset")), Outcomes()
    with store.worker({"flaky": flaky}, pipeline, retry=QUICK_RETRY, on_outcome=outcomes):
        wait_until(all_done(store, [instance_id]), "the flaky workflow to finish")
    snapshot = store.backend.load_snapshot(instance_id)
    assert snapshot.status is WorkflowStatus.COMPLETED
    assert snapshot.output == b"done at attempt 3"
    error = "task 'flaky': OSError('connection reset')"
    assert flaky.attempts == [(1, None), (2, error), (3, error)]
    assert outcomes.seen == Counter({TaskOutcome.RETRYING: 2, TaskOutcome.RECORDED: 1})


def test_a_task_that_keeps_raising_fails_after_max_attempts(real_time_store: Store) -> None:
    store = real_time_store
    pipeline = Pipeline("broken")
    [instance_id] = store.start(pipeline)
    broken = Flaky(99, RuntimeError("still broken"))
    with store.worker({"broken": broken}, pipeline, retry=QUICK_RETRY):
        wait_until(all_done(store, [instance_id]), "the broken workflow to fail")
    snapshot = store.backend.load_snapshot(instance_id)
    assert snapshot.status is WorkflowStatus.FAILED
    assert snapshot.error == "task 'broken': RuntimeError('still broken')"
    assert [attempt for attempt, _ in broken.attempts] == [1, 2, 3]


def test_errors_the_policy_gives_up_on_are_not_retried(real_time_store: Store) -> None:
    store = real_time_store
    pipeline = Pipeline("strict")
    [instance_id] = store.start(pipeline)
    strict = Flaky(99, ValueError("bad input"))
    policy = RetryPolicy(
        max_attempts=5, initial_delay=timedelta(milliseconds=50), give_up_on=(ValueError,)
    )
    with store.worker({"strict": strict}, pipeline, retry=policy):
        wait_until(all_done(store, [instance_id]), "the strict workflow to fail")
    assert store.backend.load_snapshot(instance_id).status is WorkflowStatus.FAILED
    assert len(strict.attempts) == 1


def test_without_a_policy_a_task_that_raises_fails_at_once(real_time_store: Store) -> None:
    store = real_time_store
    pipeline = Pipeline("once")
    [instance_id] = store.start(pipeline)
    once = Flaky(99, OSError("down"))
    with store.worker({"once": once}, pipeline):
        wait_until(all_done(store, [instance_id]), "the workflow to fail")
    assert store.backend.load_snapshot(instance_id).status is WorkflowStatus.FAILED
    assert len(once.attempts) == 1


def test_a_hung_task_is_stopped_by_its_deadline_and_run_again(real_time_store: Store) -> None:
    store = real_time_store
    pipeline = Pipeline("hangs_once")
    [instance_id] = store.start(pipeline)
    release_hung = threading.Event()
    outcomes = Outcomes()

    def hangs_once(ctx: TaskContext) -> bytes:
        if ctx.claim.attempt == 1:
            release_hung.wait(60)  # hangs, while the heartbeat keeps renewing its claim
            return b"too late"
        return f"attempt {ctx.claim.attempt}".encode()

    ttl = timedelta(milliseconds=600)
    options = {"ttl": ttl, "task_timeout": timedelta(seconds=1.5), "on_outcome": outcomes}
    try:
        with (
            store.worker({"hangs_once": hangs_once}, pipeline, worker_id="first", **options),
            store.worker({"hangs_once": hangs_once}, pipeline, worker_id="second", **options),
        ):
            wait_until(all_done(store, [instance_id]), "the hung task's next attempt")
            release_hung.set()
            wait_until(lambda: outcomes.seen[TaskOutcome.LOST] == 1, "the hung run to end")
    finally:
        release_hung.set()
    snapshot = store.backend.load_snapshot(instance_id)
    assert snapshot.status is WorkflowStatus.COMPLETED
    assert snapshot.output == b"attempt 2"  # the hung execution's result was dropped
    assert outcomes.seen == Counter({TaskOutcome.RECORDED: 1, TaskOutcome.LOST: 1})


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_delay": timedelta(0)}, "initial_delay"),
        ({"max_delay": 5}, "max_delay"),
        ({"backoff": 0.5}, "backoff"),
        ({"jitter": 1.5}, "jitter"),
        ({"give_up_on": (ValueError, "x")}, "give_up_on"),
    ],
)
def test_retry_policy_refuses_bad_values(options: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidInputError, match=named):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_retry_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(
        max_attempts=10,
        initial_delay=timedelta(seconds=1),
        backoff=3,
        max_delay=timedelta(seconds=20),
        jitter=0,
    )
    delays = [policy.delay_after(attempt).total_seconds() for attempt in range(1, 6)]
    assert delays == [1, 3, 9, 20, 20]
    assert policy.delay_after(10**6) == timedelta(seconds=20)  # no overflow
    jittered = RetryPolicy(initial_delay=timedelta(seconds=10), jitter=0.5)
    samples = {jittered.delay_after(1) for _ in range(50)}
    assert all(timedelta(seconds=5) <= delay <= timedelta(seconds=10) for delay in samples)
    assert len(samples) > 1
    assert policy.retries(OSError(), 9) and not policy.retries(OSError(), 10)


def test_a_workflow_past_its_deadline_is_failed_by_the_workers_sweep(
    real_time_store: Store,
) -> None:
    store = real_time_store
    pipeline = Pipeline("never")
    backend = store.backend
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    backend.start_workflow(pipeline.start("late", store.definition, deadline=soon))
    started = threading.Event()

    def never(ctx: TaskContext) -> bytes:
        started.set()
        ctx.claim_lost.wait(30)  # runs until the workflow's failure takes its claim away
        return b"too late"

    sweep = {"stall_sweep_every": timedelta(milliseconds=200)}
    with store.worker({"never": never}, pipeline, **sweep):
        wait_until(started.is_set, "the task to start")
        wait_until(all_done(store, ["late"]), "the timed-out workflow to fail")
    snapshot = backend.load_snapshot("late")
    assert snapshot.status is WorkflowStatus.FAILED
    assert snapshot.error is not None and snapshot.error.startswith("workflow timed out")
