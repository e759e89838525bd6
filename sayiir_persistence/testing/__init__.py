"""Conformance suite for ``PersistentBackend`` implementations, and clocks to drive it.

Every behaviour of the public contract (SPEC.md) is a test of :class:`BackendContract`, a pytest
test class without the ``Test`` prefix: subclass it in your test suite, provide a ``backend``
fixture that yields a fresh, **empty** backend for each test, and pytest runs the whole contract
against it::

    from collections.abc import Iterator

    import pytest
    from sayiir_persistence import InMemoryBackend
    from sayiir_persistence.testing import BackendContract, ManualClock


    class TestInMemoryContract(BackendContract):
        @pytest.fixture
        def clock(self) -> ManualClock:
            return ManualClock()  # the backend judges expiry by it: tests advance it

        @pytest.fixture
        def backend(self, clock: ManualClock) -> Iterator[InMemoryBackend]:
            with InMemoryBackend(clock=clock) as backend:
                yield backend

A backend whose clock cannot be injected (an SQL database judges expiry by its server's clock)
keeps the default ``clock`` fixture, a :class:`RealClock`: the expiry tests then really sleep
(``short_ttl`` plus a margin; lower ``short_ttl`` to go faster, raise it on a slow database),
and the few tests that need exact control of time skip themselves.

This module imports pytest: import it from tests only (pytest is not a runtime dependency).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest

from ..backend import PersistentBackend
from ..errors import (
    CannotCancelError,
    CannotPauseError,
    ClaimLostError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    WorkflowTerminalError,
)
from ..model import (
    AtDelay,
    AtFork,
    AtSignal,
    AtTask,
    AvailableTask,
    NotStarted,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowSnapshot,
    WorkflowStatus,
)
from .builders import (
    AWKWARD_IDS,
    FINISHED,
    HASH,
    LONG_TTL,
    LONGEST_ID,
    NAIVE,
    NOT_IN_PROGRESS,
    OFFER_METHODS,
    OTHER,
    T0,
    TERMINAL,
    WORKER,
    apply_signal,
    assert_same_state,
    assert_utc,
    make_request,
    make_snapshot,
    offered_tasks,
    run_in_threads,
    save_at,
    save_new,
    save_with_status,
    task_pairs,
)
from .cases import (
    FENCE_FAILURES,
    HOSTILE_IDS,
    INVALID_CALLS,
    UNRUNNABLE,
    WRONG_ARGUMENTS,
    WRONG_SNAPSHOT_FIELDS,
    FenceScenario,
    InvalidCall,
    UnrunnableSetup,
    valid_arguments,
    wrong_values,
)
from .clocks import ContractClock, ManualClock, RealClock

__all__ = ["BackendContract", "ContractClock", "ManualClock", "RealClock"]


# ============================================================================================
# The contract


class BackendContract:
    """The conformance suite: subclass it and provide a ``backend`` fixture.

    Fixtures a subclass overrides:

    - ``backend`` (required): yields a fresh, **empty** backend for each test (the tests rely
      on an empty store) and closes it afterwards.
    - ``clock``: a :class:`ContractClock` telling the time the backend judges expiry and
      aging by. The default, :class:`RealClock`, suits a backend that reads its own clock
      (the database server's); a backend with an injectable clock should return a
      :class:`ManualClock` and build the backend with it, which makes the expiry tests
      instant and enables the tests that need exact timestamps.

    Class attributes a subclass may tune:

    - ``short_ttl``: the claim ttl of the expiry tests, which advance the clock by
      ``short_ttl * 1.5``. Keep it well above the latency of one backend call.
    - ``concurrency_scale``: multiplies the thread counts and sizes of the concurrency tests.
    - ``clock_tolerance``: how far a store timestamp may be from ``clock.now()`` with an
      inexact clock (a database server's clock may disagree with the test machine's).

    Example, for a backend judging time by its database server::

        class TestMyBackend(BackendContract):
            short_ttl = timedelta(seconds=1)

            @pytest.fixture
            def backend(self, clock: ContractClock) -> Iterator[MyBackend]:
                backend = MyBackend(make_empty_database())
                yield backend
                backend.close()
    """

    short_ttl: ClassVar[timedelta] = timedelta(milliseconds=400)
    concurrency_scale: ClassVar[float] = 1.0
    clock_tolerance: ClassVar[timedelta] = timedelta(seconds=5)

    @pytest.fixture
    def clock(self) -> ContractClock:
        """The clock of the backend under test; override with a ``ManualClock`` if you can."""
        return RealClock()

    @pytest.fixture
    def backend(self, clock: ContractClock) -> Iterator[PersistentBackend]:
        """Override: yield a fresh, empty backend (built with ``clock`` if it takes one)."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the `backend` fixture of BackendContract"
        )

    # -- helpers for the tests --------------------------------------------------------------

    def wait_past_short_ttl(self, clock: ContractClock) -> None:
        """Advance ``clock`` until a claim taken now with ``short_ttl`` has expired."""
        clock.advance(self.short_ttl * 1.5)

    def scaled(self, size: int) -> int:
        """``size`` multiplied by ``concurrency_scale`` (at least 2)."""
        return max(2, round(size * self.concurrency_scale))

    def assert_now(self, clock: ContractClock, value: datetime | None) -> None:
        """``value`` is aware UTC and is the store's current time."""
        assert_utc(value)
        assert value is not None
        if clock.exact:
            assert value == clock.now()
        else:
            assert abs(value - clock.now()) <= self.clock_tolerance

    @staticmethod
    def require_exact(clock: ContractClock) -> None:
        if not clock.exact:
            pytest.skip("needs a controllable clock")

    # ========================================================================================
    # Snapshots: save_snapshot

    def test_backend_fixture_starts_empty(self, backend: PersistentBackend) -> None:
        assert backend.list_snapshots() == []
        assert backend.find_available_tasks(WORKER, 10) == []

    def test_save_snapshot_first_save_returns_version_1(self, backend: PersistentBackend) -> None:
        snapshot = make_snapshot("wf")
        assert backend.save_snapshot(snapshot) == 1
        assert snapshot.version == 1
        assert backend.load_snapshot("wf").version == 1

    def test_save_snapshot_each_save_increments_version(self, backend: PersistentBackend) -> None:
        snapshot = make_snapshot("wf")
        assert [backend.save_snapshot(snapshot) for _ in range(3)] == [1, 2, 3]
        assert snapshot.version == 3
        assert backend.load_snapshot("wf").version == 3

    @pytest.mark.parametrize(
        "position",
        [
            pytest.param(NotStarted(), id="not-started"),
            pytest.param(AtTask("t2"), id="at-task"),
            pytest.param(AtFork("fork", ("b1", "b2", "b3")), id="at-fork"),
            pytest.param(AtDelay("delay", T0 + timedelta(microseconds=123), "t3"), id="at-delay"),
            pytest.param(AtDelay("delay", T0), id="at-delay-without-next"),
            pytest.param(AtSignal("sig", "approval", T0, "t3"), id="at-signal"),
            pytest.param(AtSignal("sig", "approval"), id="at-signal-without-wake-or-next"),
        ],
    )
    def test_save_snapshot_round_trips_every_field(
        self, backend: PersistentBackend, position: Position
    ) -> None:
        snapshot = make_snapshot(
            "wf", first_task=None, initial_input=b"\x00in\xff", priority=2, tags=("gpu", "eu")
        )
        snapshot.mark_task_completed("t0", b"")  # an empty output is not "no output"
        snapshot.mark_task_completed("t1", bytes(range(256)))
        snapshot.move_to(position)
        snapshot.cancel_request = SignalRequest("stop ü", "alice", T0 + timedelta(microseconds=7))
        snapshot.pause_request = SignalRequest(None, None, T0)
        version = backend.save_snapshot(snapshot)

        loaded = backend.load_snapshot("wf")
        assert_same_state(loaded, snapshot)
        assert loaded.version == version
        assert type(loaded.position) is type(position)
        assert isinstance(loaded.status, WorkflowStatus)
        assert isinstance(loaded.tags, frozenset)
        assert all(type(output) is bytes for output in loaded.completed_tasks.values())
        assert_utc(loaded.created_at)
        assert_utc(loaded.updated_at)
        assert loaded.cancel_request is not None
        assert_utc(loaded.cancel_request.requested_at)
        if isinstance(loaded.position, AtDelay | AtSignal) and loaded.position.wake_at:
            assert_utc(loaded.position.wake_at)

    @pytest.mark.parametrize("status", FINISHED)
    def test_save_snapshot_round_trips_outcome(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        snapshot = save_new(backend, "wf")
        if status is WorkflowStatus.COMPLETED:
            snapshot.mark_completed(b"result\x00")
        else:
            snapshot.mark_failed("boom: ünïcode\nsecond line")
        backend.save_snapshot(snapshot)
        assert_same_state(backend.load_snapshot("wf"), snapshot)

    def test_save_snapshot_returns_timestamps_in_utc(self, backend: PersistentBackend) -> None:
        plus_two = timezone(timedelta(hours=2))
        snapshot = make_snapshot("wf")
        snapshot.created_at = datetime(2030, 1, 1, 14, 0, tzinfo=plus_two)
        snapshot.cancel_request = SignalRequest(
            "r", None, datetime(2030, 1, 1, 7, 0, tzinfo=timezone(timedelta(hours=-5)))
        )
        backend.save_snapshot(snapshot)
        loaded = backend.load_snapshot("wf")
        assert loaded.created_at == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
        assert_utc(loaded.created_at)
        assert loaded.cancel_request is not None
        assert loaded.cancel_request.requested_at == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
        assert_utc(loaded.cancel_request.requested_at)

    def test_save_snapshot_stamps_updated_at_with_store_clock(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        snapshot = save_new(backend, "wf")
        first = backend.load_snapshot("wf").updated_at
        self.assert_now(clock, first)
        clock.advance(timedelta(milliseconds=20))
        backend.save_snapshot(snapshot)
        second = backend.load_snapshot("wf").updated_at
        self.assert_now(clock, second)
        assert second > first

    def test_save_and_load_do_not_share_mutable_state(self, backend: PersistentBackend) -> None:
        snapshot = save_new(backend, "wf")
        snapshot.completed_tasks["t1"] = b"not saved"
        snapshot.move_to(AtTask("t2"))
        loaded = backend.load_snapshot("wf")
        assert loaded.completed_tasks == {}
        assert loaded.position == AtTask("t1")
        loaded.completed_tasks["t9"] = b"nor this"
        assert backend.load_snapshot("wf").completed_tasks == {}

    def test_save_snapshot_expected_version_match_saves(self, backend: PersistentBackend) -> None:
        snapshot = save_new(backend, "wf")
        snapshot.move_to(AtTask("t2"))
        assert backend.save_snapshot(snapshot, expected_version=1) == 2
        assert backend.load_snapshot("wf").position == AtTask("t2")

    @pytest.mark.parametrize("expected_version", [0, 2, 5])
    def test_save_snapshot_expected_version_mismatch_conflicts_and_writes_nothing(
        self, backend: PersistentBackend, expected_version: int
    ) -> None:
        snapshot = save_new(backend, "wf")
        before = backend.load_snapshot("wf")
        snapshot.mark_task_completed("t1", b"one")
        snapshot.move_to(AtTask("t2"))
        with pytest.raises(ConflictError):
            backend.save_snapshot(snapshot, expected_version=expected_version)
        assert backend.load_snapshot("wf") == before

    def test_save_snapshot_expected_version_0_creates_only_if_absent(
        self, backend: PersistentBackend
    ) -> None:
        assert backend.save_snapshot(make_snapshot("wf", first_task="t1"), expected_version=0) == 1
        with pytest.raises(ConflictError):
            backend.save_snapshot(make_snapshot("wf", first_task="other"), expected_version=0)
        assert backend.load_snapshot("wf").position == AtTask("t1")

    def test_save_snapshot_expected_version_on_absent_instance_conflicts(
        self, backend: PersistentBackend
    ) -> None:
        with pytest.raises(ConflictError):
            backend.save_snapshot(make_snapshot("wf"), expected_version=1)
        assert backend.list_snapshots() == []

    @pytest.mark.parametrize("status", TERMINAL)
    @pytest.mark.parametrize("with_expected_version", [False, True])
    def test_save_snapshot_over_terminal_workflow_raises_workflow_terminal_error(
        self, backend: PersistentBackend, status: WorkflowStatus, with_expected_version: bool
    ) -> None:
        save_with_status(backend, "wf", status)
        before = backend.load_snapshot("wf")
        expected = before.version if with_expected_version else None
        with pytest.raises(WorkflowTerminalError) as raised:
            backend.save_snapshot(make_snapshot("wf", first_task="t2"), expected_version=expected)
        assert isinstance(raised.value, ConflictError)
        assert backend.load_snapshot("wf") == before

    def test_save_snapshot_over_paused_workflow_is_allowed(
        self, backend: PersistentBackend
    ) -> None:
        save_with_status(backend, "wf", WorkflowStatus.PAUSED)
        paused = backend.load_snapshot("wf")
        stored_version = paused.version
        assert backend.save_snapshot(paused) == stored_version + 1
        assert backend.load_snapshot("wf").status is WorkflowStatus.PAUSED

    # -- save_task_result -----------------------------------------------------------------

    def test_save_task_result_merges_parallel_branches(self, backend: PersistentBackend) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")), completed={"t0": b"zero"})
        assert backend.save_task_result("wf", "a", b"A") == 2
        assert backend.save_task_result("wf", "b", b"B") == 3
        loaded = backend.load_snapshot("wf")
        assert loaded.completed_tasks == {"t0": b"zero", "a": b"A", "b": b"B"}
        assert loaded.last_completed_task_id == "b"
        assert loaded.version == 3
        assert loaded.runnable_task_ids() == ()

    def test_save_task_result_task_no_longer_runnable(self, backend: PersistentBackend) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        backend.save_task_result("wf", "a", b"A")
        assert backend.load_snapshot("wf").runnable_task_ids() == ("b",)
        assert backend.claim_task("wf", "a", WORKER, LONG_TTL) is None
        assert task_pairs(backend.find_available_tasks(WORKER, 10)) == [("wf", "b")]

    def test_save_task_result_absent_instance_not_found(self, backend: PersistentBackend) -> None:
        with pytest.raises(NotFoundError):
            backend.save_task_result("ghost", "t1", b"x")
        assert backend.list_snapshots() == []

    @pytest.mark.parametrize("status", TERMINAL)
    def test_save_task_result_on_terminal_workflow_raises(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        with pytest.raises(WorkflowTerminalError):
            backend.save_task_result("wf", "t1", b"late")
        assert backend.load_task_result("wf", "t1") is None

    def test_save_snapshot_keeps_results_stored_by_save_task_result(
        self, backend: PersistentBackend
    ) -> None:
        stale = save_at(backend, "wf", AtFork("f", ("a", "b")))
        backend.save_task_result("wf", "a", b"A")
        stale.mark_task_completed("b", b"B")  # a worker that never saw "a"
        backend.save_snapshot(stale)
        assert backend.load_snapshot("wf").completed_tasks == {"a": b"A", "b": b"B"}
        assert backend.load_task_result("wf", "a") == b"A"

    def test_save_snapshot_does_not_rewrite_a_stored_result(
        self, backend: PersistentBackend
    ) -> None:
        stale = save_at(backend, "wf", AtFork("f", ("a", "b")))
        backend.save_task_result("wf", "a", b"first")
        stale.mark_task_completed("a", b"second")
        backend.save_snapshot(stale)
        assert backend.load_task_result("wf", "a") == b"first"

    # -- load, delete, list -----------------------------------------------------------------

    def test_load_snapshot_absent_instance_not_found(self, backend: PersistentBackend) -> None:
        with pytest.raises(NotFoundError):
            backend.load_snapshot("ghost")

    @pytest.mark.parametrize("status", FINISHED)
    def test_load_task_result_still_answers_after_workflow_finished(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        snapshot = save_new(backend, "wf")
        backend.save_task_result("wf", "t1", b"one")
        snapshot = backend.load_snapshot("wf")
        if status is WorkflowStatus.COMPLETED:
            snapshot.mark_completed(b"done")
        else:
            snapshot.mark_failed("boom")
        backend.save_snapshot(snapshot)
        assert backend.load_task_result("wf", "t1") == b"one"

    def test_load_task_result_unknown_task_is_none(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        assert backend.load_task_result("wf", "t1") is None

    def test_load_task_result_absent_instance_not_found(self, backend: PersistentBackend) -> None:
        with pytest.raises(NotFoundError):
            backend.load_task_result("ghost", "t1")

    def test_delete_snapshot_removes_instance(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        save_new(backend, "keep")
        backend.delete_snapshot("wf")
        assert backend.list_snapshots() == ["keep"]
        with pytest.raises(NotFoundError):
            backend.load_snapshot("wf")
        with pytest.raises(NotFoundError):
            backend.load_task_result("wf", "t1")
        assert backend.load_snapshot("keep").version == 1

    def test_delete_snapshot_removes_claims_results_signals_events(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        assert backend.claim_task("wf", "b", WORKER, LONG_TTL) is not None
        backend.save_task_result("wf", "a", b"A")
        backend.store_signal("wf", SignalKind.PAUSE, make_request())
        backend.send_event("wf", "ev", b"buffered")
        backend.delete_snapshot("wf")

        # The same id created again starts from nothing.
        assert backend.save_snapshot(make_snapshot("wf", first_task="b"), expected_version=0) == 1
        assert backend.load_task_result("wf", "a") is None
        assert backend.load_snapshot("wf").completed_tasks == {}
        assert backend.get_signal("wf", SignalKind.PAUSE) is None
        assert backend.consume_event("wf", "ev") is None
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "b", WORKER)
        assert backend.claim_task("wf", "b", OTHER, LONG_TTL) is not None

    def test_delete_snapshot_absent_instance_not_found(self, backend: PersistentBackend) -> None:
        with pytest.raises(NotFoundError):
            backend.delete_snapshot("ghost")

    def test_list_snapshots_ascending_code_point_order(self, backend: PersistentBackend) -> None:
        for instance_id in reversed(AWKWARD_IDS):
            save_new(backend, instance_id)
        assert backend.list_snapshots() == sorted(AWKWARD_IDS)

    def test_list_snapshots_status_filter(self, backend: PersistentBackend) -> None:
        for status in WorkflowStatus:
            save_with_status(backend, f"wf-{status.value}", status)
        save_new(backend, "wf-zz-second-in-progress")
        assert backend.list_snapshots(status=WorkflowStatus.IN_PROGRESS) == [
            "wf-in_progress",
            "wf-zz-second-in-progress",
        ]
        for status in NOT_IN_PROGRESS:
            assert backend.list_snapshots(status=status) == [f"wf-{status.value}"]
        assert len(backend.list_snapshots()) == len(WorkflowStatus) + 1

    def test_list_snapshots_keyset_paging_with_after_and_limit(
        self, backend: PersistentBackend
    ) -> None:
        for instance_id in AWKWARD_IDS:
            save_new(backend, instance_id)
        pages: list[list[str]] = []
        after: str | None = None
        while page := backend.list_snapshots(after=after, limit=5):
            assert len(page) <= 5
            pages.append(page)
            after = page[-1]
        assert [len(page) for page in pages] == [5, 5, 2]
        assert [item for page in pages for item in page] == sorted(AWKWARD_IDS)
        # ``after`` need not be a stored id: ids strictly greater than it.
        assert backend.list_snapshots(after="a!") == [i for i in sorted(AWKWARD_IDS) if i > "a!"]
        assert backend.list_snapshots(limit=3) == sorted(AWKWARD_IDS)[:3]

    def test_list_stalled_forks_lists_in_progress_forks_with_every_branch_completed(
        self, backend: PersistentBackend
    ) -> None:
        fork = AtFork("f", ("a", "b"))
        done = {"a": b"A", "b": b"B"}
        save_at(backend, "stalled-2", fork, completed=done)
        save_at(backend, "stalled-1", fork, completed=done)
        save_at(backend, "one-branch-left", fork, completed={"a": b"A"})
        save_at(backend, "at-task", AtTask("t2"), completed={"t1": b"1"})
        save_at(backend, "at-signal", AtSignal("s", "go", None, "t2"))
        save_at(backend, "paused", fork, completed=done)
        apply_signal(backend, "paused", SignalKind.PAUSE)
        save_at(backend, "completed", fork, completed=done)
        finished = backend.load_snapshot("completed")
        finished.mark_completed(b"B")
        backend.save_snapshot(finished)
        save_at(backend, "joined-by-results", fork, completed={"a": b"A"})
        backend.save_task_result("joined-by-results", "b", b"B")

        assert backend.list_stalled_forks() == ["joined-by-results", "stalled-1", "stalled-2"]
        assert backend.list_stalled_forks(limit=1) == ["joined-by-results"]
        moved = backend.load_snapshot("stalled-1")
        moved.move_to(AtTask("next"))
        backend.save_snapshot(moved)
        assert backend.list_stalled_forks() == ["joined-by-results", "stalled-2"]
        with pytest.raises(InvalidInputError, match="limit"):
            backend.list_stalled_forks(limit=0)

    def test_list_snapshots_paging_combines_with_status(self, backend: PersistentBackend) -> None:
        for index in range(6):
            status = WorkflowStatus.PAUSED if index % 2 else WorkflowStatus.IN_PROGRESS
            save_with_status(backend, f"wf-{index}", status)
        assert backend.list_snapshots(status=WorkflowStatus.PAUSED, after="wf-1", limit=1) == [
            "wf-3"
        ]

    # ========================================================================================
    # Claims: claim_task

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

    # -- save_snapshot_fenced ----------------------------------------------------------------

    @pytest.mark.parametrize("with_token", [False, True])
    def test_save_snapshot_fenced_succeeds_with_live_claim(
        self, backend: PersistentBackend, with_token: bool
    ) -> None:
        snapshot = save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        snapshot.mark_task_completed("t1", b"one")
        snapshot.move_to(AtTask("t2"))
        token = claim.token if with_token else None
        assert backend.save_snapshot_fenced(snapshot, "t1", WORKER, token=token) is True
        assert snapshot.version == 2
        loaded = backend.load_snapshot("wf")
        assert (loaded.version, loaded.position) == (2, AtTask("t2"))
        assert loaded.completed_tasks == {"t1": b"one"}

    @pytest.mark.parametrize("scenario", FENCE_FAILURES)
    def test_save_snapshot_fenced_without_live_claim_returns_false_and_writes_nothing(
        self, backend: PersistentBackend, clock: ContractClock, scenario: FenceScenario
    ) -> None:
        snapshot = save_new(backend, "wf")
        worker_id, token = scenario(self, backend, clock)
        before = backend.load_snapshot("wf")
        snapshot.mark_task_completed("t1", b"one")
        snapshot.move_to(AtTask("t2"))
        assert backend.save_snapshot_fenced(snapshot, "t1", worker_id, token=token) is False
        assert backend.load_snapshot("wf") == before

    def test_save_snapshot_fenced_after_renewing_own_expired_claim_succeeds(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        snapshot = save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert claim is not None
        self.wait_past_short_ttl(clock)
        assert backend.save_snapshot_fenced(snapshot, "t1", WORKER) is False
        backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL)
        assert backend.save_snapshot_fenced(snapshot, "t1", WORKER, token=claim.token) is True

    def test_save_snapshot_fenced_on_terminal_workflow_raises(
        self, backend: PersistentBackend
    ) -> None:
        snapshot = save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        finished = backend.load_snapshot("wf")
        finished.mark_completed(b"done")
        backend.save_snapshot(finished)
        snapshot.move_to(AtTask("t2"))
        with pytest.raises(WorkflowTerminalError):
            backend.save_snapshot_fenced(snapshot, "t1", WORKER, token=claim.token)
        assert backend.load_snapshot("wf").status is WorkflowStatus.COMPLETED

    # ========================================================================================
    # Available tasks: selection (find_available_tasks and claim_available_tasks alike)

    @OFFER_METHODS
    def test_available_tasks_carry_workflow_details(
        self, backend: PersistentBackend, via: str
    ) -> None:
        snapshot = save_new(backend, "wf", initial_input=b"in", priority=2, tags=["gpu"])
        backend.save_snapshot(snapshot)
        [task] = offered_tasks(backend, via, tags=["gpu", "eu"])
        assert task == AvailableTask(
            instance_id="wf",
            task_id="t1",
            definition_hash=HASH,
            input=b"in",
            priority=2,
            tags=frozenset({"gpu"}),
            snapshot_version=2,
        )

    @OFFER_METHODS
    def test_available_tasks_only_runnable_unclaimed_in_progress_without_signal(
        self, backend: PersistentBackend, clock: ContractClock, via: str
    ) -> None:
        past, future = clock.now() - timedelta(minutes=1), clock.now() + LONG_TTL
        for status in NOT_IN_PROGRESS:
            save_with_status(backend, f"x-{status.value}", status)
        for kind in SignalKind:
            save_new(backend, f"x-{kind.value}-pending")
            backend.store_signal(f"x-{kind.value}-pending", kind, make_request())
        save_new(backend, "x-not-started", first_task=None)
        save_at(backend, "x-at-signal", AtSignal("s", "go", past, "t1"))
        save_at(backend, "x-delay-pending", AtDelay("d", future, "t1"))
        save_at(backend, "x-delay-without-next", AtDelay("d", past))
        save_new(backend, "x-claimed")
        assert backend.claim_task("x-claimed", "t1", OTHER, LONG_TTL) is not None
        save_new(backend, "x-task-done")
        backend.save_task_result("x-task-done", "t1", b"one")
        save_at(backend, "y-fork", AtFork("f", ("a", "b")))
        backend.save_task_result("y-fork", "a", b"A")
        save_new(backend, "z-runnable")
        offered = task_pairs(offered_tasks(backend, via))
        assert sorted(offered) == [("y-fork", "b"), ("z-runnable", "t1")]

    @OFFER_METHODS
    def test_available_tasks_fork_gives_all_branches_the_same_input(
        self, backend: PersistentBackend, via: str
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b", "c")), completed={"t1": b"one"})
        backend.save_task_result("wf", "c", b"C")  # a finished sibling changes no input
        tasks = offered_tasks(backend, via)
        assert sorted(task_pairs(tasks)) == [("wf", "a"), ("wf", "b")]
        assert [task.input for task in tasks] == [b"one", b"one"]

    @OFFER_METHODS
    def test_available_tasks_input_is_initial_input_then_previous_output(
        self, backend: PersistentBackend, via: str
    ) -> None:
        save_new(backend, "first", initial_input=b"initial")
        save_at(backend, "moved", AtTask("t1"), initial_input=b"initial")
        save_at(backend, "second", AtTask("t2"), completed={"t1": b"one"}, initial_input=b"in")
        save_new(backend, "no-input")
        inputs = {task.instance_id: task.input for task in offered_tasks(backend, via)}
        assert inputs == {
            "first": b"initial",
            "moved": b"initial",
            "second": b"one",
            "no-input": None,
        }

    @OFFER_METHODS
    def test_available_tasks_delay_past_wake_at_offers_next_task(
        self, backend: PersistentBackend, clock: ContractClock, via: str
    ) -> None:
        delay = AtDelay("d", clock.now() - timedelta(minutes=1), "t2")
        save_at(backend, "wf", delay, completed={"t1": b"one"})
        [task] = offered_tasks(backend, via)
        assert (task.task_id, task.input) == ("t2", b"one")
        assert backend.load_snapshot("wf").position == delay

    def test_find_available_tasks_delay_available_exactly_at_wake_at(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        self.require_exact(clock)
        save_at(backend, "wf", AtDelay("d", clock.now() + timedelta(seconds=10), "t2"))
        clock.advance(timedelta(seconds=10) - timedelta(microseconds=1))
        assert backend.find_available_tasks(WORKER, 10) == []
        clock.advance(timedelta(microseconds=1))
        assert task_pairs(backend.find_available_tasks(WORKER, 10)) == [("wf", "t2")]

    @OFFER_METHODS
    @pytest.mark.parametrize(
        ("worker_tags", "expected"),
        [
            pytest.param((), ["untagged"], id="untagged-worker"),
            pytest.param(("gpu",), ["gpu", "untagged"], id="gpu-worker"),
            pytest.param(("eu", "gpu", "x"), ["gpu", "gpu-eu", "untagged"], id="superset"),
            pytest.param(("eu",), ["untagged"], id="other-tag"),
        ],
    )
    def test_available_tasks_tags_must_be_subset_of_worker_tags(
        self,
        backend: PersistentBackend,
        via: str,
        worker_tags: tuple[str, ...],
        expected: list[str],
    ) -> None:
        save_new(backend, "untagged")
        save_new(backend, "gpu", tags=["gpu"])
        save_new(backend, "gpu-eu", tags=["gpu", "eu"])
        offered = sorted(task.instance_id for task in offered_tasks(backend, via, tags=worker_tags))
        assert offered == expected

    @OFFER_METHODS
    def test_available_tasks_ordered_by_priority(
        self, backend: PersistentBackend, via: str
    ) -> None:
        for instance_id, priority in [("p5", 5), ("p1", 1), ("p3", 3), ("p2", 2), ("p4", 4)]:
            save_new(backend, instance_id, priority=priority)
        assert [t.instance_id for t in offered_tasks(backend, via)] == [
            "p1",
            "p2",
            "p3",
            "p4",
            "p5",
        ]

    @OFFER_METHODS
    def test_available_tasks_same_priority_older_update_first(
        self, backend: PersistentBackend, clock: ContractClock, via: str
    ) -> None:
        for instance_id in ("c", "b", "a"):
            save_new(backend, instance_id)
            clock.advance(timedelta(milliseconds=10))
        assert [task.instance_id for task in offered_tasks(backend, via)] == ["c", "b", "a"]

    @OFFER_METHODS
    def test_available_tasks_exact_ties_by_instance_id_then_task_id(
        self, backend: PersistentBackend, clock: ContractClock, via: str
    ) -> None:
        self.require_exact(clock)
        save_new(backend, "b")
        save_at(backend, "c", AtFork("f", ("z", "x", "y")))
        save_new(backend, "a")
        assert task_pairs(offered_tasks(backend, via)) == [
            ("a", "t1"),
            ("b", "t1"),
            ("c", "x"),
            ("c", "y"),
            ("c", "z"),
        ]

    @OFFER_METHODS
    def test_available_tasks_aging_lets_an_old_task_overtake(
        self, backend: PersistentBackend, clock: ContractClock, via: str
    ) -> None:
        aging_interval = self.short_ttl / 8
        save_new(backend, "old", priority=5)
        clock.advance(self.short_ttl)  # 8 intervals: 5 - 8 < 1 - 0
        save_new(backend, "fresh", priority=1)
        # With the default (long) aging interval the waited time hardly matters...
        assert [t.instance_id for t in backend.find_available_tasks(WORKER, 10)] == [
            "fresh",
            "old",
        ]
        # ...with a short one the old task has aged past the fresh one.
        offered = offered_tasks(backend, via, aging_interval=aging_interval)
        assert [task.instance_id for task in offered] == ["old", "fresh"]

    @OFFER_METHODS
    @pytest.mark.parametrize(
        ("waited_past_two_intervals", "expected"),
        [
            pytest.param(timedelta(microseconds=-1), ["fresh", "old"], id="just-before"),
            pytest.param(timedelta(0), ["old", "fresh"], id="tie-older-update-first"),
            pytest.param(timedelta(microseconds=1), ["old", "fresh"], id="just-after"),
        ],
    )
    def test_available_tasks_aging_exact_arithmetic(
        self,
        backend: PersistentBackend,
        clock: ContractClock,
        via: str,
        waited_past_two_intervals: timedelta,
        expected: list[str],
    ) -> None:
        self.require_exact(clock)
        aging_interval = timedelta(minutes=1)
        save_new(backend, "old", priority=3)
        clock.advance(2 * aging_interval + waited_past_two_intervals)
        save_new(backend, "fresh", priority=1)
        clock.advance(timedelta(hours=7))  # the order does not depend on when one asks
        offered = offered_tasks(backend, via, aging_interval=aging_interval)
        assert [task.instance_id for task in offered] == expected

    @OFFER_METHODS
    def test_available_tasks_respect_limit(self, backend: PersistentBackend, via: str) -> None:
        for index in range(5):
            save_new(backend, f"wf-{index}", priority=5 - index)
        offered = offered_tasks(backend, via, limit=2)
        assert [task.instance_id for task in offered] == ["wf-4", "wf-3"]

    # -- find_available_tasks --------------------------------------------------------------

    def test_find_available_tasks_does_not_claim(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        first = backend.find_available_tasks(WORKER, 10)
        assert backend.find_available_tasks(OTHER, 10) == first
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is not None

    # -- claim_available_tasks -------------------------------------------------------------

    def test_claim_available_tasks_claims_in_find_order(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        for index in range(12):
            save_new(backend, f"wf-{index:02d}", priority=1 + index % 5)
            clock.advance(timedelta(milliseconds=2))
        found = backend.find_available_tasks(WORKER, 8)
        claimed = backend.claim_available_tasks(WORKER, 8, LONG_TTL)
        assert [item.task for item in claimed] == found

    def test_claim_available_tasks_returns_claim_with_task(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf", initial_input=b"in")
        [found] = backend.find_available_tasks(WORKER, 10)
        [item] = backend.claim_available_tasks(WORKER, 10, LONG_TTL)
        assert item.task == found
        claim = item.claim
        assert (claim.instance_id, claim.task_id, claim.worker_id) == ("wf", "t1", WORKER)
        assert claim.token >= 1
        self.assert_now(clock, claim.claimed_at)
        assert claim.expires_at == claim.claimed_at + LONG_TTL
        # The returned claim is real: its holder can use it, nobody else can take it.
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None
        backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=claim.token)

    def test_claim_available_tasks_without_ttl_never_expires(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        [item] = backend.claim_available_tasks(WORKER, 1, None)
        assert item.claim.expires_at is None
        self.wait_past_short_ttl(clock)
        assert backend.find_available_tasks(OTHER, 10) == []

    def test_claim_available_tasks_claimed_tasks_no_longer_available(
        self, backend: PersistentBackend
    ) -> None:
        for index in range(5):
            save_new(backend, f"wf-{index}")
        first = backend.claim_available_tasks(WORKER, 3, LONG_TTL)
        claimed = {(item.task.instance_id, item.task.task_id) for item in first}
        remaining = set(task_pairs(backend.find_available_tasks(OTHER, 10)))
        assert len(claimed) == 3
        assert claimed.isdisjoint(remaining)
        assert len(remaining) == 2
        second = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert {(item.task.instance_id, item.task.task_id) for item in second} == remaining
        assert backend.claim_available_tasks(OTHER, 10, LONG_TTL) == []

    def test_claim_available_tasks_expired_claims_available_again(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        [first] = backend.claim_available_tasks(WORKER, 1, self.short_ttl)
        assert backend.find_available_tasks(OTHER, 1) == []
        self.wait_past_short_ttl(clock)
        assert task_pairs(backend.find_available_tasks(OTHER, 1)) == [("wf", "t1")]
        [again] = backend.claim_available_tasks(OTHER, 1, LONG_TTL)
        assert again.claim.worker_id == OTHER
        assert again.claim.token > first.claim.token

    # ========================================================================================
    # Signals: store_signal, get_signal, clear_signal

    @pytest.mark.parametrize("kind", list(SignalKind))
    def test_store_signal_get_and_clear(self, backend: PersistentBackend, kind: SignalKind) -> None:
        save_new(backend, "wf")
        request = SignalRequest("maintenance", "ops", T0)
        other = SignalKind.PAUSE if kind is SignalKind.CANCEL else SignalKind.CANCEL
        assert backend.get_signal("wf", kind) is None
        backend.store_signal("wf", kind, request)
        stored = backend.get_signal("wf", kind)
        assert stored == request
        assert stored is not None
        assert_utc(stored.requested_at)
        assert backend.get_signal("wf", other) is None
        backend.clear_signal("wf", kind)
        assert backend.get_signal("wf", kind) is None
        backend.clear_signal("wf", kind)  # nothing pending: no error

    def test_store_signal_already_pending_keeps_first_request(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        backend.store_signal("wf", SignalKind.CANCEL, make_request("first"))
        backend.store_signal("wf", SignalKind.CANCEL, make_request("second"))
        stored = backend.get_signal("wf", SignalKind.CANCEL)
        assert stored is not None
        assert stored.reason == "first"

    def test_store_signal_returns_requested_at_in_utc(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        local = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
        backend.store_signal("wf", SignalKind.PAUSE, SignalRequest(None, None, local))
        stored = backend.get_signal("wf", SignalKind.PAUSE)
        assert stored is not None
        assert stored.requested_at == local
        assert_utc(stored.requested_at)

    def test_store_signal_naive_requested_at_invalid_input(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        with pytest.raises(InvalidInputError, match="requested_at"):
            backend.store_signal("wf", SignalKind.CANCEL, SignalRequest(requested_at=NAIVE))
        assert backend.get_signal("wf", SignalKind.CANCEL) is None

    @pytest.mark.parametrize("status", FINISHED)
    def test_store_cancel_on_finished_workflow_raises_cannot_cancel(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        with pytest.raises(CannotCancelError):
            backend.store_signal("wf", SignalKind.CANCEL, make_request())
        assert backend.get_signal("wf", SignalKind.CANCEL) is None

    @pytest.mark.parametrize("status", TERMINAL)
    def test_store_pause_on_terminal_workflow_raises_cannot_pause(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        with pytest.raises(CannotPauseError):
            backend.store_signal("wf", SignalKind.PAUSE, make_request())
        assert backend.get_signal("wf", SignalKind.PAUSE) is None

    @pytest.mark.parametrize(
        ("status", "kind"),
        [
            pytest.param(WorkflowStatus.CANCELLED, SignalKind.CANCEL, id="cancel-on-cancelled"),
            pytest.param(WorkflowStatus.PAUSED, SignalKind.PAUSE, id="pause-on-paused"),
        ],
    )
    def test_store_signal_on_workflow_already_in_that_state_is_idempotent(
        self, backend: PersistentBackend, status: WorkflowStatus, kind: SignalKind
    ) -> None:
        save_with_status(backend, "wf", status)
        before = backend.load_snapshot("wf")
        backend.store_signal("wf", kind, make_request("again"))
        assert backend.load_snapshot("wf") == before
        assert backend.get_signal("wf", kind) is None

    # -- check_and_cancel, check_and_pause, unpause --------------------------------------------

    @pytest.mark.parametrize("kind", list(SignalKind))
    def test_check_and_apply_in_progress_applies_signal_and_drops_claims(
        self, backend: PersistentBackend, kind: SignalKind
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        assert backend.claim_task("wf", "a", WORKER, LONG_TTL) is not None
        assert backend.claim_task("wf", "b", OTHER, None) is not None
        request = SignalRequest(f"{kind.value} please", "ops", T0)
        backend.store_signal("wf", kind, request)
        apply = backend.check_and_cancel if kind is SignalKind.CANCEL else backend.check_and_pause
        assert apply("wf") is True

        loaded = backend.load_snapshot("wf")
        if kind is SignalKind.CANCEL:
            assert (loaded.status, loaded.cancel_request) == (WorkflowStatus.CANCELLED, request)
        else:
            assert (loaded.status, loaded.pause_request) == (WorkflowStatus.PAUSED, request)
        assert backend.get_signal("wf", kind) is None
        for task_id, holder in (("a", WORKER), ("b", OTHER)):
            with pytest.raises(NotFoundError):
                backend.release_task_claim("wf", task_id, holder)
        assert apply("wf") is False  # applied once

    def test_check_and_cancel_applies_to_paused_workflow(self, backend: PersistentBackend) -> None:
        save_with_status(backend, "wf", WorkflowStatus.PAUSED)
        request = make_request("stop it")
        backend.store_signal("wf", SignalKind.CANCEL, request)
        assert backend.check_and_cancel("wf") is True
        loaded = backend.load_snapshot("wf")
        assert (loaded.status, loaded.cancel_request) == (WorkflowStatus.CANCELLED, request)
        assert backend.get_signal("wf", SignalKind.CANCEL) is None

    @pytest.mark.parametrize("kind", list(SignalKind))
    def test_check_and_apply_without_pending_signal_is_false(
        self, backend: PersistentBackend, kind: SignalKind
    ) -> None:
        save_new(backend, "wf")
        other = SignalKind.PAUSE if kind is SignalKind.CANCEL else SignalKind.CANCEL
        backend.store_signal("wf", other, make_request())  # the other kind does not count
        before = backend.load_snapshot("wf")
        apply = backend.check_and_cancel if kind is SignalKind.CANCEL else backend.check_and_pause
        assert apply("wf") is False
        assert backend.load_snapshot("wf") == before

    def test_check_and_pause_on_paused_workflow_is_false(self, backend: PersistentBackend) -> None:
        save_with_status(backend, "wf", WorkflowStatus.PAUSED)
        backend.store_signal("wf", SignalKind.PAUSE, make_request("again"))
        before = backend.load_snapshot("wf")
        assert backend.check_and_pause("wf") is False
        assert backend.load_snapshot("wf") == before

    def test_check_and_pause_on_cancelled_workflow_is_false(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        backend.store_signal("wf", SignalKind.PAUSE, make_request())
        backend.store_signal("wf", SignalKind.CANCEL, make_request())
        assert backend.check_and_cancel("wf") is True
        assert backend.check_and_pause("wf") is False
        assert backend.load_snapshot("wf").status is WorkflowStatus.CANCELLED

    @pytest.mark.parametrize("kind", list(SignalKind))
    def test_check_and_apply_on_workflow_finished_since_signal_is_false(
        self, backend: PersistentBackend, kind: SignalKind
    ) -> None:
        snapshot = save_new(backend, "wf")
        backend.store_signal("wf", kind, make_request())
        snapshot.mark_completed(b"done")  # the worker finished before seeing the signal
        backend.save_snapshot(snapshot)
        apply = backend.check_and_cancel if kind is SignalKind.CANCEL else backend.check_and_pause
        assert apply("wf") is False
        loaded = backend.load_snapshot("wf")
        assert (loaded.status, loaded.output) == (WorkflowStatus.COMPLETED, b"done")

    def test_unpause_resumes_workflow_and_tasks_are_claimable_again(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        held = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert held is not None
        apply_signal(backend, "wf", SignalKind.PAUSE)
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None
        assert backend.find_available_tasks(OTHER, 10) == []

        resumed = backend.unpause("wf")
        assert resumed.status is WorkflowStatus.IN_PROGRESS
        assert resumed.pause_request is None
        assert backend.load_snapshot("wf") == resumed
        assert task_pairs(backend.find_available_tasks(OTHER, 10)) == [("wf", "t1")]
        claim = backend.claim_task("wf", "t1", OTHER, LONG_TTL)
        assert claim is not None
        assert claim.token > held.token  # the dropped claim's holder is fenced off

    @pytest.mark.parametrize(
        "status", [WorkflowStatus.IN_PROGRESS, WorkflowStatus.COMPLETED, WorkflowStatus.CANCELLED]
    )
    def test_unpause_not_paused_raises_cannot_pause(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        before = backend.load_snapshot("wf")
        with pytest.raises(CannotPauseError):
            backend.unpause("wf")
        assert backend.load_snapshot("wf") == before

    @pytest.mark.parametrize(
        "call",
        [
            pytest.param(
                lambda b: b.store_signal("ghost", SignalKind.CANCEL, make_request()),
                id="store_signal",
            ),
            pytest.param(lambda b: b.get_signal("ghost", SignalKind.CANCEL), id="get_signal"),
            pytest.param(lambda b: b.clear_signal("ghost", SignalKind.PAUSE), id="clear_signal"),
            pytest.param(lambda b: b.check_and_cancel("ghost"), id="check_and_cancel"),
            pytest.param(lambda b: b.check_and_pause("ghost"), id="check_and_pause"),
            pytest.param(lambda b: b.unpause("ghost"), id="unpause"),
            pytest.param(lambda b: b.send_event("ghost", "ev", b"x"), id="send_event"),
            pytest.param(lambda b: b.consume_event("ghost", "ev"), id="consume_event"),
        ],
    )
    def test_signal_and_event_calls_on_absent_instance_not_found(
        self, backend: PersistentBackend, call: InvalidCall
    ) -> None:
        save_new(backend, "other")
        with pytest.raises(NotFoundError):
            call(backend)
        assert backend.list_snapshots() == ["other"]

    # ========================================================================================
    # Events: send_event, consume_event

    def test_send_event_wakes_matching_signal_and_moves_to_next_task(
        self, backend: PersistentBackend
    ) -> None:
        save_at(
            backend, "wf", AtSignal("approval", "approved", None, "t2"), completed={"t1": b"one"}
        )
        backend.send_event("wf", "approved", b"yes")
        loaded = backend.load_snapshot("wf")
        assert loaded.status is WorkflowStatus.IN_PROGRESS
        assert loaded.position == AtTask("t2")
        assert loaded.version == 2
        assert backend.load_task_result("wf", "approval") == b"yes"
        assert backend.consume_event("wf", "approved") is None  # taken, not buffered
        [task] = backend.find_available_tasks(WORKER, 10)
        assert (task.task_id, task.input) == ("t2", b"yes")

    def test_send_event_completes_workflow_when_no_next_task(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtSignal("approval", "approved"))
        backend.send_event("wf", "approved", b"final")
        loaded = backend.load_snapshot("wf")
        assert (loaded.status, loaded.output) == (WorkflowStatus.COMPLETED, b"final")
        assert backend.load_task_result("wf", "approval") == b"final"

    @pytest.mark.parametrize(
        "position",
        [
            pytest.param(AtSignal("approval", "approved", None, "t2"), id="at-other-signal"),
            pytest.param(AtTask("t1"), id="at-task"),
        ],
    )
    def test_send_event_not_awaited_is_buffered(
        self, backend: PersistentBackend, position: Position
    ) -> None:
        save_at(backend, "wf", position)
        before = backend.load_snapshot("wf")
        backend.send_event("wf", "other-event", b"payload")
        assert backend.load_snapshot("wf") == before
        assert backend.consume_event("wf", "other-event") == b"payload"

    def test_send_event_to_paused_workflow_at_signal_is_buffered(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtSignal("approval", "approved", None, "t2"))
        apply_signal(backend, "wf", SignalKind.PAUSE)
        backend.send_event("wf", "approved", b"yes")
        assert backend.load_snapshot("wf").position == AtSignal("approval", "approved", None, "t2")
        assert backend.consume_event("wf", "approved") == b"yes"

    def test_consume_event_fifo_per_name(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        save_new(backend, "wf-2")
        for payload in (b"1", b"2", b"3"):
            backend.send_event("wf", "ev", payload)
        backend.send_event("wf", "other", b"x")
        backend.send_event("wf-2", "ev", b"elsewhere")
        assert [backend.consume_event("wf", "ev") for _ in range(4)] == [b"1", b"2", b"3", None]
        assert backend.consume_event("wf", "other") == b"x"
        assert backend.consume_event("wf-2", "ev") == b"elsewhere"

    def test_consume_event_empty_is_none(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        assert backend.consume_event("wf", "ev") is None

    # ========================================================================================
    # Input validation

    @pytest.mark.parametrize(("call", "argument"), INVALID_CALLS)
    def test_invalid_argument_raises_invalid_input_naming_it_and_stores_nothing(
        self, backend: PersistentBackend, call: InvalidCall, argument: str
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        with pytest.raises(InvalidInputError, match=argument):
            call(backend)
        self.assert_untouched(backend, before)
        with pytest.raises(NotFoundError):
            backend.load_snapshot("ghost")

    def test_longest_id_with_special_characters_round_trips(
        self, backend: PersistentBackend
    ) -> None:
        assert len(LONGEST_ID) == 255
        name = LONGEST_ID
        snapshot = WorkflowSnapshot.new(name, name, first_task=name, tags=[name])
        backend.save_snapshot(snapshot)
        assert backend.list_snapshots() == [name]
        assert backend.load_snapshot(name).position == AtTask(name)
        [task] = backend.find_available_tasks(name, 1, tags=[name])
        assert (task.instance_id, task.task_id, task.definition_hash) == (name, name, name)
        claim = backend.claim_task(name, name, name, LONG_TTL)
        assert claim is not None
        assert (claim.instance_id, claim.task_id, claim.worker_id) == (name, name, name)
        backend.release_task_claim(name, name, name, token=claim.token)
        backend.save_task_result(name, name, b"out")
        assert backend.load_task_result(name, name) == b"out"
        backend.send_event(name, name, b"ev")
        assert backend.consume_event(name, name) == b"ev"
        backend.delete_snapshot(name)
        assert backend.list_snapshots() == []

    def test_ids_differing_only_in_case_space_or_normalization_are_distinct(
        self, backend: PersistentBackend
    ) -> None:
        for index, instance_id in enumerate(AWKWARD_IDS):
            save_new(backend, instance_id, first_task=f"t{index}")
        for index, instance_id in enumerate(AWKWARD_IDS):
            assert backend.load_snapshot(instance_id).position == AtTask(f"t{index}")
        backend.delete_snapshot("a")
        assert backend.load_snapshot("A").position == AtTask(f"t{AWKWARD_IDS.index('A')}")
        assert len(backend.list_snapshots()) == len(AWKWARD_IDS) - 1

    def test_payloads_round_trip_byte_for_byte(self, backend: PersistentBackend) -> None:
        largest = bytes(range(256)) * (backend.max_payload_bytes // 256) + b"\x00" * (
            backend.max_payload_bytes % 256
        )
        assert len(largest) == backend.max_payload_bytes
        save_at(backend, "wf", AtFork("f", ("empty", "binary", "largest")), initial_input=b"")
        for task_id, payload in (
            ("empty", b""),
            ("binary", bytes(range(256))),
            ("largest", largest),
        ):
            backend.save_task_result("wf", task_id, payload)
            assert backend.load_task_result("wf", task_id) == payload
        assert backend.load_snapshot("wf").initial_input == b""
        backend.send_event("wf", "ev", largest)
        assert backend.consume_event("wf", "ev") == largest

    # ========================================================================================
    # Hostile input: stored verbatim, or refused whole with InvalidInputError

    def assert_untouched(self, backend: PersistentBackend, before: WorkflowSnapshot) -> None:
        """The store still holds exactly the workflow ``existing`` as ``before``, unclaimed,
        without results, signals or events: a refused call wrote nothing."""
        assert backend.list_snapshots() == ["existing"]
        assert backend.load_snapshot("existing") == before
        assert backend.load_task_result("existing", "t1") is None
        for kind in SignalKind:
            assert backend.get_signal("existing", kind) is None
        assert backend.consume_event("existing", "e") is None
        claim = backend.claim_task("existing", "t1", "probe", LONG_TTL)
        assert claim is not None and claim.token == 1

    @pytest.mark.parametrize(("method", "argument"), WRONG_ARGUMENTS)
    def test_wrong_type_or_range_of_any_argument_is_refused_naming_it(
        self, backend: PersistentBackend, method: str, argument: str
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        for wrong in wrong_values(method, argument):
            arguments = {**valid_arguments(method), argument: wrong}
            with pytest.raises(InvalidInputError, match=argument):
                getattr(backend, method)(**arguments)
        self.assert_untouched(backend, before)

    @pytest.mark.parametrize(("field", "value"), WRONG_SNAPSHOT_FIELDS)
    def test_wrong_snapshot_field_is_refused_naming_it(
        self, backend: PersistentBackend, field: str, value: Any
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        for fenced in (False, True):
            snapshot = dataclasses.replace(backend.load_snapshot("existing"))
            setattr(snapshot, field, value)
            with pytest.raises(InvalidInputError, match=field):
                if fenced:
                    backend.save_snapshot_fenced(snapshot, "t1", WORKER)
                else:
                    backend.save_snapshot(snapshot)
        self.assert_untouched(backend, before)

    @pytest.mark.parametrize("hostile", HOSTILE_IDS)
    def test_hostile_ids_are_stored_verbatim_through_every_call(
        self, backend: PersistentBackend, hostile: str
    ) -> None:
        save_new(backend, "bystander")
        branch = f"{hostile}-branch"
        snapshot = WorkflowSnapshot.new(hostile, hostile, first_task=None, tags=[hostile])
        snapshot.move_to(AtFork(hostile, (hostile, branch)))
        backend.save_snapshot(snapshot)
        assert backend.list_snapshots() == sorted(["bystander", hostile])
        assert backend.list_snapshots(after=hostile) == [
            i for i in sorted(["bystander", hostile]) if i > hostile
        ]
        loaded = backend.load_snapshot(hostile)
        assert (loaded.instance_id, loaded.definition_hash, loaded.tags) == (
            hostile,
            hostile,
            frozenset({hostile}),
        )
        # Tagged with the hostile id: only a worker with that very tag gets its tasks.
        assert task_pairs(backend.find_available_tasks(hostile, 10, tags=["other"])) == [
            ("bystander", "t1")
        ]
        offered = backend.find_available_tasks(hostile, 10, tags=[hostile])
        assert sorted(task_pairs(offered)) == sorted(
            [(hostile, hostile), (hostile, branch), ("bystander", "t1")]
        )
        claim = backend.claim_task(hostile, hostile, hostile, LONG_TTL)
        assert claim is not None
        assert (claim.instance_id, claim.task_id, claim.worker_id) == (hostile, hostile, hostile)
        assert backend.claim_task(hostile, hostile, "rival", LONG_TTL) is None
        backend.extend_task_claim(hostile, hostile, hostile, LONG_TTL, token=claim.token)
        assert backend.save_snapshot_fenced(
            backend.load_snapshot(hostile), hostile, hostile, token=claim.token
        )
        backend.save_task_result(hostile, hostile, hostile.encode())
        backend.release_task_claim(hostile, hostile, hostile, token=claim.token)
        assert backend.load_task_result(hostile, hostile) == hostile.encode()
        [claimed] = backend.claim_available_tasks(hostile, 1, LONG_TTL, tags=[hostile, "x"])
        assert claimed.task.instance_id in (hostile, "bystander")
        backend.send_event(hostile, hostile, hostile.encode())
        assert backend.consume_event(hostile, hostile) == hostile.encode()
        backend.store_signal(hostile, SignalKind.PAUSE, SignalRequest(hostile, hostile))
        request = backend.get_signal(hostile, SignalKind.PAUSE)
        assert request is not None and (request.reason, request.requested_by) == (hostile, hostile)
        assert backend.check_and_pause(hostile)
        assert backend.unpause(hostile).status is WorkflowStatus.IN_PROGRESS
        backend.delete_snapshot(hostile)
        # Nothing was executed as SQL: the bystander and every table are still there.
        assert backend.list_snapshots() == ["bystander"]
        assert backend.load_snapshot("bystander").position == AtTask("t1")
        with pytest.raises(NotFoundError):
            backend.load_snapshot(hostile)

    def test_payload_of_50_mb_is_refused_whole_or_stored_whole(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "existing", AtTask("t1"))
        before = backend.load_snapshot("existing")
        huge = bytes(range(256)) * (50 * 1024 * 1024 // 256)
        if len(huge) <= backend.max_payload_bytes:  # a backend configured for it stores it
            backend.save_task_result("existing", "t1", huge)
            assert backend.load_task_result("existing", "t1") == huge
            return
        big_input = dataclasses.replace(before, initial_input=huge)
        for name, call in (
            ("output", lambda: backend.save_task_result("existing", "t1", huge)),
            ("payload", lambda: backend.send_event("existing", "e", huge)),
            ("initial_input", lambda: backend.save_snapshot(big_input)),
            (
                "completed_tasks",
                lambda: backend.save_snapshot(
                    dataclasses.replace(before, completed_tasks={"t0": huge})
                ),
            ),
        ):
            with pytest.raises(InvalidInputError, match=name):
                call()
        self.assert_untouched(backend, before)

    def test_longest_ttl_is_kept_and_a_longer_one_refused(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        longest = timedelta(days=365 * 100)
        claim = backend.claim_task("wf", "t1", WORKER, longest)
        assert claim is not None and claim.expires_at is not None
        self.assert_now(clock, claim.expires_at - longest)
        with pytest.raises(InvalidInputError, match="ttl"):
            backend.extend_task_claim("wf", "t1", WORKER, longest + timedelta(microseconds=1))
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None

    # ========================================================================================
    # Concurrency (real threads; sizes scaled by ``concurrency_scale``)

    def test_concurrent_claim_task_exactly_one_winner_per_task(
        self, backend: PersistentBackend
    ) -> None:
        threads, tasks = self.scaled(32), self.scaled(50)
        instance_ids = [f"wf-{index:04d}" for index in range(tasks)]
        for instance_id in instance_ids:
            save_new(backend, instance_id)

        def race(index: int) -> list[str]:
            order = instance_ids[:]
            random.Random(index).shuffle(order)
            return [i for i in order if backend.claim_task(i, "t1", f"w{index}", LONG_TTL)]

        won = Counter(i for wins in run_in_threads(threads, race) for i in wins)
        assert won == Counter(instance_ids)

    def test_concurrent_claim_available_tasks_hands_out_each_task_once(
        self, backend: PersistentBackend
    ) -> None:
        threads = self.scaled(16)
        expected: list[tuple[str, str]] = []
        for index in range(self.scaled(1000)):
            save_new(backend, f"single-{index:05d}")
            expected.append((f"single-{index:05d}", "t1"))
        branches = tuple(f"b{branch}" for branch in range(10))
        for index in range(self.scaled(100)):
            save_at(backend, f"fork-{index:05d}", AtFork("f", branches))
            expected.extend((f"fork-{index:05d}", branch) for branch in branches)

        def drain(index: int) -> list[tuple[str, str]]:
            rng, worker_id, got = random.Random(index), f"w{index}", []
            while True:
                claimed = backend.claim_available_tasks(worker_id, rng.randint(1, 10), LONG_TTL)
                for item in claimed:
                    assert item.claim.worker_id == worker_id
                    assert (item.claim.instance_id, item.claim.task_id) == (
                        item.task.instance_id,
                        item.task.task_id,
                    )
                got.extend(task_pairs(item.task for item in claimed))
                if not claimed and not backend.find_available_tasks(worker_id, 1):
                    return got

        handed_out = Counter(pair for got in run_in_threads(threads, drain) for pair in got)
        assert handed_out == Counter(expected)

    def test_concurrent_save_task_result_keeps_every_branch(
        self, backend: PersistentBackend
    ) -> None:
        branches = [f"b{index:02d}" for index in range(self.scaled(16))]
        save_at(backend, "wf", AtFork("f", tuple(branches)))
        versions = run_in_threads(
            len(branches),
            lambda index: backend.save_task_result("wf", branches[index], branches[index].encode()),
        )
        assert sorted(versions) == list(range(2, len(branches) + 2))
        loaded = backend.load_snapshot("wf")
        assert loaded.completed_tasks == {branch: branch.encode() for branch in branches}
        assert loaded.version == len(branches) + 1
        assert loaded.runnable_task_ids() == ()

    def test_concurrent_save_snapshot_with_expected_version_one_winner(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        threads = self.scaled(16)

        def save(index: int) -> bool:
            snapshot = make_snapshot("wf", first_task=f"t-{index}")
            try:
                backend.save_snapshot(snapshot, expected_version=1)
            except ConflictError:
                return False
            return True

        results = run_in_threads(threads, save)
        assert results.count(True) == 1
        winner = results.index(True)
        loaded = backend.load_snapshot("wf")
        assert (loaded.version, loaded.position) == (2, AtTask(f"t-{winner}"))

    def test_concurrent_consume_event_each_event_exactly_once(
        self, backend: PersistentBackend
    ) -> None:
        events = self.scaled(500)
        save_new(backend, "wf")
        for index in range(events):
            backend.send_event("wf", "ev", b"%d" % index)

        def consume(index: int) -> list[int]:
            got = []
            while (payload := backend.consume_event("wf", "ev")) is not None:
                got.append(int(payload))
            return got

        per_thread = run_in_threads(self.scaled(16), consume)
        for got in per_thread:
            assert got == sorted(got)  # FIFO: each consumer sees increasing positions
        assert sorted(i for got in per_thread for i in got) == list(range(events))
