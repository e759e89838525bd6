"""The contract's tests of ``start_workflow``: an absent instance stored as given, an existing
one refused, used or replaced as ``if_exists`` says, the old run's claim holders fenced off."""

from __future__ import annotations

import dataclasses

import pytest

from ...backend import PersistentBackend
from ...errors import ClaimLostError, ConflictError, InvalidInputError, NotFoundError
from ...model import (
    AtFork,
    AtTask,
    CompletionOutcome,
    IfExists,
    SignalKind,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
)
from ..builders import (
    HASH,
    LONG_TTL,
    NOT_IN_PROGRESS,
    OTHER,
    WORKER,
    assert_same_state,
    make_request,
    make_snapshot,
    save_at,
    save_new,
    save_with_status,
    task_pairs,
)
from ..clocks import ContractClock
from .base import ContractBase

EVERY_STATUS = [WorkflowStatus.IN_PROGRESS, *NOT_IN_PROGRESS]


class StartContract(ContractBase):
    """``start_workflow``: absent instances stored as given at version 1; existing ones
    refused (``FAIL``), returned (``USE_EXISTING``, same definition only) or replaced whole
    (``TERMINATE_EXISTING``) with the old claims' holders fenced off; new snapshots only.

    Checks docs/contract.md, section "start_workflow" (``#start_workflow``); the races are in
    ``ConcurrencyContract``.
    """

    # -- an absent instance -----------------------------------------------------------------

    @pytest.mark.parametrize("if_exists", list(IfExists))
    def test_start_workflow_stores_an_absent_instance_as_given_at_version_1(
        self, backend: PersistentBackend, clock: ContractClock, if_exists: IfExists
    ) -> None:
        snapshot = make_snapshot("wf", first_task=None, initial_input=b"in", tags=("gpu",))
        snapshot.mark_task_completed("t0", b"out0")
        snapshot.move_to(AtFork("f", ("b1", "b2")))

        started = backend.start_workflow(snapshot, if_exists=if_exists)

        assert started == backend.load_snapshot("wf")
        assert_same_state(started, snapshot)
        assert started.version == 1
        self.assert_now(clock, started.updated_at)
        assert snapshot.version == 0  # the argument is not changed
        assert backend.load_task_result("wf", "t0") == b"out0"
        offered = backend.find_available_tasks(WORKER, 10, tags=["gpu"])
        assert sorted(task_pairs(offered)) == [("wf", "b1"), ("wf", "b2")]
        assert [task.input for task in offered] == [b"out0", b"out0"]

    def test_start_workflow_returns_a_copy(self, backend: PersistentBackend) -> None:
        started = backend.start_workflow(make_snapshot("wf"))
        started.completed_tasks["t1"] = b"changed"
        started.move_to(AtTask("t9"))
        loaded = backend.load_snapshot("wf")
        assert (loaded.position, loaded.completed_tasks) == (AtTask("t1"), {})

    def test_start_workflow_takes_if_exists_by_value(self, backend: PersistentBackend) -> None:
        first = backend.start_workflow(make_snapshot("wf"), if_exists=IfExists("use_existing"))
        again = backend.start_workflow(make_snapshot("wf"), if_exists="use_existing")  # type: ignore[arg-type]
        assert again == first

    def test_a_started_workflow_saves_on_as_any_other(self, backend: PersistentBackend) -> None:
        started = backend.start_workflow(make_snapshot("wf"))
        started.mark_task_completed("t1", b"out")
        started.move_to(AtTask("t2"))
        assert backend.save_snapshot(started, expected_version=1) == 2

    # -- FAIL -------------------------------------------------------------------------------

    def test_start_workflow_fail_refuses_an_existing_instance_and_writes_nothing(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        with pytest.raises(ConflictError, match="existing"):
            backend.start_workflow(make_snapshot("existing", first_task="t9", initial_input=b"x"))
        with pytest.raises(ConflictError, match="existing"):
            backend.start_workflow(make_snapshot("existing"), if_exists=IfExists.FAIL)
        self.assert_untouched(backend, before)

    @pytest.mark.parametrize("status", NOT_IN_PROGRESS)
    def test_start_workflow_fail_refuses_an_existing_instance_whatever_its_status(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        before = backend.load_snapshot("wf")
        with pytest.raises(ConflictError, match="wf"):
            backend.start_workflow(make_snapshot("wf"))
        assert backend.load_snapshot("wf") == before

    # -- USE_EXISTING -----------------------------------------------------------------------

    @pytest.mark.parametrize("status", EVERY_STATUS)
    def test_start_workflow_use_existing_returns_the_stored_instance_unchanged(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        before = backend.load_snapshot("wf")
        ignored = make_snapshot("wf", first_task="t9", initial_input=b"new", tags=("gpu",))
        started = backend.start_workflow(ignored, if_exists=IfExists.USE_EXISTING)
        assert started == before
        assert backend.load_snapshot("wf") == before

    def test_start_workflow_use_existing_leaves_what_is_attached(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("t1", "t2")))
        claim = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert claim is not None
        backend.save_task_result("wf", "t2", b"two")
        backend.store_signal("wf", SignalKind.PAUSE, make_request())
        backend.send_event("wf", "ev", b"payload")

        backend.start_workflow(make_snapshot("wf"), if_exists=IfExists.USE_EXISTING)

        renewed = backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=claim.token)
        assert renewed.token == claim.token
        assert backend.load_task_result("wf", "t2") == b"two"
        assert backend.get_signal("wf", SignalKind.PAUSE) is not None
        assert backend.consume_event("wf", "ev") == b"payload"

    def test_start_workflow_use_existing_refuses_another_definition(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        other = WorkflowSnapshot.new("existing", "other-hash", first_task="t1")
        with pytest.raises(ConflictError, match="existing") as raised:
            backend.start_workflow(other, if_exists=IfExists.USE_EXISTING)
        assert HASH in str(raised.value) and "other-hash" in str(raised.value)
        self.assert_untouched(backend, before)

    # -- TERMINATE_EXISTING -----------------------------------------------------------------

    @pytest.mark.parametrize("status", EVERY_STATUS)
    def test_start_workflow_terminate_existing_replaces_it_whatever_its_status(
        self, backend: PersistentBackend, clock: ContractClock, status: WorkflowStatus
    ) -> None:
        save_with_status(backend, "wf", status)
        snapshot = WorkflowSnapshot.new(
            "wf", "new-hash", initial_input=b"new", first_task="t2", priority=1, tags=["gpu"]
        )

        started = backend.start_workflow(snapshot, if_exists=IfExists.TERMINATE_EXISTING)

        assert started == backend.load_snapshot("wf")
        assert_same_state(started, snapshot)
        assert started.version == 1
        self.assert_now(clock, started.updated_at)
        [task] = backend.find_available_tasks(WORKER, 10, tags=["gpu"])
        assert (task.task_id, task.input, task.definition_hash) == ("t2", b"new", "new-hash")
        assert backend.list_snapshots() == ["wf"]

    def test_start_workflow_terminate_existing_removes_everything_attached(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("t1", "t2")), completed={"t0": b"zero"}, tags=["eu"])
        backend.save_task_result("wf", "t1", b"one")
        backend.store_signal("wf", SignalKind.PAUSE, make_request())
        backend.send_event("wf", "ev", b"old event")
        save_new(backend, "bystander")
        bystander = backend.load_snapshot("bystander")

        backend.start_workflow(make_snapshot("wf"), if_exists=IfExists.TERMINATE_EXISTING)

        loaded = backend.load_snapshot("wf")
        assert (loaded.completed_tasks, loaded.tags, loaded.position) == (
            {},
            frozenset(),
            AtTask("t1"),
        )
        assert backend.load_task_result("wf", "t0") is None
        assert backend.load_task_result("wf", "t1") is None
        for kind in SignalKind:
            assert backend.get_signal("wf", kind) is None
        assert backend.consume_event("wf", "ev") is None
        # No pause pending any more, no tag: an untagged worker gets the new run's task.
        offered = task_pairs(backend.find_available_tasks(WORKER, 10))
        assert sorted(offered) == [("bystander", "t1"), ("wf", "t1")]
        assert backend.load_snapshot("bystander") == bystander

    def test_start_workflow_terminate_existing_fences_off_the_old_claims(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("t1", "t2")))
        first = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert first is not None
        backend.release_task_claim("wf", "t1", WORKER, token=first.token)
        old = backend.claim_task("wf", "t1", WORKER, LONG_TTL)  # token 2 or more
        old_other = backend.claim_task("wf", "t2", OTHER, LONG_TTL)
        assert old is not None and old_other is not None

        backend.start_workflow(
            make_snapshot("wf", first_task=None), if_exists=IfExists.TERMINATE_EXISTING
        )
        replacement = backend.load_snapshot("wf")
        replacement.move_to(AtFork("f", ("t1", "t2")))
        assert backend.save_snapshot(replacement) == 2

        # The old holders have no claim any more.
        with pytest.raises(NotFoundError):
            backend.extend_task_claim("wf", "t2", OTHER, LONG_TTL, token=old_other.token)
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "t1", WORKER, token=old.token)
        assert not backend.save_snapshot_fenced(
            backend.load_snapshot("wf"), "t1", WORKER, token=old.token
        )

        # The same worker claims the new run's task: its token is greater than any old one.
        new = backend.claim_task("wf", "t1", WORKER, LONG_TTL)
        assert new is not None and new.token > old.token
        [other_new] = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert other_new.claim.task_id == "t2" and other_new.claim.token > old_other.token
        # The new run counts its attempts anew (docs/contract.md#attempts-and-deadlines).
        assert (new.attempt, other_new.claim.attempt) == (1, 1)

        # A thread of that worker still holding the old token is refused everywhere.
        assert not backend.save_snapshot_fenced(
            backend.load_snapshot("wf"), "t1", WORKER, token=old.token
        )
        [stale] = backend.complete_tasks(
            [TaskCompletion("wf", "t1", WORKER, old.token, output=b"stale")], ttl=LONG_TTL
        )
        assert stale.outcome is CompletionOutcome.CLAIM_LOST
        # Token 1 of the old run too (were tokens to start again, the new claim's would be 1).
        [stale_first] = backend.complete_tasks(
            [TaskCompletion("wf", "t2", OTHER, old_other.token, output=b"stale")], ttl=LONG_TTL
        )
        assert stale_first.outcome is CompletionOutcome.CLAIM_LOST
        with pytest.raises(ClaimLostError):
            backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL, token=old.token)
        with pytest.raises(ClaimLostError):
            backend.release_task_claim("wf", "t1", WORKER, token=old.token)
        assert backend.load_task_result("wf", "t1") is None

        # The new holder records as usual.
        [done] = backend.complete_tasks(
            [TaskCompletion("wf", "t1", WORKER, new.token, output=b"fresh")], ttl=LONG_TTL
        )
        assert done.outcome is CompletionOutcome.RECORDED
        assert backend.load_task_result("wf", "t1") == b"fresh"

    def test_start_workflow_terminate_existing_after_a_cancel_keeps_tokens_increasing(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        old = backend.claim_task("wf", "t1", WORKER, None)
        assert old is not None
        backend.store_signal("wf", SignalKind.CANCEL, make_request())
        assert backend.check_and_cancel("wf")

        backend.start_workflow(make_snapshot("wf"), if_exists=IfExists.TERMINATE_EXISTING)

        new = backend.claim_task("wf", "t1", WORKER, None)
        assert new is not None and new.token > old.token

    # -- a new snapshot only ----------------------------------------------------------------

    def test_start_workflow_refuses_a_snapshot_that_was_saved(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        for if_exists in IfExists:
            with pytest.raises(InvalidInputError, match=r"snapshot\.version"):
                backend.start_workflow(backend.load_snapshot("existing"), if_exists=if_exists)
        ghost = dataclasses.replace(make_snapshot("ghost"), version=3)
        with pytest.raises(InvalidInputError, match=r"snapshot\.version"):
            backend.start_workflow(ghost)
        self.assert_untouched(backend, before)
        with pytest.raises(NotFoundError):
            backend.load_snapshot("ghost")
