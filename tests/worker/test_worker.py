"""The reference worker (``sayiir_persistence.worker``) on the in-memory store and SQL.

Every behaviour is checked against each selected store (``--db``): workflows complete exactly
once, heartbeats keep long tasks, a worker stalled past its TTL loses its claim and its fenced
save is refused, stop() hands claims back, signals reach running tasks.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest

from helpers.worker_stores import FAST_POLL, WAIT_SECONDS, Store, all_done, wait_until
from sayiir_persistence import (
    AtFork,
    AtTask,
    InMemoryBackend,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowSnapshot,
    WorkflowStatus,
)
from sayiir_persistence.worker import (
    Pipeline,
    TaskContext,
    TaskFunction,
    TaskOutcome,
    Worker,
)


class Log:
    """Thread-safe record of task executions: (instance, task, worker, token)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: list[tuple[str, str, str, int]] = []
        self.outcomes: list[tuple[str, str, TaskOutcome]] = []

    def ran(self, ctx: TaskContext) -> None:
        with self._lock:
            self.runs.append((ctx.instance_id, ctx.task_id, ctx.worker_id, ctx.claim.token))

    def outcome(self, ctx: TaskContext, outcome: TaskOutcome) -> None:
        with self._lock:
            self.outcomes.append((ctx.instance_id, ctx.task_id, outcome))

    def outcomes_of(self, instance_id: str) -> list[tuple[str, TaskOutcome]]:
        """This instance's outcomes (a shared database may hold other tests' tasks)."""
        with self._lock:
            return [(t, outcome) for i, t, outcome in self.outcomes if i == instance_id]

    def runs_of(self, instance_id: str, task_id: str) -> list[tuple[str, int]]:
        with self._lock:
            return [(w, t) for i, k, w, t in self.runs if (i, k) == (instance_id, task_id)]


ORDER = Pipeline("validate", ("reserve", "charge"), "ship")


def appending(log: Log) -> TaskFunction:
    """A task function whose output is its input followed by its task id."""

    def run(ctx: TaskContext) -> bytes:
        log.ran(ctx)
        if ctx.task_id == "ship":
            # After a join, read both branches (the input is only the last one's output).
            reserve, charge = ctx.result_of("reserve"), ctx.result_of("charge")
            assert reserve is not None and charge is not None
            return b"|".join([reserve, charge, b"ship"])
        return (ctx.input or b"") + b"," + ctx.task_id.encode()

    return run


# --------------------------------------------------------------------------------------------
# Pipeline


def where(snapshot: WorkflowSnapshot) -> Position:
    """The position, typed as the union (mypy would narrow ``snapshot.position`` otherwise)."""
    return snapshot.position


def test_pipeline_moves_through_steps_and_waits_for_every_branch() -> None:
    snapshot = ORDER.start("p-1", "def", initial_input=b"in")
    assert where(snapshot) == AtTask("validate")
    assert snapshot.runnable_task_ids() == ("validate",)

    snapshot.mark_task_completed("validate", b"v")
    ORDER(snapshot)
    assert where(snapshot) == AtFork("step-1", ("reserve", "charge"))

    snapshot.mark_task_completed("charge", b"c")
    ORDER(snapshot)  # reserve is still running: stay at the fork
    assert where(snapshot) == AtFork("step-1", ("reserve", "charge"))
    snapshot.mark_task_completed("reserve", b"r")
    ORDER(snapshot)
    assert where(snapshot) == AtTask("ship")

    ORDER(snapshot)  # nothing completed since: nothing changes
    assert where(snapshot) == AtTask("ship")
    snapshot.mark_task_completed("ship", b"shipped")
    ORDER(snapshot)
    assert snapshot.status is WorkflowStatus.COMPLETED
    assert snapshot.output == b"shipped"


@pytest.mark.parametrize(
    "steps",
    [(), ("a", "a"), ("a", ("b", "a")), ((),), (("b", "b"),)],
    ids=["empty", "repeated", "repeated-in-fork", "empty-fork", "repeated-branch"],
)
def test_pipeline_rejects_malformed_steps(steps: tuple[str | tuple[str, ...], ...]) -> None:
    with pytest.raises(ValueError):
        Pipeline(*steps)


def test_worker_rejects_bad_options() -> None:
    backend = InMemoryBackend()
    with pytest.raises(ValueError, match="threads"):
        Worker(backend, {}, ORDER, threads=0)
    with pytest.raises(ValueError, match="ttl"):
        Worker(backend, {}, ORDER, ttl=timedelta(0))


# --------------------------------------------------------------------------------------------
# Exactly once


def test_chain_and_fork_workflows_complete_exactly_once(store: Store) -> None:
    log = Log()
    ids = store.start(ORDER, count=12, payload=b"order")
    workers = [
        store.worker(appending(log), ORDER, threads=3, worker_id=f"w{n}", on_outcome=log.outcome)
        for n in range(2)
    ]
    with workers[0], workers[1]:
        wait_until(all_done(store, ids), "every workflow to finish")

    executions = Counter((instance, task) for instance, task, _, _ in log.runs)
    assert set(executions.values()) == {1}, "a task ran twice without any claim expiring"
    assert len(executions) == 4 * len(ids)
    for instance_id in ids:
        snapshot = store.backend.load_snapshot(instance_id)
        assert snapshot.status is WorkflowStatus.COMPLETED
        assert snapshot.completed_tasks["reserve"] == b"order,validate,reserve"
        assert snapshot.completed_tasks["charge"] == b"order,validate,charge"
        assert snapshot.output == b"order,validate,reserve|order,validate,charge|ship"
    recorded = sum(w.stats.recorded for w in workers)
    assert recorded == 4 * len(ids)
    mine = {outcome for instance, _, outcome in log.outcomes if instance in ids}
    assert mine == {TaskOutcome.RECORDED}  # (tasks of other tests in a shared database aside)


def test_claiming_goes_on_while_completions_take_the_idle_threads(store: Store) -> None:
    """With ``claim_batch_wait`` the claim loop waits (lock released) for more idle threads;
    meanwhile the completion thread may promise them to its next claims. The claim loop must
    go back to waiting, not stop (it did: the workflows then never finished)."""
    ids = store.start(ORDER, count=30, payload=b"order")

    def slow(ctx: TaskContext) -> bytes:
        time.sleep(0.005)
        return b"x"

    worker = store.worker(slow, ORDER, threads=3, claim_batch_wait=timedelta(milliseconds=50))
    with worker:
        wait_until(all_done(store, ids), "every workflow to finish")
    assert worker.stats.recorded == 4 * len(ids)


def test_fork_branches_finishing_together_in_two_workers_reach_the_join(store: Store) -> None:
    """Each branch runs in its own worker (so each is recorded in its own transaction) and
    both finish at the same moment; no sweep runs (it would hide a stalled fork): the last
    completion, which runs the advance function on the stored state, moves past the join."""
    pipeline = Pipeline(("left", "right"), "join")
    [instance_id] = store.start(pipeline)
    both_running = threading.Barrier(2, timeout=WAIT_SECONDS)

    def branch(ctx: TaskContext) -> bytes:
        if ctx.task_id != "join":
            both_running.wait()
        return ctx.task_id.encode()

    no_sweep = {"stall_sweep_every": timedelta(hours=1), "claim_next": False}
    first = store.worker(branch, pipeline, threads=1, **no_sweep)
    second = store.worker(branch, pipeline, threads=1, **no_sweep)
    with first, second:
        wait_until(all_done(store, [instance_id]), "the join to run")
    stored = store.backend.load_snapshot(instance_id)
    assert stored.status is WorkflowStatus.COMPLETED
    assert stored.output == b"join"
    assert first.stats.recorded + second.stats.recorded == 3


def test_a_failing_task_fails_the_workflow(store: Store) -> None:
    log = Log()

    def explode(ctx: TaskContext) -> bytes:
        raise RuntimeError("card declined")

    [instance_id] = store.start(ORDER)
    with store.worker(explode, ORDER, on_outcome=log.outcome) as worker:
        wait_until(all_done(store, [instance_id]), "the workflow to fail")
    snapshot = store.backend.load_snapshot(instance_id)
    assert snapshot.status is WorkflowStatus.FAILED
    assert snapshot.error is not None and "card declined" in snapshot.error
    assert log.outcomes_of(instance_id) == [("validate", TaskOutcome.FAILED)]
    assert worker.stats.failed == 1


def test_a_fork_left_completed_by_a_crashed_worker_is_moved_on(store: Store) -> None:
    """Two branches saved at the same moment each see the other unfinished; the worker that
    saved last dies before its second step (moving the workflow past the join). The state it
    leaves behind: every branch completed, nothing runnable. A sweep moves it on."""
    log = Log()
    [instance_id] = store.start(ORDER, payload=b"order")
    snapshot = store.backend.load_snapshot(instance_id)
    snapshot.mark_task_completed("validate", b"order,validate")
    snapshot.move_to(ORDER.position_of(1))
    snapshot.mark_task_completed("reserve", b"order,validate,reserve")
    snapshot.mark_task_completed("charge", b"order,validate,charge")
    store.backend.save_snapshot(snapshot)
    assert store.backend.list_stalled_forks() == [instance_id]
    assert store.backend.find_available_tasks("probe", 10) == []

    worker = store.worker(
        appending(log),
        ORDER,
        stall_sweep_every=timedelta(milliseconds=100),
    )
    with worker:
        wait_until(all_done(store, [instance_id]), "the stalled fork to be moved on")
    final = store.backend.load_snapshot(instance_id)
    assert final.status is WorkflowStatus.COMPLETED
    assert log.runs_of(instance_id, "ship") == [(worker.worker_id, 1)]
    assert store.backend.list_stalled_forks() == []


# --------------------------------------------------------------------------------------------
# Heartbeats and lost claims


def test_heartbeat_keeps_a_task_longer_than_its_ttl(real_time_store: Store) -> None:
    store = real_time_store
    log = Log()
    ttl = timedelta(seconds=1)
    pipeline = Pipeline("slow")
    [instance_id] = store.start(pipeline)

    def slow(ctx: TaskContext) -> bytes:
        log.ran(ctx)
        time.sleep(ttl.total_seconds() * 2.5)
        return b"done"

    holder = store.worker(slow, pipeline, ttl=ttl, worker_id="holder")
    rival = store.worker(slow, pipeline, ttl=ttl, worker_id="rival")
    with holder:
        wait_until(lambda: len(log.runs) == 1, "the slow task to start")
        with rival:  # polls all along: would take the task over if its claim expired
            wait_until(all_done(store, [instance_id]), "the slow task to finish")
    assert log.runs == [(instance_id, "slow", "holder", 1)]
    assert store.backend.load_snapshot(instance_id).output == b"done"
    assert holder.stats.recorded == 1 and holder.stats.lost == 0
    assert rival.stats.recorded == 0


def test_a_stalled_worker_loses_its_claim_and_its_fenced_save_is_refused(store: Store) -> None:
    """A worker that did not notice its claim was taken over comes back too late: its stale
    result is never written. Its lease cannot tell it (a process frozen as a whole, or a store
    clock running ahead of ours): only the fence can. Staged on every store without waiting:
    the claim is released in the stalled worker's name, as if it had expired, and a rival
    takes the task (token 2) while the stalled worker's lease (minutes) has not run out."""
    log = Log()
    ttl = timedelta(minutes=10)
    pipeline = Pipeline("step")
    [instance_id] = store.start(pipeline)
    stalled_may_finish = threading.Event()
    rival_may_finish = threading.Event()
    contexts: dict[str, TaskContext] = {}

    def step(ctx: TaskContext) -> bytes:
        log.ran(ctx)
        contexts[ctx.worker_id] = ctx
        gate = stalled_may_finish if ctx.worker_id == "stalled" else rival_may_finish
        assert gate.wait(WAIT_SECONDS)
        return f"result of {ctx.worker_id}".encode()

    # Heartbeats far apart: nothing renews (or checks) the claim while the task is blocked.
    # One thread each, so the stalled worker cannot take its own task again.
    stalled = store.worker(
        step,
        pipeline,
        ttl=ttl,
        heartbeat_every=timedelta(minutes=5),
        threads=1,
        worker_id="stalled",
        on_outcome=log.outcome,
    )
    rival = store.worker(
        step, pipeline, ttl=ttl, threads=1, worker_id="rival", on_outcome=log.outcome
    )
    with stalled:  # the rival starts later: it must not win the first claim
        wait_until(lambda: "stalled" in contexts, "the stalled worker to start the task")
        store.backend.release_task_claim(instance_id, "step", "stalled", token=1)
        with rival:
            wait_until(lambda: "rival" in contexts, "the rival to take the task over")

            # The stalled worker wakes up first: its save must be refused (token 1 < 2).
            stalled_may_finish.set()
            wait_until(lambda: stalled.stats.lost == 1, "the stalled worker's result to be dropped")
            assert store.backend.load_task_result(instance_id, "step") is None
            assert "fenced save was refused" in (contexts["stalled"].lost_reason or "")

            rival_may_finish.set()
            wait_until(all_done(store, [instance_id]), "the rival to finish the task")

    assert log.runs_of(instance_id, "step") == [("stalled", 1), ("rival", 2)]
    snapshot = store.backend.load_snapshot(instance_id)
    assert snapshot.status is WorkflowStatus.COMPLETED
    assert snapshot.output == b"result of rival"
    assert sorted(outcome for _, outcome in log.outcomes_of(instance_id)) == [
        TaskOutcome.LOST,
        TaskOutcome.RECORDED,
    ]
    assert rival.stats.recorded == 1 and stalled.stats.recorded == 0


def test_a_heartbeat_tells_the_task_its_claim_was_lost(store: Store) -> None:
    """The store refuses a renewal (the claim was taken over): the task is told at once,
    long before its lease would run out. The takeover is staged as in the test above."""
    ttl = timedelta(minutes=10)
    pipeline = Pipeline("step")
    [instance_id] = store.start(pipeline)
    started = threading.Event()
    taken_over = threading.Event()
    seen: list[TaskContext] = []

    def step(ctx: TaskContext) -> bytes:
        seen.append(ctx)
        started.set()
        assert ctx.claim_lost.wait(WAIT_SECONDS), "the heartbeat never reported the loss"
        # Keeps the only thread until the thief has the task (or this worker would take it).
        assert taken_over.wait(WAIT_SECONDS)
        ctx.raise_if_lost()  # what a long task does when it notices
        return b"never saved"

    worker = store.worker(
        step, pipeline, ttl=ttl, threads=1, heartbeat_every=timedelta(milliseconds=50)
    )
    with worker:
        assert started.wait(WAIT_SECONDS)
        # As if the claim had expired, and someone else took the task over.
        store.backend.release_task_claim(instance_id, "step", worker.worker_id, token=1)
        assert store.backend.claim_task(instance_id, "step", "thief", ttl) is not None
        taken_over.set()
        wait_until(lambda: worker.stats.lost == 1, "the loss to be noticed")
    assert (seen[0].lost_reason or "").startswith("heartbeat: ")
    assert store.backend.load_task_result(instance_id, "step") is None
    assert worker.stats.failed == 0  # a lost claim never fails the workflow


@pytest.mark.parametrize("kind", [SignalKind.CANCEL, SignalKind.PAUSE])
def test_a_heartbeat_applies_a_pending_signal(real_time_store: Store, kind: SignalKind) -> None:
    store = real_time_store
    pipeline = Pipeline("step")
    [instance_id] = store.start(pipeline)
    started = threading.Event()
    seen: list[TaskContext] = []

    def step(ctx: TaskContext) -> bytes:
        seen.append(ctx)
        started.set()
        ctx.claim_lost.wait(WAIT_SECONDS)
        return b"too late"

    worker = store.worker(step, pipeline, heartbeat_every=timedelta(milliseconds=50))
    with worker:
        assert started.wait(WAIT_SECONDS)
        store.backend.store_signal(instance_id, kind, SignalRequest(reason="operator"))
        wait_until(lambda: worker.stats.lost == 1, "the signal to stop the task")
    expected = WorkflowStatus.CANCELLED if kind is SignalKind.CANCEL else WorkflowStatus.PAUSED
    assert store.backend.load_snapshot(instance_id).status is expected
    assert seen[0].lost_reason is not None and expected.value in seen[0].lost_reason
    assert store.backend.load_task_result(instance_id, "step") is None


# --------------------------------------------------------------------------------------------
# Shutdown


def test_stop_releases_the_claims_of_unfinished_tasks(store: Store) -> None:
    pipeline = Pipeline("step")
    [instance_id] = store.start(pipeline)
    started = threading.Event()
    finish = threading.Event()
    seen: list[TaskContext] = []

    def step(ctx: TaskContext) -> bytes:
        seen.append(ctx)
        started.set()
        finish.wait(WAIT_SECONDS)  # ignores claim_lost: stop() must not wait for it
        return b"too late"

    worker = store.worker(step, pipeline, ttl=timedelta(minutes=10)).start()
    assert started.wait(WAIT_SECONDS)
    began = time.monotonic()
    worker.stop(grace=timedelta(milliseconds=100))
    assert time.monotonic() - began < 5
    assert worker.stats.released == 1
    assert seen[0].claim_lost.is_set()

    # Claimable at once by anyone, long before the 10-minute TTL.
    claim = store.backend.claim_task(instance_id, "step", "next-worker", timedelta(minutes=1))
    assert claim is not None and claim.token == 2
    finish.set()
    time.sleep(0.1)  # the abandoned function returns; its result must not be saved
    assert store.backend.load_task_result(instance_id, "step") is None


def test_stop_waits_for_tasks_that_finish_within_the_grace(store: Store) -> None:
    pipeline = Pipeline("step")
    [instance_id] = store.start(pipeline)
    started = threading.Event()

    def step(ctx: TaskContext) -> bytes:
        started.set()
        time.sleep(0.3)
        return b"finished"

    worker = store.worker(step, pipeline).start()
    assert started.wait(WAIT_SECONDS)
    worker.stop(grace=timedelta(seconds=10))
    assert worker.stats.recorded == 1 and worker.stats.released == 0
    assert store.backend.load_snapshot(instance_id).output == b"finished"
    worker.stop()  # a second stop does nothing


def test_run_until_signalled_stops_on_sigterm_and_restores_the_handler() -> None:
    backend = InMemoryBackend()
    pipeline = Pipeline("step")
    backend.save_snapshot(pipeline.start("sig", "def"), expected_version=0)
    worker = Worker(backend, lambda ctx: b"ok", pipeline, poll_interval=FAST_POLL)
    previous = signal.getsignal(signal.SIGTERM)

    def send_sigterm_when_done() -> None:
        wait_until(
            lambda: backend.load_snapshot("sig").status is WorkflowStatus.COMPLETED,
            "the workflow",
        )
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_sigterm_when_done)
    sender.start()
    assert worker.run_until_signalled() is signal.SIGTERM
    sender.join()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert worker.stats.recorded == 1


def test_run_until_signalled_refuses_other_threads() -> None:
    worker = Worker(InMemoryBackend(), {}, ORDER)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            worker.run_until_signalled()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


def test_tasks_without_a_function_are_left_to_expire(store: Store) -> None:
    log = Log()
    pipeline = Pipeline("known", "unknown")
    [instance_id] = store.start(pipeline)

    def known(ctx: TaskContext) -> bytes:
        return b"k"

    with store.worker({"known": known}, pipeline, on_outcome=log.outcome):
        wait_until(
            lambda: (instance_id, "unknown", TaskOutcome.UNHANDLED) in log.outcomes,
            "the unknown task to be claimed",
        )
    assert store.backend.load_snapshot(instance_id).status is WorkflowStatus.IN_PROGRESS
