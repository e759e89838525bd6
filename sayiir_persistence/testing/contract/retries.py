"""The contract's retry tests: ``retry_workflow`` re-queues a failed workflow where it failed."""

from __future__ import annotations

import pytest

from ...backend import PersistentBackend
from ...errors import InvalidStateError, NotFoundError
from ...model import (
    AtFork,
    AtTask,
    CompletionOutcome,
    SignalKind,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
)
from ..builders import (
    LONG_TTL,
    OTHER,
    WORKER,
    make_request,
    run_in_threads,
    save_at,
    save_new,
    save_with_status,
    task_pairs,
)
from ..clocks import ContractClock
from .base import ContractBase

NOT_FAILED = [status for status in WorkflowStatus if status is not WorkflowStatus.FAILED]


def fail_under(backend: PersistentBackend, claim: TaskClaim, error: str = "boom") -> None:
    """Fail the claim's workflow the way a worker does: a completion with ``error``."""
    completion = TaskCompletion(
        claim.instance_id, claim.task_id, claim.worker_id, claim.token, error=error
    )
    [result] = backend.complete_tasks([completion], ttl=LONG_TTL)
    assert result.outcome is CompletionOutcome.RECORDED
    assert backend.load_snapshot(claim.instance_id).status is WorkflowStatus.FAILED


def claim(backend: PersistentBackend, task_id: str, worker: str = WORKER) -> TaskClaim:
    """A live claim of ``wf``/``task_id`` (the test needs it to be granted)."""
    granted = backend.claim_task("wf", task_id, worker, LONG_TTL)
    assert granted is not None, f"{task_id} was not claimable"
    return granted


class RetryContract(ContractBase):
    """``retry_workflow``: a failed workflow back in progress at its position, its claims
    dropped and its attempts counted anew; refused for any other status.

    Checks docs/contract.md, section ``retry_workflow`` (``#retry_workflow``).
    """

    def test_retry_requeues_the_failed_task(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf", initial_input=b"in")
        first = claim(backend, "t1")
        fail_under(backend, first)
        failed = backend.load_snapshot("wf")

        retried = backend.retry_workflow("wf")
        assert retried == backend.load_snapshot("wf")
        assert retried.status is WorkflowStatus.IN_PROGRESS and retried.error is None
        assert retried.version == failed.version + 1
        self.assert_now(clock, retried.updated_at)
        assert retried.position == AtTask("t1")
        assert retried.initial_input == b"in"
        assert task_pairs(backend.find_available_tasks(OTHER, 10)) == [("wf", "t1")]

        again = claim(backend, "t1", OTHER)
        assert again.attempt == 1 and again.last_error is None
        assert again.token > first.token
        # The re-queued workflow runs on as any other.
        completion = TaskCompletion(
            "wf", "t1", OTHER, again.token, output=b"ok", advance=lambda s: s.mark_completed(b"ok")
        )
        [result] = backend.complete_tasks([completion], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.RECORDED
        assert backend.load_snapshot("wf").status is WorkflowStatus.COMPLETED

    def test_results_are_kept_and_only_unfinished_tasks_requeued(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b", "c")), completed={"t0": b"zero"})
        backend.save_task_result("wf", "a", b"A")
        fail_under(backend, claim(backend, "b"))

        retried = backend.retry_workflow("wf")
        assert retried.completed_tasks == {"t0": b"zero", "a": b"A"}
        assert retried.last_completed_task_id == "a"
        assert retried.position == AtFork("f", ("a", "b", "c"))
        assert backend.load_task_result("wf", "a") == b"A"
        assert task_pairs(backend.find_available_tasks(OTHER, 10)) == [("wf", "b"), ("wf", "c")]
        assert backend.claim_task("wf", "a", OTHER, LONG_TTL) is None  # it has its result
        claimed = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert [(c.task.task_id, c.claim.attempt) for c in claimed] == [("b", 1), ("c", 1)]
        assert {c.task.input for c in claimed} == {b"zero"}  # the input the fork had

    def test_attempts_past_the_limit_are_counted_anew(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        assert backend.claim_task("wf", "t1", WORKER, self.short_ttl) is not None
        self.wait_past_short_ttl(clock)  # its worker died
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL, max_attempts=1) is None
        assert backend.load_snapshot("wf").status is WorkflowStatus.FAILED

        backend.retry_workflow("wf")
        again = backend.claim_task("wf", "t1", OTHER, LONG_TTL, max_attempts=1)
        assert again is not None and again.attempt == 1 and again.token == 3
        assert backend.load_snapshot("wf").status is WorkflowStatus.IN_PROGRESS

    def test_an_old_holder_is_fenced_off(self, backend: PersistentBackend) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        failing = claim(backend, "a")
        running = claim(backend, "b", OTHER)  # still running when its sibling fails
        fail_under(backend, failing)

        backend.retry_workflow("wf")
        with pytest.raises(NotFoundError):
            backend.extend_task_claim("wf", "b", OTHER, LONG_TTL, token=running.token)
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "b", OTHER, token=running.token)
        snapshot = backend.load_snapshot("wf")
        assert not backend.save_snapshot_fenced(snapshot, "b", OTHER, token=running.token)
        late = [
            TaskCompletion("wf", "b", OTHER, running.token, output=b"late"),
            TaskCompletion("wf", "a", WORKER, failing.token, error="boom again"),
        ]
        outcomes = [r.outcome for r in backend.complete_tasks(late, ttl=LONG_TTL)]
        assert outcomes == [CompletionOutcome.CLAIM_LOST] * 2
        assert backend.load_task_result("wf", "b") is None
        assert backend.load_snapshot("wf") == snapshot

        for old in (failing, running):
            new = claim(backend, old.task_id, "worker-3")
            assert new.attempt == 1 and new.token > old.token

    def test_a_scheduled_retry_is_runnable_at_once(self, backend: PersistentBackend) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        waiting = claim(backend, "a")
        retry_later = TaskCompletion(
            "wf", "a", WORKER, waiting.token, error="flaky", retry_after=LONG_TTL
        )
        [scheduled] = backend.complete_tasks([retry_later], ttl=LONG_TTL)
        assert scheduled.outcome is CompletionOutcome.RETRY_SCHEDULED
        fail_under(backend, claim(backend, "b"))

        backend.retry_workflow("wf")
        again = claim(backend, "a", OTHER)  # not an hour from now: the wait was dropped
        assert again.attempt == 1 and again.last_error is None
        assert again.token > waiting.token

    def test_pending_signals_are_cleared(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        running = claim(backend, "t1")
        backend.store_signal("wf", SignalKind.PAUSE, make_request("later"))
        fail_under(backend, running)  # fails before the pause is applied
        assert not backend.check_and_pause("wf")  # which it can no longer be

        backend.retry_workflow("wf")
        for kind in SignalKind:
            assert backend.get_signal("wf", kind) is None
        assert claim(backend, "t1", OTHER).attempt == 1

    @pytest.mark.parametrize("status", NOT_FAILED)
    def test_only_a_failed_workflow_is_retried(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        held = claim(backend, "t1") if status is WorkflowStatus.IN_PROGRESS else None
        before = backend.load_snapshot("wf")
        with pytest.raises(InvalidStateError, match=status.value):
            backend.retry_workflow("wf")
        assert backend.load_snapshot("wf") == before
        if held is not None:  # its claim untouched: same token, same attempt
            renewed = backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=held.token)
            assert renewed.attempt == 1

    def test_an_absent_workflow_is_not_found(self, backend: PersistentBackend) -> None:
        with pytest.raises(NotFoundError):
            backend.retry_workflow("ghost")
        assert backend.list_snapshots() == []

    def test_concurrent_retries_requeue_once(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        fail_under(backend, claim(backend, "t1"))
        failed = backend.load_snapshot("wf")

        def retry(_: int) -> WorkflowSnapshot | str:
            try:
                return backend.retry_workflow("wf")
            except InvalidStateError as refused:
                assert "in_progress" in str(refused)
                return "refused"

        outcomes = run_in_threads(self.scaled(8), retry)
        winners = [o for o in outcomes if isinstance(o, WorkflowSnapshot)]
        assert len(winners) == 1
        assert outcomes.count("refused") == len(outcomes) - 1
        stored = backend.load_snapshot("wf")
        assert stored == winners[0]
        assert stored.version == failed.version + 1
