"""The contract's snapshot tests: ``save_snapshot``, ``save_task_result``, loads, deletes,
lists, ``list_stalled_forks`` and the fenced save."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ...backend import PersistentBackend
from ...errors import (
    ConflictError,
    IdempotencyConflictError,
    InvalidInputError,
    NotFoundError,
    WorkflowTerminalError,
)
from ...model import (
    AtDelay,
    AtFork,
    AtSignal,
    AtTask,
    NotStarted,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowStatus,
)
from ..builders import (
    AWKWARD_IDS,
    FINISHED,
    LONG_TTL,
    NOT_IN_PROGRESS,
    OTHER,
    T0,
    TERMINAL,
    WORKER,
    apply_signal,
    assert_same_state,
    assert_utc,
    make_request,
    make_snapshot,
    run_in_threads,
    save_at,
    save_new,
    save_with_status,
    task_pairs,
)
from ..cases import FENCE_FAILURES, FenceScenario
from ..clocks import ContractClock
from .base import ContractBase


class SnapshotContract(ContractBase):
    """Snapshots: save, fenced save, task results, load, delete, list, stalled forks.

    Checks docs/contract.md, section "Snapshots" (``#snapshots``).
    """

    # -- save_snapshot ----------------------------------------------------------------------

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

    # -- save_snapshot(..., write_id=...): once per id ---------------------------------------

    def test_save_snapshot_write_id_repeat_returns_the_first_version_and_writes_nothing(
        self, backend: PersistentBackend
    ) -> None:
        created = make_snapshot("wf")
        assert backend.save_snapshot(created, expected_version=0, write_id="w0") == 1
        moved = backend.load_snapshot("wf")
        moved.mark_task_completed("t1", b"one")
        moved.move_to(AtTask("t2"))
        assert backend.save_snapshot(moved, expected_version=1, write_id="w1") == 2
        stored = backend.load_snapshot("wf")
        moved.version = 0  # a repeat answers with the version the first save got
        assert backend.save_snapshot(moved, expected_version=1, write_id="w1") == 2
        assert moved.version == 2
        assert backend.load_snapshot("wf") == stored  # not written again (updated_at too)
        # Whatever was written since, the repeat is the first save, answered again.
        assert backend.save_task_result("wf", "side", b"x") == 3
        assert backend.save_snapshot(moved, expected_version=1, write_id="w1") == 2
        assert backend.save_snapshot(created, expected_version=0, write_id="w0") == 1
        assert backend.load_snapshot("wf").version == 3

    def test_save_snapshot_write_id_repeat_after_the_workflow_finished_returns_its_version(
        self, backend: PersistentBackend
    ) -> None:
        snapshot = save_new(backend, "wf")
        snapshot.mark_completed(b"done")
        assert backend.save_snapshot(snapshot, expected_version=1, write_id="finish") == 2
        # Not WorkflowTerminalError: the repeat is the save that finished it.
        assert backend.save_snapshot(snapshot, expected_version=1, write_id="finish") == 2
        with pytest.raises(WorkflowTerminalError):
            backend.save_snapshot(snapshot, expected_version=2, write_id="another")

    def test_save_snapshot_write_id_reused_for_another_snapshot_conflicts(
        self, backend: PersistentBackend
    ) -> None:
        first = save_new(backend, "wf")
        first.move_to(AtTask("t2"))
        backend.save_snapshot(first, write_id="w1")
        before = backend.load_snapshot("wf")
        other = backend.load_snapshot("wf")
        other.move_to(AtTask("t3"))
        with pytest.raises(IdempotencyConflictError, match="w1") as raised:
            backend.save_snapshot(other, write_id="w1")
        assert (raised.value.instance_id, raised.value.key) == ("wf", "w1")
        assert backend.load_snapshot("wf") == before

    def test_save_snapshot_write_id_of_a_refused_save_is_not_recorded(
        self, backend: PersistentBackend
    ) -> None:
        snapshot = save_new(backend, "wf")
        snapshot.move_to(AtTask("t2"))
        with pytest.raises(ConflictError):
            backend.save_snapshot(snapshot, expected_version=7, write_id="w1")
        assert backend.save_snapshot(snapshot, expected_version=1, write_id="w1") == 2

    def test_save_snapshot_write_ids_are_per_workflow_and_go_with_it(
        self, backend: PersistentBackend
    ) -> None:
        assert backend.save_snapshot(make_snapshot("wf"), write_id="w1") == 1
        assert backend.save_snapshot(make_snapshot("wf-2"), write_id="w1") == 1
        again = backend.load_snapshot("wf")
        again.move_to(AtTask("t2"))
        assert backend.save_snapshot(again, write_id="w2") == 2
        backend.delete_snapshot("wf")
        # A new instance of the id knows none of the old one's write ids.
        assert backend.save_snapshot(again, expected_version=0, write_id="w2") == 1

    @pytest.mark.parametrize("expected_version", [0, 1], ids=["creating", "updating"])
    def test_concurrent_saves_of_one_write_id_write_once(
        self, backend: PersistentBackend, expected_version: int
    ) -> None:
        if expected_version:
            save_new(backend, "wf")
        snapshot = make_snapshot("wf")
        snapshot.move_to(AtTask("t2"))
        versions = run_in_threads(
            self.scaled(16),
            lambda _: backend.save_snapshot(
                snapshot, expected_version=expected_version, write_id="w1"
            ),
        )
        assert set(versions) == {expected_version + 1}
        assert backend.load_snapshot("wf").version == expected_version + 1

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
