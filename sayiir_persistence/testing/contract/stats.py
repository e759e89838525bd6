"""The contract's statistics tests: ``store_stats``."""

from __future__ import annotations

from datetime import timedelta

from ...backend import PersistentBackend
from ...model import (
    AtDelay,
    AtFork,
    AtTask,
    CompletionOutcome,
    SignalKind,
    TaskCompletion,
    WorkflowStatus,
)
from ...stats import PriorityBacklog, StoreStats, WorkerClaims
from ..builders import (
    LONG_TTL,
    OTHER,
    WORKER,
    make_request,
    save_at,
    save_new,
    save_with_status,
)
from ..clocks import ContractClock
from .attempts import failed
from .base import ContractBase

_EVERY_TAG = frozenset({"gpu", "eu"})


def _runnable(stats: StoreStats) -> dict[int, int]:
    return {backlog.priority: backlog.count for backlog in stats.runnable}


def _complete(backend: PersistentBackend, instance_id: str, task_id: str) -> None:
    """Claim ``task_id`` and complete it with an output (the workflow stays at its task)."""
    claim = backend.claim_task(instance_id, task_id, WORKER, LONG_TTL)
    assert claim is not None
    [result] = backend.complete_tasks(
        [TaskCompletion(instance_id, task_id, WORKER, claim.token, output=b"out")], ttl=LONG_TTL
    )
    assert result.outcome is CompletionOutcome.RECORDED


class StatsContract(ContractBase):
    """``store_stats``: workflows by status, runnable tasks by priority as
    ``find_available_tasks`` hands them out, claims by worker, retry waits, completions.

    Checks docs/contract.md, section "store_stats" (``#store_stats``).
    """

    def test_store_stats_of_an_empty_store(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        stats = backend.store_stats()
        assert stats.workflows == dict.fromkeys(WorkflowStatus, 0)
        assert stats.runnable == ()
        assert stats.runnable_total == 0
        assert stats.oldest_waiting_since is None
        assert stats.claims == ()
        assert stats.retry_waits == 0
        assert stats.completed_last_minute == stats.completed_last_hour == 0
        self.assert_now(clock, stats.taken_at)

    def test_store_stats_counts_workflows_by_status(self, backend: PersistentBackend) -> None:
        counts = {
            WorkflowStatus.IN_PROGRESS: 3,
            WorkflowStatus.COMPLETED: 2,
            WorkflowStatus.FAILED: 4,
            WorkflowStatus.CANCELLED: 1,
            WorkflowStatus.PAUSED: 5,
        }
        for status, count in counts.items():
            for number in range(count):
                save_with_status(backend, f"{status.value}-{number}", status)

        assert backend.store_stats().workflows == counts

    def test_store_stats_runnable_are_the_tasks_find_available_tasks_hands_out(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        # Runnable: by priority, tags do not matter, a fork's branches count one by one.
        save_new(backend, "p1-a", priority=1)
        save_new(backend, "p1-b", priority=1, tags=["gpu"])
        save_at(backend, "p4-fork", AtFork("f", ("b1", "b2", "b3")), priority=4)
        past = clock.now() - timedelta(minutes=1)
        save_at(backend, "p4-woken", AtDelay("d", past, "t2"), priority=4)
        # Not runnable: a live claim, a pending signal, a delay not over, not in progress,
        # not started, a completed branch of a fork.
        save_new(backend, "claimed", priority=1)
        assert backend.claim_task("claimed", "t1", WORKER, LONG_TTL) is not None
        save_new(backend, "signalled", priority=1)
        backend.store_signal("signalled", SignalKind.CANCEL, make_request())
        save_at(backend, "sleeping", AtDelay("d", clock.now() + LONG_TTL, "t2"), priority=2)
        for status in (WorkflowStatus.PAUSED, WorkflowStatus.COMPLETED, WorkflowStatus.FAILED):
            save_with_status(backend, status.value, status)
        save_new(backend, "not-started", first_task=None, priority=2)
        save_at(backend, "fork-done", AtFork("f", ("b1",)), completed={"b1": b"x"})

        stats = backend.store_stats()
        offered = backend.find_available_tasks("probe", 100, tags=_EVERY_TAG)

        assert _runnable(stats) == {1: 2, 4: 4}
        assert stats.runnable_total == len(offered) == 6
        by_priority: dict[int, int] = {}
        for task in offered:
            by_priority[task.priority] = by_priority.get(task.priority, 0) + 1
        assert by_priority == _runnable(stats)
        first = stats.runnable[0]
        assert first.priority == 1
        assert first.oldest_waiting_since == backend.load_snapshot("p1-a").updated_at
        assert stats.oldest_waiting_since == first.oldest_waiting_since

    def test_store_stats_the_claim_decides_whether_a_task_is_held(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        for instance_id in ("renewed", "lapsed", "released"):
            save_new(backend, instance_id)
            assert backend.claim_task(instance_id, "t1", WORKER, self.short_ttl) is not None
        backend.extend_task_claim("renewed", "t1", WORKER, LONG_TTL)
        backend.release_task_claim("released", "t1", WORKER)
        self.wait_past_short_ttl(clock)

        stats = backend.store_stats()

        # Renewed past its first expiry: still held. Lapsed: runnable and an expired claim.
        # Released: runnable and not counted.
        assert _runnable(stats) == {3: 2}
        assert stats.claims == (WorkerClaims(WORKER, live=1, expired=1),)
        offered = backend.find_available_tasks("probe", 10)
        assert sorted(task.instance_id for task in offered) == ["lapsed", "released"]

    def test_store_stats_counts_claims_by_worker_and_retry_waits_apart(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_at(backend, "fork", AtFork("f", ("b1", "b2", "b3", "b4")))
        for task_id, worker in (("b1", OTHER), ("b2", WORKER), ("b3", OTHER)):
            assert backend.claim_task("fork", task_id, worker, LONG_TTL) is not None
        save_new(backend, "forever")
        assert backend.claim_task("forever", "t1", OTHER, None) is not None
        save_new(backend, "short-retry")
        save_new(backend, "long-retry")
        for instance_id, retry_after in (("short-retry", self.short_ttl), ("long-retry", LONG_TTL)):
            claim = backend.claim_task(instance_id, "t1", WORKER, LONG_TTL)
            assert claim is not None
            [result] = backend.complete_tasks([failed(claim, "boom", retry_after)], ttl=LONG_TTL)
            assert result.outcome is CompletionOutcome.RETRY_SCHEDULED

        stats = backend.store_stats()
        assert WORKER < OTHER
        assert stats.claims == (
            WorkerClaims(WORKER, live=1, expired=0),
            WorkerClaims(OTHER, live=3, expired=0),
        )
        assert stats.retry_waits == 2
        assert _runnable(stats) == {3: 1}  # b4 only: both retries wait

        self.wait_past_short_ttl(clock)
        stats = backend.store_stats()
        # The short wait has ended: its task is runnable again, no longer a wait.
        assert stats.retry_waits == 1
        assert _runnable(stats) == {3: 2}
        assert {claims.worker_id for claims in stats.claims} == {WORKER, OTHER}

    def test_store_stats_counts_results_recorded_in_the_last_minute_and_hour(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "fork", AtFork("f", ("b1", "b2", "b3")))
        _complete(backend, "fork", "b1")
        _complete(backend, "fork", "b2")
        save_new(backend, "direct")
        backend.save_task_result("direct", "t1", b"out")
        save_at(backend, "saved", AtTask("t9"), completed={"s1": b"x", "s2": b"y"})
        save_new(backend, "deleted")
        backend.save_task_result("deleted", "t1", b"out")
        backend.delete_snapshot("deleted")

        stats = backend.store_stats()
        assert stats.completed_last_minute == 5
        assert stats.completed_last_hour == 5

    def test_store_stats_completion_windows_follow_the_store_clock(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        self.require_exact(clock)
        save_new(backend, "early")
        backend.save_task_result("early", "t1", b"out")
        clock.advance(timedelta(minutes=30))
        save_new(backend, "middle")
        backend.save_task_result("middle", "t1", b"out")
        backend.save_task_result("middle", "t2", b"out")
        clock.advance(timedelta(seconds=59))
        save_new(backend, "late")
        backend.save_task_result("late", "t1", b"out")

        assert _completions(backend) == (3, 4)
        clock.advance(timedelta(seconds=1))  # middle's are exactly 60 s old: out of the minute
        assert _completions(backend) == (1, 4)
        clock.advance(timedelta(seconds=59))  # late's too
        assert _completions(backend) == (0, 4)
        clock.advance(timedelta(minutes=28))  # early's is 3599 s old: still in the hour
        assert _completions(backend) == (0, 4)
        clock.advance(timedelta(seconds=1))
        assert _completions(backend) == (0, 3)
        # A rewritten result counts at its last recording.
        backend.save_task_result("early", "t1", b"again")
        assert _completions(backend) == (1, 4)

    def test_store_stats_are_frozen_figures(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf", priority=2)
        stats = backend.store_stats()
        assert stats.runnable == (PriorityBacklog(2, 1, backend.load_snapshot("wf").updated_at),)
        save_new(backend, "wf2", priority=2)
        assert stats.runnable_total == 1
        assert backend.store_stats().runnable_total == 2


def _completions(backend: PersistentBackend) -> tuple[int, int]:
    stats = backend.store_stats()
    return stats.completed_last_minute, stats.completed_last_hour
