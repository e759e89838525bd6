"""The contract's claim tests: ``claim_task``, ``release_task_claim``, ``extend_task_claim``."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ...backend import PersistentBackend
from ...errors import ClaimLostError, NotFoundError
from ...model import AtDelay, AtFork, SignalKind, WorkflowStatus
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
