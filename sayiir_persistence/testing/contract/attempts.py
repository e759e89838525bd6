"""The contract's attempt tests: attempts, retries, limits and deadlines of claims."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ...backend import PersistentBackend
from ...errors import ClaimLostError, InvalidInputError, NotFoundError
from ...model import (
    AtFork,
    CompletionOutcome,
    SignalKind,
    TaskClaim,
    TaskCompletion,
    WorkflowStatus,
)
from ..builders import (
    LONG_TTL,
    OTHER,
    WORKER,
    apply_signal,
    make_snapshot,
    run_in_threads,
    save_at,
    save_new,
)
from ..clocks import ContractClock
from .base import ContractBase


def failed(claim: TaskClaim, error: str, retry_after: timedelta | None) -> TaskCompletion:
    """A failed attempt of ``claim``: retried after ``retry_after`` (``None``: no retry)."""
    return TaskCompletion(
        claim.instance_id,
        claim.task_id,
        claim.worker_id,
        claim.token,
        error=error,
        retry_after=retry_after,
    )


class AttemptContract(ContractBase):
    """Attempts, failed attempts with retries, attempt limits and deadlines.

    Checks docs/contract.md, section "Attempts and deadlines" (``#attempts-and-deadlines``).
    """

    def claim_t1(
        self, backend: PersistentBackend, worker: str = WORKER, *, max_attempts: int | None = None
    ) -> TaskClaim | None:
        """Claim ``wf``/``t1`` for ``short_ttl``."""
        return backend.claim_task("wf", "t1", worker, self.short_ttl, max_attempts=max_attempts)

    # -- attempts -------------------------------------------------------------------------

    def test_every_claim_is_an_attempt(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        first = self.claim_t1(backend)
        assert first is not None and first.attempt == 1 and first.last_error is None
        renewed = backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL)
        assert renewed.attempt == 1  # a renewal is the same attempt
        backend.release_task_claim("wf", "t1", WORKER)
        second = self.claim_t1(backend)
        assert second is not None and second.attempt == 2
        self.wait_past_short_ttl(clock)
        taken_over = self.claim_t1(backend, OTHER)
        assert taken_over is not None and taken_over.attempt == 3
        assert taken_over.token > second.token

    def test_attempts_are_counted_per_task(self, backend: PersistentBackend) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        a = backend.claim_task("wf", "a", WORKER, LONG_TTL)
        assert a is not None
        backend.release_task_claim("wf", "a", WORKER)
        again = backend.claim_task("wf", "a", WORKER, LONG_TTL)
        b = backend.claim_task("wf", "b", WORKER, LONG_TTL)
        assert again is not None and again.attempt == 2
        assert b is not None and b.attempt == 1

    # -- failed attempts and retries --------------------------------------------------------

    def test_failed_attempt_schedules_a_retry(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        before = save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        [result] = backend.complete_tasks([failed(claim, "boom", self.short_ttl)], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.RETRY_SCHEDULED
        stored = backend.load_snapshot("wf")
        assert stored.status is WorkflowStatus.IN_PROGRESS
        assert stored.version == before.version and stored.error is None
        # Not handed out before the retry is due, by any call.
        assert self.claim_t1(backend, OTHER) is None
        assert backend.claim_available_tasks(OTHER, 10, LONG_TTL) == []
        assert backend.find_available_tasks(OTHER, 10) == []
        self.wait_past_short_ttl(clock)
        [retried] = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert retried.claim.attempt == 2
        assert retried.claim.last_error == "boom"
        assert retried.claim.token > claim.token

    def test_a_failed_attempt_ends_its_claim(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        backend.complete_tasks([failed(claim, "boom", LONG_TTL)], ttl=LONG_TTL)
        with pytest.raises(ClaimLostError):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=claim.token)
        with pytest.raises(ClaimLostError):
            backend.release_task_claim("wf", "t1", WORKER, token=claim.token)
        [again] = backend.complete_tasks([failed(claim, "boom", LONG_TTL)], ttl=LONG_TTL)
        assert again.outcome is CompletionOutcome.CLAIM_LOST
        snapshot = backend.load_snapshot("wf")
        assert not backend.save_snapshot_fenced(snapshot, "t1", WORKER, token=claim.token)

    def test_a_failure_without_retry_fails_the_workflow(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        [result] = backend.complete_tasks([failed(claim, "boom", None)], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.RECORDED
        stored = backend.load_snapshot("wf")
        assert stored.status is WorkflowStatus.FAILED and stored.error == "boom"

    def test_retry_after_needs_an_error(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        completion = TaskCompletion(
            "wf", "t1", WORKER, claim.token, output=b"x", retry_after=LONG_TTL
        )
        with pytest.raises(InvalidInputError, match=r"completions\[0\]\.retry_after"):
            backend.complete_tasks([completion], ttl=LONG_TTL)
        with pytest.raises(InvalidInputError, match="retry_after"):
            backend.complete_tasks([failed(claim, "boom", timedelta(0))], ttl=LONG_TTL)
        assert backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL).token == claim.token

    # -- limits ---------------------------------------------------------------------------

    def test_an_attempt_past_the_limit_fails_the_workflow(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        for attempt in (1, 2):
            claim = self.claim_t1(backend, max_attempts=2)
            assert claim is not None and claim.attempt == attempt
            self.wait_past_short_ttl(clock)  # its worker died: the claim expires
        assert self.claim_t1(backend, max_attempts=2) is None
        stored = backend.load_snapshot("wf")
        assert stored.status is WorkflowStatus.FAILED
        assert stored.error is not None and "'t1' failed after 2 attempts" in stored.error
        assert backend.claim_available_tasks(OTHER, 10, LONG_TTL) == []

    def test_the_limit_fails_with_the_last_recorded_error(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL, max_attempts=1)
        assert claim is not None
        backend.complete_tasks([failed(claim, "disk full", self.short_ttl)], ttl=LONG_TTL)
        self.wait_past_short_ttl(clock)
        assert backend.claim_available_tasks(OTHER, 10, LONG_TTL, max_attempts=1) == []
        stored = backend.load_snapshot("wf")
        assert stored.status is WorkflowStatus.FAILED
        assert stored.error == "task 't1' failed after 1 attempt: disk full"

    def test_claim_available_tasks_leaves_out_only_tasks_past_the_limit(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "spent")
        first = backend.claim_task("spent", "t1", WORKER, self.short_ttl)
        assert first is not None
        self.wait_past_short_ttl(clock)
        save_new(backend, "fresh")
        claimed = backend.claim_available_tasks(OTHER, 10, LONG_TTL, max_attempts=1)
        assert [(c.task.instance_id, c.claim.attempt) for c in claimed] == [("fresh", 1)]
        assert backend.load_snapshot("spent").status is WorkflowStatus.FAILED
        assert backend.load_snapshot("fresh").status is WorkflowStatus.IN_PROGRESS

    def test_without_a_limit_expired_claims_are_taken_over(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        for attempt in (1, 2, 3):
            claim = self.claim_t1(backend)
            assert claim is not None and claim.attempt == attempt
            self.wait_past_short_ttl(clock)

    def test_next_claims_respect_the_limit(self, backend: PersistentBackend) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        b = backend.claim_task("wf", "b", WORKER, LONG_TTL)
        assert b is not None
        backend.release_task_claim("wf", "b", WORKER)  # b's first attempt is used up
        a = backend.claim_task("wf", "a", WORKER, LONG_TTL)
        assert a is not None
        completion = TaskCompletion("wf", "a", WORKER, a.token, output=b"a")
        [result] = backend.complete_tasks([completion], ttl=LONG_TTL, claim_next=1, max_attempts=1)
        assert result.outcome is CompletionOutcome.RECORDED
        assert result.next_tasks == ()
        assert backend.load_snapshot("wf").status is WorkflowStatus.FAILED

    def test_racing_claims_past_the_limit_fail_the_workflow_once(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        assert self.claim_t1(backend) is not None
        self.wait_past_short_ttl(clock)
        threads = self.scaled(8)
        claims = run_in_threads(
            threads,
            lambda index: backend.claim_task("wf", "t1", f"w{index}", LONG_TTL, max_attempts=1),
        )
        assert claims == [None] * threads
        stored = backend.load_snapshot("wf")
        assert stored.status is WorkflowStatus.FAILED
        assert stored.version == 2  # saved, then failed once

    @pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
    def test_max_attempts_is_validated(self, backend: PersistentBackend, bad: object) -> None:
        save_new(backend, "wf")
        with pytest.raises(InvalidInputError, match="max_attempts"):
            backend.claim_task("wf", "t1", WORKER, LONG_TTL, max_attempts=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="max_attempts"):
            backend.claim_available_tasks(WORKER, 1, LONG_TTL, max_attempts=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="timeout"):
            backend.claim_task("wf", "t1", WORKER, LONG_TTL, timeout=timedelta(0))

    # -- deadlines ------------------------------------------------------------------------

    def test_a_claim_expires_at_its_deadline(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL, timeout=self.short_ttl)
        assert claim is not None and claim.deadline is not None
        assert claim.deadline == claim.claimed_at + self.short_ttl
        assert claim.expires_at == claim.deadline
        renewed = backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=claim.token)
        assert renewed.expires_at == claim.deadline  # never renewed past it
        self.wait_past_short_ttl(clock)
        with pytest.raises(ClaimLostError, match="deadline"):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=claim.token)
        completion = TaskCompletion("wf", "t1", WORKER, claim.token, output=b"late")
        [late] = backend.complete_tasks([completion], ttl=LONG_TTL)
        assert late.outcome is CompletionOutcome.CLAIM_LOST
        [next_attempt] = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert next_attempt.claim.attempt == 2 and next_attempt.claim.deadline is None
        assert backend.load_task_result("wf", "t1") is None

    def test_a_short_ttl_expires_before_the_deadline(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, self.short_ttl, timeout=LONG_TTL)
        assert claim is not None and claim.expires_at is not None and claim.deadline is not None
        assert claim.expires_at == claim.claimed_at + self.short_ttl
        assert claim.deadline == claim.claimed_at + LONG_TTL
        forever = backend.extend_task_claim("wf", "t1", WORKER, None)
        assert forever.expires_at == claim.deadline  # ttl=None: until the deadline

    def test_next_claims_carry_the_deadline(self, backend: PersistentBackend) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        a = backend.claim_task("wf", "a", WORKER, LONG_TTL)
        assert a is not None
        completion = TaskCompletion("wf", "a", WORKER, a.token, output=b"a")
        [result] = backend.complete_tasks(
            [completion], ttl=LONG_TTL, claim_next=1, timeout=self.short_ttl
        )
        [b] = result.next_tasks
        assert b.claim.deadline is not None
        assert b.claim.deadline == b.claim.claimed_at + self.short_ttl == b.claim.expires_at

    # -- workflow deadlines ---------------------------------------------------------------

    def test_overdue_workflows_are_failed_once(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        soon = clock.now() + self.short_ttl
        later = clock.now() + LONG_TTL
        for instance_id, deadline in (("due", soon), ("later", later), ("none", None)):
            backend.start_workflow(make_snapshot(instance_id, deadline=deadline))
        save_new(backend, "paused")
        paused = backend.load_snapshot("paused")
        paused.deadline = soon
        backend.save_snapshot(paused)
        apply_signal(backend, "paused", SignalKind.PAUSE)
        save_new(backend, "done")
        finished = backend.load_snapshot("done")
        finished.deadline = soon
        finished.mark_completed(b"out")
        backend.save_snapshot(finished)
        claim = backend.claim_task("due", "t1", WORKER, LONG_TTL)
        assert claim is not None
        assert backend.load_snapshot("due").deadline == soon
        assert backend.fail_overdue_workflows() == []  # nothing is due yet

        self.wait_past_short_ttl(clock)
        assert sorted(backend.fail_overdue_workflows()) == ["due", "paused"]
        due = backend.load_snapshot("due")
        assert due.status is WorkflowStatus.FAILED
        assert due.error == f"workflow timed out: its deadline {soon.isoformat()} passed"
        assert backend.load_snapshot("paused").status is WorkflowStatus.FAILED
        for untouched in ("later", "none"):
            assert backend.load_snapshot(untouched).status is WorkflowStatus.IN_PROGRESS
        assert backend.load_snapshot("done").status is WorkflowStatus.COMPLETED
        # Its claim was dropped: the holder is fenced off; a second sweep finds nothing.
        with pytest.raises(NotFoundError):
            backend.extend_task_claim("due", "t1", WORKER, LONG_TTL, token=claim.token)
        assert backend.fail_overdue_workflows() == []

    def test_overdue_workflows_come_earliest_deadline_first_up_to_the_limit(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        now = clock.now()
        for instance_id, seconds in (("a", 3), ("b", 1), ("c", 2)):
            deadline = now - timedelta(seconds=seconds) if clock.exact else now
            backend.start_workflow(make_snapshot(instance_id, deadline=deadline))
        if not clock.exact:
            self.wait_past_short_ttl(clock)
        first = backend.fail_overdue_workflows(limit=2)
        rest = backend.fail_overdue_workflows(limit=2)
        assert len(first) == 2 and len(rest) == 1
        assert sorted(first + rest) == ["a", "b", "c"]
        if clock.exact:
            assert first == ["a", "c"] and rest == ["b"]
        with pytest.raises(InvalidInputError, match="limit"):
            backend.fail_overdue_workflows(limit=0)

    def test_concurrent_sweeps_fail_each_overdue_workflow_once(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        due = clock.now() + self.short_ttl
        ids = [f"wf{index:02d}" for index in range(self.scaled(20))]
        for instance_id in ids:
            backend.start_workflow(make_snapshot(instance_id, deadline=due))
        self.wait_past_short_ttl(clock)
        failed = run_in_threads(4, lambda _: backend.fail_overdue_workflows(limit=7))
        while extra := backend.fail_overdue_workflows(limit=7):
            failed.append(extra)
        everything = [instance_id for batch in failed for instance_id in batch]
        assert sorted(everything) == ids  # each once
        assert {backend.load_snapshot(i).version for i in ids} == {2}
