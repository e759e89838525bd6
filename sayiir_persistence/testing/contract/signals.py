"""The contract's tests of signals (cancel, pause, unpause) and events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ...backend import PersistentBackend
from ...errors import (
    CannotCancelError,
    CannotPauseError,
    ConflictError,
    IdempotencyConflictError,
    InvalidInputError,
    NotFoundError,
)
from ...model import (
    AtFork,
    AtSignal,
    AtTask,
    IfExists,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowStatus,
)
from ..builders import (
    FINISHED,
    LONG_TTL,
    NAIVE,
    OTHER,
    T0,
    TERMINAL,
    WORKER,
    apply_signal,
    assert_utc,
    make_request,
    make_snapshot,
    run_in_threads,
    save_at,
    save_new,
    save_with_status,
    task_pairs,
)
from ..cases import InvalidCall
from .base import ContractBase


class SignalEventContract(ContractBase):
    """Signals and events: store, apply and clear cancel/pause requests; unpause; send and
    consume events, and the events that wake a workflow at ``AtSignal``; keyed sends and
    consumes (repeats, conflicts, lifetime, and concurrent callers of one key).

    Checks docs/contract.md, section "Signals and events" (``#signals-and-events``), and
    section "Timers and parked workflows" (``#timers-and-parked-workflows``) for ``send_event``.
    """

    # -- store_signal, get_signal, clear_signal ---------------------------------------------

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
            pytest.param(
                lambda b: b.send_event("ghost", "ev", b"x", idempotency_key="k"),
                id="send_event-keyed",
            ),
            pytest.param(
                lambda b: b.consume_event("ghost", "ev", consumer_key="k"),
                id="consume_event-keyed",
            ),
        ],
    )
    def test_signal_and_event_calls_on_absent_instance_not_found(
        self, backend: PersistentBackend, call: InvalidCall
    ) -> None:
        save_new(backend, "other")
        with pytest.raises(NotFoundError):
            call(backend)
        assert backend.list_snapshots() == ["other"]

    # -- send_event, consume_event ----------------------------------------------------------

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

    # -- keyed sends: send_event(..., idempotency_key=...) ----------------------------------

    def test_send_event_keyed_repeat_of_a_buffered_event_is_a_noop(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        backend.send_event("wf", "ev", b"once", idempotency_key="k1")
        before = backend.load_snapshot("wf")
        backend.send_event("wf", "ev", b"once", idempotency_key="k1")
        assert backend.load_snapshot("wf") == before
        assert backend.consume_event("wf", "ev") == b"once"
        assert backend.consume_event("wf", "ev") is None  # buffered once, not twice
        backend.send_event("wf", "ev", b"once", idempotency_key="k1")  # consumed since: still
        assert backend.consume_event("wf", "ev") is None  # nothing sent again

    def test_send_event_keyed_repeat_of_a_delivered_event_is_a_noop(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtSignal("s1", "approved", None, "t2"))
        backend.send_event("wf", "approved", b"yes", idempotency_key="k1")
        delivered = backend.load_snapshot("wf")
        assert (delivered.position, delivered.version) == (AtTask("t2"), 2)
        backend.send_event("wf", "approved", b"yes", idempotency_key="k1")
        assert backend.load_snapshot("wf") == delivered
        assert backend.consume_event("wf", "approved") is None  # nor buffered
        # Even once the workflow waits for that event name again, at another signal: the
        # repeat is the first send, which was delivered, not a new event.
        delivered.mark_task_completed("t2", b"two")
        delivered.move_to(AtSignal("s2", "approved", None, "t3"))
        backend.save_snapshot(delivered)
        backend.send_event("wf", "approved", b"yes", idempotency_key="k1")
        assert backend.load_snapshot("wf").position == AtSignal("s2", "approved", None, "t3")
        assert backend.load_task_result("wf", "s2") is None
        assert backend.consume_event("wf", "approved") is None

    @pytest.mark.parametrize(
        ("name", "payload"),
        [
            pytest.param("other", b"first", id="other-name"),
            pytest.param("ev", b"second", id="other-payload"),
            pytest.param("ev", b"", id="empty-payload"),
        ],
    )
    def test_send_event_keyed_repeat_with_other_arguments_conflicts(
        self, backend: PersistentBackend, name: str, payload: bytes
    ) -> None:
        save_new(backend, "wf")
        backend.send_event("wf", "ev", b"first", idempotency_key="k1")
        before = backend.load_snapshot("wf")
        with pytest.raises(IdempotencyConflictError, match="k1") as raised:
            backend.send_event("wf", name, payload, idempotency_key="k1")
        assert isinstance(raised.value, ConflictError)
        assert (raised.value.instance_id, raised.value.key) == ("wf", "k1")
        assert backend.load_snapshot("wf") == before
        assert backend.consume_event("wf", "other") is None
        assert backend.consume_event("wf", "ev") == b"first"
        assert backend.consume_event("wf", "ev") is None

    def test_send_event_keys_are_per_workflow_and_per_key(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        save_new(backend, "wf-2")
        backend.send_event("wf", "ev", b"a", idempotency_key="k1")
        backend.send_event("wf-2", "ev", b"a", idempotency_key="k1")  # another workflow's key
        backend.send_event("wf", "ev", b"a", idempotency_key="k2")  # another key
        backend.send_event("wf", "ev", b"a")  # no key: always sent
        assert [backend.consume_event("wf", "ev") for _ in range(4)] == [b"a", b"a", b"a", None]
        assert backend.consume_event("wf-2", "ev") == b"a"

    # -- keyed consumes: consume_event(..., consumer_key=...) -------------------------------

    def test_consume_event_keyed_repeat_returns_the_same_event(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        for payload in (b"1", b"2", b"3"):
            backend.send_event("wf", "ev", payload)
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"1"
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"1"  # not b"2"
        assert backend.consume_event("wf", "ev", consumer_key="c2") == b"2"
        assert backend.consume_event("wf", "ev") == b"3"
        assert backend.consume_event("wf", "ev") is None
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"1"  # still answers

    def test_consume_event_keyed_finding_nothing_records_nothing(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        assert backend.consume_event("wf", "ev", consumer_key="c1") is None
        backend.send_event("wf", "ev", b"later")
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"later"
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"later"

    def test_consume_event_keyed_repeat_with_other_name_conflicts(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        backend.send_event("wf", "ev", b"1")
        backend.send_event("wf", "other", b"x")
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"1"
        with pytest.raises(IdempotencyConflictError, match="c1") as raised:
            backend.consume_event("wf", "other", consumer_key="c1")
        assert (raised.value.instance_id, raised.value.key) == ("wf", "c1")
        assert backend.consume_event("wf", "other") == b"x"  # not taken

    def test_consumer_keys_are_per_workflow(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        save_new(backend, "wf-2")
        backend.send_event("wf", "ev", b"mine")
        backend.send_event("wf-2", "ev", b"theirs")
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"mine"
        assert backend.consume_event("wf-2", "ev", consumer_key="c1") == b"theirs"

    # -- how long keys live: as long as the workflow ----------------------------------------

    @pytest.mark.parametrize("removal", ["delete_snapshot", "prune_workflows", "terminate"])
    def test_event_keys_go_with_the_workflow(
        self, backend: PersistentBackend, removal: str
    ) -> None:
        save_with_status(backend, "wf", WorkflowStatus.COMPLETED)
        backend.send_event("wf", "ev", b"old", idempotency_key="k1")
        backend.send_event("wf", "ev", b"old-2")
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"old"
        removals: dict[str, Callable[[], object]] = {
            "delete_snapshot": lambda: backend.delete_snapshot("wf"),
            "prune_workflows": lambda: backend.prune_workflows(
                finished_before=datetime(2999, 1, 1, tzinfo=UTC)
            ),
            "terminate": lambda: backend.start_workflow(
                make_snapshot("wf"), if_exists=IfExists.TERMINATE_EXISTING
            ),
        }
        removals[removal]()
        if removal != "terminate":
            save_new(backend, "wf")
        # The new run knows neither key: the same key and payload are a new event.
        backend.send_event("wf", "ev", b"new", idempotency_key="k1")
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"new"
        assert backend.consume_event("wf", "ev") is None

    def test_event_keys_kept_by_retry_workflow(self, backend: PersistentBackend) -> None:
        save_with_status(backend, "wf", WorkflowStatus.FAILED)
        backend.send_event("wf", "ev", b"1", idempotency_key="k1")
        backend.send_event("wf", "ev", b"2")
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"1"
        backend.retry_workflow("wf")  # the same run goes on: its keys stay
        backend.send_event("wf", "ev", b"1", idempotency_key="k1")
        assert backend.consume_event("wf", "ev", consumer_key="c1") == b"1"
        assert backend.consume_event("wf", "ev") == b"2"
        assert backend.consume_event("wf", "ev") is None

    # -- concurrent callers of one key: once ------------------------------------------------

    @pytest.mark.parametrize("waiting", [False, True], ids=["buffered", "delivered"])
    def test_concurrent_keyed_sends_of_one_key_deliver_once(
        self, backend: PersistentBackend, waiting: bool
    ) -> None:
        if waiting:
            save_at(backend, "wf", AtSignal("s1", "ev", None, "t2"))
        else:
            save_new(backend, "wf")
        run_in_threads(
            self.scaled(16),
            lambda _: backend.send_event("wf", "ev", b"once", idempotency_key="k1"),
        )
        loaded = backend.load_snapshot("wf")
        if waiting:
            assert (loaded.position, loaded.version) == (AtTask("t2"), 2)
            assert backend.consume_event("wf", "ev") is None
        else:
            assert loaded.version == 1
            assert backend.consume_event("wf", "ev") == b"once"
            assert backend.consume_event("wf", "ev") is None

    def test_concurrent_keyed_consumes_of_one_key_take_one_event(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        for payload in (b"1", b"2", b"3"):
            backend.send_event("wf", "ev", payload)
        got = run_in_threads(
            self.scaled(16), lambda _: backend.consume_event("wf", "ev", consumer_key="c1")
        )
        assert set(got) == {b"1"}
        assert [backend.consume_event("wf", "ev") for _ in range(3)] == [b"2", b"3", None]
