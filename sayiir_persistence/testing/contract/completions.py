"""The contract's completion tests: ``complete_tasks``."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from ...backend import PersistentBackend
from ...errors import InvalidInputError, NotFoundError
from ...model import (
    AtDelay,
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
)
from ..clocks import ContractClock
from .base import ContractBase


def chain(*task_ids: str) -> Any:
    """An advance function: ``task_ids`` in order, then complete with the last output."""

    def advance(snapshot: WorkflowSnapshot) -> None:
        position = snapshot.position
        assert isinstance(position, AtTask)
        index = task_ids.index(position.task_id)
        if index + 1 < len(task_ids):
            snapshot.move_to(AtTask(task_ids[index + 1]))
        else:
            snapshot.mark_completed(snapshot.completed_tasks[position.task_id])

    return advance


def join_then(next_task: str) -> Any:
    """An advance function for a fork: once every branch is completed, move to
    ``next_task``; before that, do nothing."""

    def advance(snapshot: WorkflowSnapshot) -> None:
        position = snapshot.position
        if isinstance(position, AtFork) and all(
            branch in snapshot.completed_tasks for branch in position.branch_task_ids
        ):
            snapshot.move_to(AtTask(next_task))

    return advance


def done(claim: TaskClaim, output: bytes = b"out", **changes: Any) -> TaskCompletion:
    """The completion of ``claim`` with ``output``."""
    return TaskCompletion(
        claim.instance_id, claim.task_id, claim.worker_id, claim.token, output=output, **changes
    )


class CompletionContract(ContractBase):
    """Completions: fenced, advanced and released in one step, many per call, next tasks.

    Checks docs/contract.md, section "Completions" (``#completions``).
    """

    def claim(self, backend: PersistentBackend, instance_id: str, task_id: str = "t1") -> TaskClaim:
        claim = backend.claim_task(instance_id, task_id, WORKER, LONG_TTL)
        assert claim is not None
        return claim

    # -- recorded ---------------------------------------------------------------------------

    def test_complete_tasks_records_result_advances_and_releases(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf", initial_input=b"in")
        claim = self.claim(backend, "wf")
        [result] = backend.complete_tasks(
            [done(claim, b"r1", advance=chain("t1", "t2"))], ttl=LONG_TTL
        )
        assert result.outcome is CompletionOutcome.RECORDED
        assert result.version == 2
        assert result.next_tasks == ()
        stored = backend.load_snapshot("wf")
        assert stored.version == 2
        assert stored.completed_tasks == {"t1": b"r1"}
        assert stored.last_completed_task_id == "t1"
        assert stored.position == AtTask("t2")
        assert backend.load_task_result("wf", "t1") == b"r1"
        with pytest.raises(NotFoundError):  # released
            backend.release_task_claim("wf", "t1", WORKER)
        [available] = backend.find_available_tasks(OTHER, 10)
        assert (available.task_id, available.input) == ("t2", b"r1")

    def test_complete_tasks_last_task_completes_the_workflow(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        [result] = backend.complete_tasks([done(claim, b"end", advance=chain("t1"))], ttl=None)
        assert result.outcome is CompletionOutcome.RECORDED
        stored = backend.load_snapshot("wf")
        assert (stored.status, stored.output) == (WorkflowStatus.COMPLETED, b"end")
        assert backend.find_available_tasks(OTHER, 10) == []

    def test_complete_tasks_without_advance_keeps_the_position(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        claim = self.claim(backend, "wf", "a")
        [result] = backend.complete_tasks([done(claim, b"A")], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.RECORDED
        stored = backend.load_snapshot("wf")
        assert stored.position == AtFork("f", ("a", "b"))
        assert stored.completed_tasks == {"a": b"A"}
        assert [t.task_id for t in backend.find_available_tasks(OTHER, 10)] == ["b"]

    def test_complete_tasks_with_error_fails_the_workflow(self, backend: PersistentBackend) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        called: list[str] = []
        completion = TaskCompletion(
            "wf", "t1", WORKER, claim.token, error="it broke", advance=lambda s: called.append("x")
        )
        [result] = backend.complete_tasks([completion], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.RECORDED
        stored = backend.load_snapshot("wf")
        assert (stored.status, stored.error, stored.completed_tasks) == (
            WorkflowStatus.FAILED,
            "it broke",
            {},
        )
        assert called == []  # advance is not called for a failure
        with pytest.raises(NotFoundError):
            backend.release_task_claim("wf", "t1", WORKER)

    def test_complete_tasks_keeps_results_stored_meanwhile(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        claim = self.claim(backend, "wf", "a")
        backend.save_task_result("wf", "b", b"B")  # the other branch, recorded meanwhile
        [result] = backend.complete_tasks([done(claim, b"A", advance=join_then("c"))], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.RECORDED
        stored = backend.load_snapshot("wf")
        assert stored.completed_tasks == {"a": b"A", "b": b"B"}
        assert stored.position == AtTask("c")  # the advance saw both branches

    # -- refused ------------------------------------------------------------------------------

    def test_complete_tasks_absent_instance_not_found(self, backend: PersistentBackend) -> None:
        completion = TaskCompletion("ghost", "t1", WORKER, 1, output=b"x")
        [result] = backend.complete_tasks([completion], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.NOT_FOUND
        assert backend.list_snapshots() == []

    @pytest.mark.parametrize("case", ["never-claimed", "other-worker", "wrong-token", "released"])
    def test_complete_tasks_without_the_claim_writes_nothing(
        self, backend: PersistentBackend, case: str
    ) -> None:
        before = save_new(backend, "wf")
        token = 1
        worker = WORKER
        if case != "never-claimed":
            token = self.claim(backend, "wf").token
        if case == "other-worker":
            worker = OTHER
        elif case == "wrong-token":
            token += 1
        elif case == "released":
            backend.release_task_claim("wf", "t1", WORKER)
        completion = TaskCompletion("wf", "t1", worker, token, output=b"x", advance=chain("t1"))
        [result] = backend.complete_tasks([completion], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.CLAIM_LOST
        stored = backend.load_snapshot("wf")
        assert (stored.version, stored.completed_tasks, stored.position) == (
            1,
            {},
            before.position,
        )

    def test_complete_tasks_own_expired_claim_is_lost(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        claim = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert claim is not None
        self.wait_past_short_ttl(clock)
        [result] = backend.complete_tasks([done(claim)], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.CLAIM_LOST
        assert backend.load_snapshot("wf").completed_tasks == {}

    def test_complete_tasks_after_takeover_is_lost_and_the_new_holder_records(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        stale = backend.claim_task("wf", "t1", WORKER, self.short_ttl)
        assert stale is not None
        self.wait_past_short_ttl(clock)
        fresh = backend.claim_task("wf", "t1", OTHER, LONG_TTL)
        assert fresh is not None and fresh.token > stale.token
        [lost, recorded] = backend.complete_tasks(
            [done(stale, b"stale"), done(fresh, b"fresh")], ttl=LONG_TTL
        )
        assert (lost.outcome, recorded.outcome) == (
            CompletionOutcome.CLAIM_LOST,
            CompletionOutcome.RECORDED,
        )
        assert backend.load_snapshot("wf").completed_tasks == {"t1": b"fresh"}

    @pytest.mark.parametrize(
        "status", [WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.PAUSED]
    )
    def test_complete_tasks_on_a_workflow_not_in_progress_writes_nothing(
        self, backend: PersistentBackend, status: WorkflowStatus
    ) -> None:
        snapshot = save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        if status is WorkflowStatus.COMPLETED:
            snapshot.mark_completed(b"elsewhere")
        elif status is WorkflowStatus.FAILED:
            snapshot.mark_failed("elsewhere")
        else:
            snapshot.status = WorkflowStatus.PAUSED
        backend.save_snapshot(snapshot)  # the claim stays live
        [result] = backend.complete_tasks([done(claim, advance=chain("t1"))], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.NOT_IN_PROGRESS
        stored = backend.load_snapshot("wf")
        assert (stored.status, stored.completed_tasks, stored.version) == (status, {}, 2)

    @pytest.mark.parametrize("kind", list(SignalKind))
    def test_complete_tasks_after_cancel_or_pause_is_lost(
        self, backend: PersistentBackend, kind: SignalKind
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        backend.store_signal("wf", kind, make_request())
        apply = backend.check_and_cancel if kind is SignalKind.CANCEL else backend.check_and_pause
        assert apply("wf")
        [result] = backend.complete_tasks([done(claim)], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.CLAIM_LOST
        assert backend.load_snapshot("wf").completed_tasks == {}

    @pytest.mark.parametrize("case", ["result-saved", "moved-on"])
    def test_complete_tasks_for_a_task_no_longer_runnable_writes_nothing(
        self, backend: PersistentBackend, case: str
    ) -> None:
        snapshot = save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        if case == "result-saved":
            backend.save_task_result("wf", "t1", b"first")
        else:
            snapshot.move_to(AtTask("t9"))
            backend.save_snapshot(snapshot)
        before = backend.load_snapshot("wf")
        [result] = backend.complete_tasks([done(claim, b"second")], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.NOT_RUNNABLE
        assert backend.load_snapshot("wf") == before

    def test_complete_tasks_advance_that_raises_writes_nothing(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")

        def broken(snapshot: WorkflowSnapshot) -> None:
            snapshot.move_to(AtTask("t2"))
            raise RuntimeError("advance bug")

        [result] = backend.complete_tasks([done(claim, advance=broken)], ttl=LONG_TTL)
        assert result.outcome is CompletionOutcome.ADVANCE_FAILED
        assert result.error is not None and "advance bug" in result.error
        stored = backend.load_snapshot("wf")
        assert (stored.version, stored.completed_tasks, stored.position) == (1, {}, AtTask("t1"))
        # The claim is still held: the worker may record a failure instead.
        [failed] = backend.complete_tasks(
            [TaskCompletion("wf", "t1", WORKER, claim.token, error="advance bug")], ttl=LONG_TTL
        )
        assert failed.outcome is CompletionOutcome.RECORDED
        assert backend.load_snapshot("wf").status is WorkflowStatus.FAILED

    def test_complete_tasks_advance_leaving_an_oversized_output_writes_nothing(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        huge = bytes(backend.max_payload_bytes + 1)
        [result] = backend.complete_tasks(
            [done(claim, advance=lambda s: s.mark_completed(huge))], ttl=LONG_TTL
        )
        assert result.outcome is CompletionOutcome.ADVANCE_FAILED
        assert result.error is not None and "max_payload_bytes" in result.error
        assert backend.load_snapshot("wf").version == 1

    # -- batches ------------------------------------------------------------------------------

    def test_complete_tasks_decides_each_completion_on_its_own_in_order(
        self, backend: PersistentBackend
    ) -> None:
        for instance_id in ("a", "b", "c"):
            save_new(backend, instance_id)
        claim_a, claim_c = self.claim(backend, "a"), self.claim(backend, "c")
        completions = [
            done(claim_c, b"C", advance=chain("t1")),
            TaskCompletion("b", "t1", WORKER, 1, output=b"B"),  # never claimed
            TaskCompletion("zz", "t1", WORKER, 1, output=b"Z"),  # absent
            done(claim_a, b"A", advance=chain("t1", "t2")),
            done(claim_a, b"again"),  # the same claim twice: released by the first
        ]
        results = backend.complete_tasks(completions, ttl=LONG_TTL)
        assert [r.outcome for r in results] == [
            CompletionOutcome.RECORDED,
            CompletionOutcome.CLAIM_LOST,
            CompletionOutcome.NOT_FOUND,
            CompletionOutcome.RECORDED,
            CompletionOutcome.CLAIM_LOST,
        ]
        assert backend.load_snapshot("c").status is WorkflowStatus.COMPLETED
        assert backend.load_snapshot("b").completed_tasks == {}
        stored_a = backend.load_snapshot("a")
        assert (stored_a.completed_tasks, stored_a.position) == ({"t1": b"A"}, AtTask("t2"))

    def test_complete_tasks_both_fork_branches_in_one_call_move_past_the_join(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        claims = [self.claim(backend, "wf", branch) for branch in ("a", "b")]
        results = backend.complete_tasks(
            [done(c, c.task_id.encode(), advance=join_then("c")) for c in claims], ttl=LONG_TTL
        )
        assert [r.version for r in results] == [2, 3]
        stored = backend.load_snapshot("wf")
        assert stored.position == AtTask("c")
        assert stored.completed_tasks == {"a": b"a", "b": b"b"}

    def test_complete_tasks_empty_list_returns_empty_list(self, backend: PersistentBackend) -> None:
        assert backend.complete_tasks([], ttl=LONG_TTL) == []

    # -- next tasks ---------------------------------------------------------------------------

    def test_complete_tasks_claims_the_next_task_for_the_same_worker(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf", initial_input=b"in")
        claim = self.claim(backend, "wf")
        backend.release_task_claim("wf", "t1", WORKER)
        claim = self.claim(backend, "wf")
        [result] = backend.complete_tasks(
            [done(claim, b"r1", advance=chain("t1", "t2"))], ttl=LONG_TTL, claim_next=1
        )
        [next_task] = result.next_tasks
        assert (next_task.claim.instance_id, next_task.claim.task_id) == ("wf", "t2")
        assert next_task.claim.worker_id == WORKER
        assert next_task.claim.token >= 1
        self.assert_now(clock, next_task.claim.claimed_at)
        assert next_task.claim.expires_at == next_task.claim.claimed_at + LONG_TTL
        assert next_task.task.input == b"r1"
        assert next_task.task.snapshot_version == result.version == 2
        assert next_task.task.definition_hash == claim_definition(backend, "wf")
        assert backend.find_available_tasks(OTHER, 10) == []  # held
        assert backend.claim_task("wf", "t2", OTHER, LONG_TTL) is None
        [recorded] = backend.complete_tasks(
            [done(next_task.claim, b"r2", advance=chain("t1", "t2"))], ttl=LONG_TTL
        )
        assert recorded.outcome is CompletionOutcome.RECORDED
        assert backend.load_snapshot("wf").status is WorkflowStatus.COMPLETED

    def test_complete_tasks_next_claims_respect_the_limit_in_order(
        self, backend: PersistentBackend
    ) -> None:
        for instance_id in ("a", "b"):
            save_new(backend, instance_id)
        claims = [self.claim(backend, instance_id) for instance_id in ("b", "a")]
        fork = lambda s: s.move_to(AtFork("f", ("x", "y")))  # noqa: E731
        results = backend.complete_tasks(
            [done(c, advance=fork) for c in claims], ttl=LONG_TTL, claim_next=3
        )
        assert [len(r.next_tasks) for r in results] == [2, 1]  # b first: both branches
        assert {t.task.task_id for t in results[0].next_tasks} == {"x", "y"}
        [left] = backend.find_available_tasks(OTHER, 10)
        assert left.instance_id == "a"

    def test_complete_tasks_next_claims_with_no_limit_claim_nothing(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        [result] = backend.complete_tasks(
            [done(claim, advance=chain("t1", "t2"))], ttl=LONG_TTL, claim_next=0
        )
        assert result.next_tasks == ()
        assert [t.task_id for t in backend.find_available_tasks(OTHER, 10)] == ["t2"]

    def test_complete_tasks_does_not_claim_a_branch_held_by_another_worker(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b", "c")))
        mine = self.claim(backend, "wf", "a")
        theirs = backend.claim_task("wf", "b", OTHER, LONG_TTL)
        assert theirs is not None
        [result] = backend.complete_tasks([done(mine)], ttl=LONG_TTL, claim_next=5)
        assert [t.task.task_id for t in result.next_tasks] == ["c"]
        assert backend.extend_task_claim("wf", "b", OTHER, LONG_TTL).token == theirs.token

    def test_complete_tasks_a_branch_held_by_another_worker_does_not_use_up_the_limit(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b", "c")))
        mine = self.claim(backend, "wf", "a")
        assert backend.claim_task("wf", "b", OTHER, LONG_TTL) is not None
        [result] = backend.complete_tasks([done(mine)], ttl=LONG_TTL, claim_next=1)
        assert [t.task.task_id for t in result.next_tasks] == ["c"]

    def test_complete_tasks_next_tasks_come_with_the_completion_that_made_them_free(
        self, backend: PersistentBackend
    ) -> None:
        """Two branches of one fork in one call: after the first, the third branch is free
        (the second is still held, by the second completion): it comes with the first, at
        the version the first left."""
        save_at(backend, "wf", AtFork("f", ("a", "b", "c")))
        first, second = self.claim(backend, "wf", "a"), self.claim(backend, "wf", "b")
        results = backend.complete_tasks([done(first), done(second)], ttl=LONG_TTL, claim_next=2)
        assert [[t.task.task_id for t in r.next_tasks] for r in results] == [["c"], []]
        assert results[0].next_tasks[0].task.snapshot_version == results[0].version == 2

    def test_complete_tasks_takes_over_a_free_next_task_with_a_greater_token(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "wf", AtFork("f", ("a", "b")))
        earlier = backend.claim_task("wf", "b", OTHER, LONG_TTL)
        assert earlier is not None
        backend.release_task_claim("wf", "b", OTHER)
        mine = self.claim(backend, "wf", "a")
        [result] = backend.complete_tasks([done(mine)], ttl=None, claim_next=1)
        [next_task] = result.next_tasks
        assert next_task.task.task_id == "b"
        assert next_task.claim.token > earlier.token
        assert next_task.claim.expires_at is None

    def test_complete_tasks_claims_no_next_task_while_a_signal_is_pending(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        backend.store_signal("wf", SignalKind.PAUSE, make_request())
        [result] = backend.complete_tasks(
            [done(claim, advance=chain("t1", "t2"))], ttl=LONG_TTL, claim_next=1
        )
        assert result.outcome is CompletionOutcome.RECORDED
        assert result.next_tasks == ()

    def test_complete_tasks_claims_a_delayed_task_only_once_awake(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        for instance_id in ("later", "now"):
            save_new(backend, instance_id)
        claims = [self.claim(backend, instance_id) for instance_id in ("later", "now")]
        future, past = clock.now() + LONG_TTL, clock.now() - LONG_TTL
        results = backend.complete_tasks(
            [
                done(claims[0], advance=lambda s: s.move_to(AtDelay("d", future, "t2"))),
                done(claims[1], advance=lambda s: s.move_to(AtDelay("d", past, "t2"))),
            ],
            ttl=LONG_TTL,
            claim_next=2,
        )
        assert [len(r.next_tasks) for r in results] == [0, 1]

    # -- validation ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("arguments", "named"),
        [
            ({"completions": "wf"}, "completions"),
            ({"completions": [("wf", "t1")]}, "completions[0]"),
            ({"completions": [TaskCompletion("wf", "t1", WORKER, 1)]}, "completions[0]"),
            (
                {"completions": [TaskCompletion("wf", "t1", WORKER, 1, output=b"x", error="e")]},
                "completions[0]",
            ),
            ({"completions": [TaskCompletion("wf", "", WORKER, 1, output=b"x")]}, "task_id"),
            ({"completions": [TaskCompletion("wf", "t1", WORKER, 0, output=b"x")]}, "token"),
            ({"completions": [TaskCompletion("wf", "t1", WORKER, 1, output="x")]}, "output"),  # type: ignore[arg-type]
            (
                {"completions": [TaskCompletion("wf", "t1", WORKER, 1, output=b"x", advance=3)]},  # type: ignore[arg-type]
                "advance",
            ),
            ({"ttl": timedelta(0)}, "ttl"),
            ({"claim_next": -1}, "claim_next"),
            ({"claim_next": 1.5}, "claim_next"),
        ],
    )
    def test_complete_tasks_invalid_argument_names_it_and_writes_nothing(
        self, backend: PersistentBackend, arguments: dict[str, Any], named: str
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        call: dict[str, Any] = {
            "completions": [done(claim, advance=chain("t1"))],
            "ttl": LONG_TTL,
            "claim_next": 1,
            **arguments,
        }
        with pytest.raises(InvalidInputError, match=named.replace("[", r"\[").replace("]", r"\]")):
            backend.complete_tasks(call.pop("completions"), **call)
        stored = backend.load_snapshot("wf")
        assert (stored.version, stored.completed_tasks) == (1, {})
        assert backend.extend_task_claim("wf", "t1", WORKER, LONG_TTL).token == claim.token

    def test_complete_tasks_refuses_an_oversized_output_before_writing(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        claim = self.claim(backend, "wf")
        ok = done(claim)
        too_big = done(claim, bytes(backend.max_payload_bytes + 1))
        with pytest.raises(InvalidInputError, match=r"completions\[1\]\.output"):
            backend.complete_tasks([ok, too_big], ttl=LONG_TTL)
        assert backend.load_snapshot("wf").version == 1

    # -- concurrency --------------------------------------------------------------------------

    def test_concurrent_completions_of_fork_branches_always_move_past_the_join(
        self, backend: PersistentBackend
    ) -> None:
        rounds = self.scaled(10)
        branches = ("a", "b", "c", "d")
        for index in range(rounds):
            save_at(backend, f"wf{index}", AtFork("f", branches))
        claims = {
            (f"wf{index}", branch): self.claim(backend, f"wf{index}", branch)
            for index in range(rounds)
            for branch in branches
        }
        start = threading.Barrier(len(branches))

        def complete(worker_index: int) -> list[CompletionOutcome]:
            branch = branches[worker_index]
            start.wait()
            outcomes = []
            for index in range(rounds):
                claim = claims[(f"wf{index}", branch)]
                [result] = backend.complete_tasks(
                    [done(claim, branch.encode(), advance=join_then("next"))], ttl=LONG_TTL
                )
                outcomes.append(result.outcome)
            return outcomes

        outcomes = run_in_threads(len(branches), complete)
        assert Counter(o for worker in outcomes for o in worker) == {
            CompletionOutcome.RECORDED: rounds * len(branches)
        }
        for index in range(rounds):
            stored = backend.load_snapshot(f"wf{index}")
            assert stored.position == AtTask("next"), f"wf{index} stalled at its join"
            assert stored.version == 1 + len(branches)

    def test_concurrent_workers_draining_chains_record_each_task_once(
        self, backend: PersistentBackend
    ) -> None:
        workflows = self.scaled(30)
        steps = ("s1", "s2", "s3")
        for index in range(workflows):
            save_new(backend, f"wf{index}", first_task="s1")
        recorded: Counter[tuple[str, str]] = Counter()
        lock = threading.Lock()

        def drain(worker_index: int) -> None:
            worker = f"worker-{worker_index}"
            held = [c.claim for c in backend.claim_available_tasks(worker, 2, LONG_TTL)]
            idle_rounds = 0
            while idle_rounds < 3:
                if not held:
                    held = [c.claim for c in backend.claim_available_tasks(worker, 2, LONG_TTL)]
                    idle_rounds = 0 if held else idle_rounds + 1
                    continue
                completions = [done(c, c.task_id.encode(), advance=chain(*steps)) for c in held]
                results = backend.complete_tasks(completions, ttl=LONG_TTL, claim_next=2)
                held = []
                with lock:
                    for completion, result in zip(completions, results, strict=True):
                        assert result.outcome is CompletionOutcome.RECORDED, result
                        recorded[(completion.instance_id, completion.task_id)] += 1
                for result in results:
                    held += [t.claim for t in result.next_tasks]

        run_in_threads(4, drain)
        assert recorded == {(f"wf{i}", step): 1 for i in range(workflows) for step in steps}
        for index in range(workflows):
            assert backend.load_snapshot(f"wf{index}").status is WorkflowStatus.COMPLETED


def claim_definition(backend: PersistentBackend, instance_id: str) -> str:
    return backend.load_snapshot(instance_id).definition_hash
