"""The contract's races: real threads released together against one backend."""

from __future__ import annotations

import random
from collections import Counter

from ...backend import PersistentBackend
from ...errors import ClaimLostError, ConflictError, NotFoundError
from ...model import AtFork, AtTask, IfExists, TaskClaim, TaskCompletion, WorkflowSnapshot
from ..builders import LONG_TTL, make_snapshot, run_in_threads, save_at, save_new, task_pairs
from .base import ContractBase


class ConcurrencyContract(ContractBase):
    """Concurrency (real threads; sizes scaled by ``concurrency_scale``): exactly one winner
    per claimed task, tasks handed out once, no lost branch result, one winning versioned
    save, each event consumed once, concurrent starts of one instance as if one at a time,
    no fencing token handed out twice while instances are deleted and created again.

    Checks docs/contract.md, section "Concurrency" (``#concurrency``).
    """

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

    # -- start_workflow: as if the calls ran one after the other ---------------------------

    def test_concurrent_start_workflow_fail_one_winner(self, backend: PersistentBackend) -> None:
        def start(index: int) -> WorkflowSnapshot | None:
            try:
                return backend.start_workflow(make_snapshot("wf", first_task=f"t-{index}"))
            except ConflictError:
                return None

        results = run_in_threads(self.scaled(16), start)
        [winner] = [index for index, started in enumerate(results) if started is not None]
        loaded = backend.load_snapshot("wf")
        assert loaded == results[winner]
        assert (loaded.version, loaded.position) == (1, AtTask(f"t-{winner}"))
        assert task_pairs(backend.find_available_tasks("w", 100)) == [("wf", f"t-{winner}")]

    def test_concurrent_start_workflow_use_existing_stores_once(
        self, backend: PersistentBackend
    ) -> None:
        results = run_in_threads(
            self.scaled(16),
            lambda index: backend.start_workflow(
                make_snapshot("wf", first_task=f"t-{index}"), if_exists=IfExists.USE_EXISTING
            ),
        )
        loaded = backend.load_snapshot("wf")
        assert loaded.version == 1
        assert all(started == loaded for started in results)
        assert len(backend.find_available_tasks("w", 100)) == 1

    def test_concurrent_start_workflow_terminate_existing_leaves_one_run(
        self, backend: PersistentBackend
    ) -> None:
        save_new(backend, "wf")
        old = backend.claim_task("wf", "t1", "w", LONG_TTL)
        assert old is not None
        threads = self.scaled(16)
        results = run_in_threads(
            threads,
            lambda index: backend.start_workflow(
                make_snapshot("wf", first_task=f"t-{index}"),
                if_exists=IfExists.TERMINATE_EXISTING,
            ),
        )
        assert [started.version for started in results] == [1] * threads
        loaded = backend.load_snapshot("wf")
        assert loaded.version == 1 and loaded in results
        assert isinstance(loaded.position, AtTask)
        # Nothing left of the other runs: one ready task, the stored run's.
        assert task_pairs(backend.find_available_tasks("w", 100)) == [
            ("wf", loaded.position.task_id)
        ]

    def test_tokens_never_repeat_while_instances_are_deleted_and_created_again(
        self, backend: PersistentBackend
    ) -> None:
        """One thread deletes and re-creates a few fork workflows over and over while others
        claim their branches (claim_task, claim_available_tasks, next claims of completions)
        and release or complete them: every (instance, task, token) is handed out once."""
        instance_ids = [f"wf-{index}" for index in range(self.scaled(3))]
        fork = AtFork("f", ("a", "b"))
        for instance_id in instance_ids:
            save_at(backend, instance_id, fork)
        rounds = self.scaled(15)

        def recreate() -> None:
            for _ in range(rounds):
                for instance_id in instance_ids:
                    backend.delete_snapshot(instance_id)
                    save_at(backend, instance_id, fork)

        def claim_and_finish(index: int) -> list[TaskClaim]:
            rng, worker_id, granted = random.Random(index), f"w{index}", []
            for _ in range(rounds * len(instance_ids)):
                try:
                    if rng.random() < 0.5:
                        claims = [
                            item.claim
                            for item in backend.claim_available_tasks(worker_id, 2, LONG_TTL)
                        ]
                    else:
                        one = backend.claim_task(
                            rng.choice(instance_ids), rng.choice("ab"), worker_id, LONG_TTL
                        )
                        claims = [] if one is None else [one]
                    granted += claims
                    for claim in claims:
                        granted += self._finish(backend, rng, claim)
                except (NotFoundError, ClaimLostError):
                    pass  # deleted (and perhaps created again) meanwhile
            return granted

        def work(index: int) -> list[TaskClaim]:
            if index == 0:
                recreate()
                return []
            return claim_and_finish(index)

        granted = [claim for claims in run_in_threads(self.scaled(4), work) for claim in claims]
        handed_out = Counter((c.instance_id, c.task_id, c.token) for c in granted)
        assert granted and handed_out.most_common(1)[0][1] == 1, handed_out.most_common(3)

    @staticmethod
    def _finish(
        backend: PersistentBackend, rng: random.Random, claim: TaskClaim
    ) -> list[TaskClaim]:
        """Release ``claim`` or complete it (taking the next task): the next claims made."""
        if rng.random() < 0.5:
            backend.release_task_claim(
                claim.instance_id, claim.task_id, claim.worker_id, token=claim.token
            )
            return []
        completion = TaskCompletion(
            claim.instance_id, claim.task_id, claim.worker_id, claim.token, output=b"done"
        )
        [result] = backend.complete_tasks([completion], ttl=LONG_TTL, claim_next=1)
        return [item.claim for item in result.next_tasks]
