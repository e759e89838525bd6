"""The contract's claim tests: ``claim_task``, ``release_task_claim``, ``extend_task_claim``."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ...backend import PersistentBackend
from ...errors import ClaimLostError, NotFoundError
from ...model import (
    AtDelay,
    AtFork,
    AtTask,
    CompletionOutcome,
    SignalKind,
    TaskClaim,
    TaskCompletion,
    WorkflowStatus,
)
from ..builders import (
    LONG_TTL,
    NOT_IN_PROGRESS,
    OTHER,
    WORKER,
    assert_utc,
    make_request,
    save_at,
    save_new,
    save_with_status,
)
from ..cases import UNRUNNABLE, UnrunnableSetup
from ..clocks import ContractClock
from .base import ContractBase


def assert_fenced_off(backend: PersistentBackend, stale: TaskClaim) -> None:
    """A holder of ``stale``, a claim of an earlier instance of its id whose task was claimed
    anew, passes no fenced call, and nothing it tried was written."""
    instance_id, task_id, worker_id = stale.instance_id, stale.task_id, stale.worker_id
    assert not backend.save_snapshot_fenced(
        backend.load_snapshot(instance_id), task_id, worker_id, token=stale.token
    )
    [completed] = backend.complete_tasks(
        [TaskCompletion(instance_id, task_id, worker_id, stale.token, output=b"stale")],
        ttl=LONG_TTL,
    )
    assert completed.outcome is CompletionOutcome.CLAIM_LOST
    with pytest.raises(ClaimLostError):
        backend.extend_task_claim(instance_id, task_id, worker_id, LONG_TTL, token=stale.token)
    with pytest.raises(ClaimLostError):
        backend.release_task_claim(instance_id, task_id, worker_id, token=stale.token)
    assert backend.load_task_result(instance_id, task_id) is None


class ClaimContract(ContractBase):
    """Claims: claim, release and renew one task; expiry, takeover, fencing tokens.

    Checks docs/contract.md, section "Claims" (``#claims``), and section "Timers and parked
    workflows" (``#timers-and-parked-workflows``) for ``claim_task``.
    """

    # -- claim_task -------------------------------------------------------------------------

    def test_claim_task_returns_claim_with_worker_token_and_expiry(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        assert (claim.instance_id, claim.task_id, claim.worker_id) == ("wf", "t1", WORKER)
        assert claim.token >= 1
        assert claim.pending_signals == frozenset()
        self.assert_now(clock, claim.claimed_at)
        assert_utc(claim.expires_at)
        assert claim.expires_at == claim.claimed_at + LONG_TTL

    def test_claim_task_second_claimer_gets_none_while_live(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is None  # even the holder

    def test_claim_task_fork_branches_are_claimed_independently(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        a = backend.claim_task("wf", "a", WORKER, LONG_TTL)
        b = backend.claim_task("wf", "b", OTHER, LONG_TTL)
        assert a is not None and b is not None
        assert (a.task_id, b.task_id) == ("a", "b")

    def test_claim_task_expired_claim_is_taken_over_with_greater_token(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        first = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert first is not None
        self.wait_past_short_ttl(clock)
        second = backend.claim_task("wf", "t1", OTHER, LONG_TTL)
        assert second is not None
        assert second.worker_id == OTHER
        assert second.token > first.token

    def test_claim_task_expires_exactly_at_expires_at(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        self.require_exact(clock)
        save_new(backend, "wf")
        ttl = timedelta(seconds=30)
        assert backend.claim_task("wf", "t1", WORKER, ttl) is not None
        clock.advance(ttl - timedelta(microseconds=1))
        assert backend.claim_task("wf", "t1", OTHER, ttl) is None
        clock.advance(timedelta(microseconds=1))
        assert backend.claim_task("wf", "t1", OTHER, ttl) is not None

    def test_claim_task_release_then_reclaim_gives_greater_token(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        first = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert first is not None
        backend.release_task_claim("wf", "t1", WORKER)
        again = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert again is not None
        assert again.token > first.token
        backend.release_task_claim("wf", "t1", WORKER, token=again.token)
        third = backend.claim_task("wf", "t1", OTHER, LONG_TTL)
        assert third is not None
        assert third.token > again.token

    def test_claim_task_without_ttl_never_expires(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, None)
        assert claim is not None
        assert claim.expires_at is None
        self.wait_past_short_ttl(clock)
        if clock.exact:
            clock.advance(timedelta(days=365 * 200))
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None

    @pytest.mark.parametrize("setup", UNRUNNABLE)
    def test_claim_task_none_when_task_not_runnable(
        self, backend: PersistentBackend, clock: ContractClock, setup: UnrunnableSetup
    ) -> None:
        task_id = setup(backend, clock)
        assert backend.claim_task("wf", task_id, WORKER, LONG_TTL) is None

    @pytest.mark.parametrize("status", NOT_IN_PROGRESS)
    def test_claim_task_none_unless_workflow_in_progress(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is None

    @pytest.mark.parametrize("kind", list(SignalKind))
    def test_claim_task_none_when_signal_pending(
        self, backend: PersistentBackend, kind: SignalKind
    ) -> None:
        save_new(backend, "wf")
        backend.store_signal("wf", kind, make_request())
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is None

    def test_claim_task_delay_past_wake_at_counts_as_next_task(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        delay = AtDelay("d", clock.now() - timedelta(minutes=1), "t2")
        save_at(backend, "wf", delay)
        claim = backend.claim_task("wf", "t2", WORKER, LONG_TTL)
        assert claim is not None
        assert claim.task_id == "t2"
        assert backend.load_snapshot("wf").position == delay  # not rewritten by the store

    def test_claim_task_delay_claimable_exactly_at_wake_at(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        self.require_exact(clock)
        save_at(backend, "wf", AtDelay("d", clock.now() + timedelta(seconds=10), "t2"))
        clock.advance(timedelta(seconds=10) - timedelta(microseconds=1))
        assert backend.claim_task("wf", "t2", WORKER, LONG_TTL) is None
        clock.advance(timedelta(microseconds=1))
        assert backend.claim_task("wf", "t2", WORKER, LONG_TTL) is not None

    def test_claim_task_absent_instance_not_found(self, backend: PersistentBackend) -> None:
        with pytest.raises(NotFoundError):
            backend.claim_task("ghost", "t1", WORKER, LONG_TTL)

    # -- release_task_claim -----------------------------------------------------------------

    @pytest.mark.parametrize("state", ["never-claimed", "already-released", "absent-instance"])
    def test_release_task_claim_without_claim_not_found(
        self, backend: PersistentBackend, state: str
    ) -> None:
        if state != "absent-instance":
            save_new(backend, "wf")
        if state == "already-released":
            assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
            backend.release_task_claim("wf", "t1", WORKER)
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "t1", WORKER)

    def test_release_task_claim_held_by_other_worker_claim_lost(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is not None
        with pytest.raises(ClaimLostError):
            backend.release_task_claim("wf", "t1", WORKER)
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is None  # still held

    def test_release_task_claim_stale_token_after_takeover_by_same_worker_claim_lost(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        first = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert first is not None
        self.wait_past_short_ttl(clock)
        second = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert second is not None
        with pytest.raises(ClaimLostError):
            backend.release_task_claim("wf", "t1", WORKER, token=first.token)
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None  # still held
        backend.release_task_claim("wf", "t1", WORKER, token=second.token)

    def test_release_task_claim_own_expired_claim_succeeds(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert claim is not None
        self.wait_past_short_ttl(clock)
        backend.release_task_claim("wf", "t1", WORKER, token=claim.token)
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "t1", WORKER)

    # -- extend_task_claim ------------------------------------------------------------------

    def test_extend_task_claim_is_absolute_renewal(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        ttl = timedelta(minutes=10)
        claim = backend.claim_task("wf", "t1", WORKER, ttl)
        assert claim is not None and claim.expires_at is not None
        clock.advance(timedelta(milliseconds=50))
        extended = backend.extend_task_claim("wf", "t1", WORKER, ttl, token=claim.token)
        assert extended.expires_at is not None
        assert_utc(extended.expires_at)
        assert (extended.worker_id, extended.token) == (WORKER, claim.token)
        if clock.exact:
            assert extended.expires_at == clock.now() + ttl
        else:
            assert abs(extended.expires_at - (clock.now() + ttl)) <= self.clock_tolerance
        # Never old expiry + ttl.
        assert extended.expires_at - claim.expires_at < ttl / 2

    def test_extend_task_claim_can_shorten_and_make_permanent(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
        backend.extend_task_claim("wf", "t1", WORKER, self.short_ttl)
        self.wait_past_short_ttl(clock)
        taken = backend.claim_task("wf", "t1", OTHER, None)  # shortened, so expired
        assert taken is not None
        permanent = backend.extend_task_claim("wf", "t1", OTHER, None)
        assert permanent.expires_at is None
        self.wait_past_short_ttl(clock)
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is None

    @pytest.mark.parametrize("first_ttl", [None, LONG_TTL], ids=["permanent", "long"])
    def test_a_claim_shortened_by_its_renewal_is_available_once_expired(
        self, backend: PersistentBackend, clock: ContractClock, first_ttl: timedelta | None
    ) -> None:
        save_new(backend, "wf")
        assert backend.claim_task("wf", "t1", WORKER, first_ttl) is not None
        backend.extend_task_claim("wf", "t1", WORKER, self.short_ttl)
        self.wait_past_short_ttl(clock)
        assert [t.task_id for t in backend.find_available_tasks(OTHER, 10)] == ["t1"]
        [taken] = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert (taken.task.instance_id, taken.claim.worker_id) == ("wf", OTHER)

    def test_extend_task_claim_own_expired_claim_not_taken_over_succeeds(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert claim is not None
        self.wait_past_short_ttl(clock)
        extended = backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=claim.token)
        assert extended.token == claim.token
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None  # live again

    def test_extend_task_claim_after_takeover_claim_lost(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert claim is not None
        self.wait_past_short_ttl(clock)
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is not None
        with pytest.raises(ClaimLostError):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL)
        with pytest.raises(ClaimLostError):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=claim.token)

    def test_extend_task_claim_stale_token_after_takeover_by_same_worker_claim_lost(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        first = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert first is not None
        self.wait_past_short_ttl(clock)
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
        with pytest.raises(ClaimLostError):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=first.token)

    @pytest.mark.parametrize("state", ["never-claimed", "released", "absent-instance"])
    def test_extend_task_claim_without_claim_not_found(
        self, backend: PersistentBackend, state: str
    ) -> None:
        if state != "absent-instance":
            save_new(backend, "wf")
        if state == "released":
            assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
            backend.release_task_claim("wf", "t1", WORKER)
        with pytest.raises(NotFoundError):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL)

    def test_extend_task_claim_held_by_other_worker_claim_lost(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is not None
        with pytest.raises(ClaimLostError):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL)

    @pytest.mark.parametrize("kind", list(SignalKind))
    def test_extend_task_claim_returns_pending_signals(
        self, backend: PersistentBackend, kind: SignalKind
    ) -> None:
        save_new(backend, "wf")
        assert backend.claim_task("wf", "t1", WORKER, LONG_TTL) is not None
        assert backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL).pending_signals == set()
        backend.store_signal("wf", kind, make_request())
        extended = backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL)
        assert extended.pending_signals == frozenset({kind})

    # -- fencing tokens across a deletion ---------------------------------------------------

    def test_a_re_created_instance_goes_on_from_the_tokens_of_the_deleted_one(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("t1", "t2")))
        first = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert first is not None
        backend.release_task_claim("wf", "t1", WORKER, token=first.token)
        old = backend.claim_task("wf", "t1", WORKER, LONG_TTL)  # token 2 or more
        old_other = backend.claim_task("wf", "t2", OTHER, LONG_TTL)  # live when deleted
        assert old is not None and old_other is not None

        backend.delete_snapshot("wf")
        save_at(backend, "wf", AtFork("f", ("t1", "t2")))

        # Nothing is claimed yet: the old holders have no claim.
        with pytest.raises(NotFoundError):
            backend.extend_task_claim("wf", "t2", OTHER, LONG_TTL, token=old_other.token)
        assert not backend.save_snapshot_fenced(
            backend.load_snapshot("wf"), "t1", WORKER, token=old.token
        )
        # The same worker claims the task again (claim_task), the other worker takes the
        # other branch (claim_available_tasks): greater tokens, attempts counted from 1.
        new = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert new is not None and new.token > old.token and new.attempt == 1
        [other_new] = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert other_new.claim.task_id == "t2"
        assert other_new.claim.token > old_other.token and other_new.claim.attempt == 1
        assert_fenced_off(backend, old)
        assert_fenced_off(backend, old_other)  # a token 1 too

        # The new holders go on as usual.
        [done] = backend.complete_tasks(
            [TaskCompletion("wf", "t1", WORKER, new.token, output=b"fresh")], ttl=LONG_TTL
        )
        assert done.outcome is CompletionOutcome.RECORDED
        assert backend.extend_task_claim("wf", "t2", OTHER, LONG_TTL).token == (
            other_new.claim.token
        )

    def test_next_claims_of_a_re_created_instance_go_on_from_the_deleted_ones_tokens(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")  # at t1, then t2

        def chain(worker_id: str) -> TaskClaim:
            """Claim t1, complete it moving to t2 and claim t2 with the completion."""
            claim = backend.claim_task("wf", "t1", worker_id, LONG_TTL)
            assert claim is not None
            [done] = backend.complete_tasks(
                [
                    TaskCompletion(
                        "wf",
                        "t1",
                        worker_id,
                        claim.token,
                        output=b"one",
                        advance=lambda s: s.move_to(AtTask("t2")),
                    )
                ],
                ttl=LONG_TTL,
                claim_next=1,
            )
            assert done.outcome is CompletionOutcome.RECORDED
            [claimed] = done.next_tasks
            return claimed.claim

        old = chain(WORKER)
        backend.delete_snapshot("wf")
        save_new(backend, "wf")
        new = chain(WORKER)
        assert new.task_id == "t2" and new.token > old.token and new.attempt == 1
        assert_fenced_off(backend, old)

    def test_tokens_keep_increasing_over_several_deletions(
        self, backend: PersistentBackend
    ) -> None:
        seen: list[int] = []
        for _ in range(2):
            save_new(backend, "wf")
            claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
            assert claim is not None and claim.attempt == 1
            seen.append(claim.token)
            backend.delete_snapshot("wf")
            # An instance deleted before any claim leaves the earlier tokens' mark as it was.
            save_new(backend, "wf")
            backend.delete_snapshot("wf")
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None and claim.attempt == 1
        seen.append(claim.token)
        assert seen == sorted(set(seen)), seen  # strictly increasing
        # Other ids are not affected: a never deleted id starts at token 1.
        save_new(backend, "other")
        fresh = backend.claim_task("other", "t1", WORKER, LONG_TTL)
        assert fresh is not None and fresh.token == 1
