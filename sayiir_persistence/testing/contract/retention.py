"""The contract's retention tests: ``prune_workflows``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ...backend import PersistentBackend
from ...errors import InvalidInputError, NotFoundError
from ...model import AtFork, AtTask, SignalKind, WorkflowStatus
from ...retention import MAX_PRUNE_BATCH
from ..builders import (
    LONG_TTL,
    NAIVE,
    OTHER,
    TERMINAL,
    WORKER,
    make_request,
    make_snapshot,
    run_in_threads,
    save_at,
    save_with_status,
)
from ..clocks import ContractClock
from .base import ContractBase
from .claims import assert_fenced_off

# Long enough for any store clock to tick between two groups of saves (SQLite's counts
# milliseconds).
_TICK = timedelta(milliseconds=20)


def _updated_at(backend: PersistentBackend, instance_id: str) -> datetime:
    return backend.load_snapshot(instance_id).updated_at


def _prune_all(backend: PersistentBackend, **arguments: Any) -> list[int]:
    """Call ``prune_workflows`` until it returns 0; every call's count, the 0 included."""
    counts = [backend.prune_workflows(**arguments)]
    while counts[-1]:
        counts.append(backend.prune_workflows(**arguments))
    return counts


class RetentionContract(ContractBase):
    """Retention: only terminal workflows finished before the cutoff are pruned, in bounded
    batches, with everything attached; concurrent pruners delete each workflow once.

    Checks docs/contract.md, section "Retention" (``#retention``).
    """

    def old_and_new(
        self, backend: PersistentBackend, clock: ContractClock, old: list[str], new: list[str]
    ) -> datetime:
        """Finish ``old`` (statuses in turn), let the store clock tick, finish ``new``; the
        cutoff between them: the ``updated_at`` of the first of ``new``."""
        for index, instance_id in enumerate(old):
            save_with_status(backend, instance_id, TERMINAL[index % len(TERMINAL)])
        clock.advance(_TICK)
        for index, instance_id in enumerate(new):
            save_with_status(backend, instance_id, TERMINAL[index % len(TERMINAL)])
        cutoff = _updated_at(backend, new[0])
        assert max(_updated_at(backend, i) for i in old) < cutoff
        assert min(_updated_at(backend, i) for i in new) >= cutoff
        return cutoff

    # -- what is pruned ---------------------------------------------------------------------

    def test_prune_workflows_deletes_terminal_workflows_finished_before_the_cutoff(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_with_status(backend, "old-in-progress", WorkflowStatus.IN_PROGRESS)
        save_with_status(backend, "old-paused", WorkflowStatus.PAUSED)
        old = ["old-completed", "old-failed", "old-cancelled"]
        new = ["new-completed", "new-failed", "new-cancelled"]
        cutoff = self.old_and_new(backend, clock, old, new)

        assert backend.prune_workflows(finished_before=cutoff) == 3
        assert backend.list_snapshots() == sorted(["old-in-progress", "old-paused", *new])
        for instance_id in old:
            with pytest.raises(NotFoundError):
                backend.load_snapshot(instance_id)
        assert backend.prune_workflows(finished_before=cutoff) == 0

    def test_prune_workflows_never_deletes_in_progress_or_paused_workflows(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_with_status(backend, "running", WorkflowStatus.IN_PROGRESS)
        save_with_status(backend, "paused", WorkflowStatus.PAUSED)
        save_with_status(backend, "done", WorkflowStatus.COMPLETED)
        # A cutoff in the future: every terminal workflow matches, the others never do.
        future = clock.now() + timedelta(days=365)
        assert _prune_all(backend, finished_before=future) == [1, 0]
        assert backend.list_snapshots() == ["paused", "running"]

    def test_prune_workflows_keeps_a_workflow_finished_exactly_at_the_cutoff(
        self, backend: PersistentBackend
    ) -> None:
        save_with_status(backend, "wf", WorkflowStatus.COMPLETED)
        finished = _updated_at(backend, "wf")
        assert backend.prune_workflows(finished_before=finished) == 0  # strictly before
        assert backend.list_snapshots() == ["wf"]
        after = finished + timedelta(microseconds=1)
        assert backend.prune_workflows(finished_before=after) == 1
        assert backend.list_snapshots() == []

    def test_prune_workflows_only_the_statuses_asked_for(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        for status in TERMINAL:
            save_with_status(backend, f"wf-{status.value}", status)
        future = clock.now() + timedelta(days=1)
        assert (
            backend.prune_workflows(finished_before=future, statuses=[WorkflowStatus.FAILED]) == 1
        )
        assert backend.list_snapshots() == ["wf-cancelled", "wf-completed"]
        both = {WorkflowStatus.COMPLETED, WorkflowStatus.CANCELLED}
        assert backend.prune_workflows(finished_before=future, statuses=both) == 2
        assert backend.list_snapshots() == []

    def test_prune_workflows_takes_an_aware_cutoff_in_any_zone(
        self, backend: PersistentBackend
    ) -> None:
        save_with_status(backend, "wf", WorkflowStatus.COMPLETED)
        after = _updated_at(backend, "wf") + timedelta(microseconds=1)
        elsewhere = after.astimezone(timezone(timedelta(hours=5, minutes=30)))
        assert backend.prune_workflows(finished_before=elsewhere) == 1

    # -- batches ----------------------------------------------------------------------------

    def test_prune_workflows_deletes_at_most_batch_size_per_call(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        old = [f"old-{index}" for index in range(7)]
        cutoff = self.old_and_new(backend, clock, old, ["new"])
        remaining = []
        counts = []
        while count := backend.prune_workflows(finished_before=cutoff, batch_size=3):
            counts.append(count)
            remaining.append(len(backend.list_snapshots()))
        assert counts == [3, 3, 1]
        assert remaining == [5, 2, 1]
        assert backend.list_snapshots() == ["new"]

    def test_prune_workflows_removes_everything_attached_so_the_id_starts_afresh(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        held = backend.claim_task("wf", "b", WORKER, LONG_TTL)  # still live when it finishes
        assert held is not None
        released = backend.claim_task("wf", "a", OTHER, LONG_TTL)
        assert released is not None
        backend.save_task_result("wf", "a", b"A")
        backend.release_task_claim("wf", "a", OTHER)
        backend.store_signal("wf", SignalKind.PAUSE, make_request())  # pending, never applied
        snapshot = backend.load_snapshot("wf")
        snapshot.mark_completed(b"done")
        backend.save_snapshot(snapshot)
        backend.send_event("wf", "ev", b"buffered")  # a finished workflow buffers events
        clock.advance(_TICK)
        save_with_status(backend, "bystander", WorkflowStatus.COMPLETED)
        cutoff = _updated_at(backend, "bystander")

        assert backend.prune_workflows(finished_before=cutoff) == 1
        assert backend.list_snapshots() == ["bystander"]
        with pytest.raises(NotFoundError):
            backend.extend_task_claim("wf", "b", WORKER, LONG_TTL, token=held.token)
        # The same id created again starts from nothing.
        assert backend.save_snapshot(make_snapshot("wf", first_task="b"), expected_version=0) == 1
        assert backend.load_snapshot("wf").completed_tasks == {}
        assert backend.load_task_result("wf", "a") is None
        assert backend.get_signal("wf", SignalKind.PAUSE) is None
        assert backend.consume_event("wf", "ev") is None
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "b", WORKER)
        assert backend.claim_task("wf", "b", OTHER, LONG_TTL) is not None
        assert backend.load_task_result("bystander", "t1") is None  # untouched, still there
        assert backend.load_snapshot("bystander").status is WorkflowStatus.COMPLETED

    def test_a_pruned_id_created_again_goes_on_from_its_tokens(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        held = backend.claim_task("wf", "b", WORKER, LONG_TTL)  # still live when it finishes
        first = backend.claim_task("wf", "a", OTHER, LONG_TTL)
        assert held is not None and first is not None
        backend.release_task_claim("wf", "a", OTHER, token=first.token)
        again = backend.claim_task("wf", "a", OTHER, LONG_TTL)
        assert again is not None
        snapshot = backend.load_snapshot("wf")
        snapshot.mark_failed("boom")
        backend.save_snapshot(snapshot)
        clock.advance(_TICK)
        save_with_status(backend, "bystander", WorkflowStatus.COMPLETED)
        assert backend.prune_workflows(finished_before=_updated_at(backend, "bystander")) == 1

        save_at(backend, "wf", AtFork("f", ("a", "b")))
        new_b = backend.claim_task("wf", "b", WORKER, LONG_TTL)
        assert new_b is not None and new_b.token > held.token and new_b.attempt == 1
        [new_a] = backend.claim_available_tasks(OTHER, 10, LONG_TTL)
        assert new_a.claim.task_id == "a"
        assert new_a.claim.token > again.token and new_a.claim.attempt == 1
        assert_fenced_off(backend, held)
        assert_fenced_off(backend, again)
        # Pruned again (no claim since): the tokens still go on.
        snapshot = backend.load_snapshot("wf")
        snapshot.move_to(AtTask("c"))
        snapshot.mark_completed(b"done")
        backend.save_snapshot(snapshot)
        clock.advance(_TICK)
        save_with_status(backend, "later", WorkflowStatus.COMPLETED)
        assert backend.prune_workflows(finished_before=_updated_at(backend, "later")) == 2
        save_at(backend, "wf", AtTask("b"))
        last = backend.claim_task("wf", "b", WORKER, LONG_TTL)
        assert last is not None and last.token > new_b.token and last.attempt == 1

    # -- concurrency ------------------------------------------------------------------------

    def test_concurrent_prunes_delete_each_workflow_once(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        workflows = self.scaled(120)
        old = [f"old-{index:04d}" for index in range(workflows)]
        cutoff = self.old_and_new(backend, clock, old, ["new-1", "new-2"])
        left_when_done: list[list[str]] = []

        def prune(index: int) -> list[int]:
            counts = _prune_all(backend, finished_before=cutoff, batch_size=7)
            # This caller got 0: nothing was left to prune when it looked, nor is now.
            left_when_done.append([i for i in backend.list_snapshots() if i.startswith("old")])
            return counts

        per_thread = run_in_threads(self.scaled(4), prune)
        assert sum(sum(counts) for counts in per_thread) == workflows
        for counts in per_thread:
            assert counts[-1] == 0
            assert all(0 < count <= 7 for count in counts[:-1])
        assert left_when_done == [[]] * len(per_thread)
        assert backend.list_snapshots() == ["new-1", "new-2"]

    # -- validation -------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("arguments", "message"),
        [
            pytest.param({"finished_before": NAIVE}, "finished_before", id="naive"),
            pytest.param({"finished_before": "2030-01-01"}, "finished_before", id="text"),
            pytest.param({"statuses": [WorkflowStatus.IN_PROGRESS]}, "in_progress", id="running"),
            pytest.param(
                {"statuses": [WorkflowStatus.COMPLETED, WorkflowStatus.PAUSED]},
                "paused",
                id="paused",
            ),
            pytest.param({"statuses": []}, "statuses", id="no-status"),
            pytest.param({"statuses": WorkflowStatus.COMPLETED}, "statuses", id="bare-status"),
            pytest.param({"statuses": ["bogus"]}, "statuses", id="unknown-status"),
            pytest.param({"batch_size": 0}, "batch_size", id="batch-0"),
            pytest.param({"batch_size": True}, "batch_size", id="batch-bool"),
            pytest.param({"batch_size": MAX_PRUNE_BATCH + 1}, "batch_size", id="batch-too-big"),
        ],
    )
    def test_prune_workflows_invalid_argument_refused_and_nothing_deleted(
        self,
        backend: PersistentBackend,
        clock: ContractClock,
        arguments: dict[str, Any],
        message: str,
    ) -> None:
        save_with_status(backend, "done", WorkflowStatus.COMPLETED)
        future = clock.now() + timedelta(days=1)
        with pytest.raises(InvalidInputError, match=message):
            backend.prune_workflows(**{"finished_before": future, **arguments})
        assert backend.list_snapshots() == ["done"]
        assert backend.prune_workflows(finished_before=future, batch_size=MAX_PRUNE_BATCH) == 1
