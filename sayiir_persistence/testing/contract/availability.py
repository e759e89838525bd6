"""The contract's tests of ``find_available_tasks`` and ``claim_available_tasks``: which
tasks are offered, in which order (priority, aging, ties), to which worker (tags)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ...backend import PersistentBackend
from ...model import AtDelay, AtFork, AtSignal, AtTask, AvailableTask, SignalKind
from ..builders import (
    HASH,
    LONG_TTL,
    NOT_IN_PROGRESS,
    OFFER_METHODS,
    OTHER,
    WORKER,
    make_request,
    offered_tasks,
    save_at,
    save_new,
    save_with_status,
    task_pairs,
)
from ..clocks import ContractClock
from .base import ContractBase


class AvailabilityContract(ContractBase):
    """Available tasks: selection, tags, priority and aging order, limits, claiming in bulk.

    Checks docs/contract.md, section "Available tasks" (``#available-tasks``), and section
    "Timers and parked workflows" (``#timers-and-parked-workflows``) for the available tasks.
    """

    # -- selection (find_available_tasks and claim_available_tasks alike) -------------------

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
