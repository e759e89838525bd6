"""The worker's leases: a renewal that hangs or fails stops its task before its claim can expire.

Each store (memory on a real clock, SQLite, PostgreSQL, MariaDB) is wrapped in
:class:`FaultyRenewals`, which passes every call to the real backend except the renewals
(``extend_task_claim``) of the claims a test picks: those block until the test lets them go,
or fail with ``BackendUnavailableError``. It notes when each call was sent and when it came
back, so that a test can tell when the store can have let the claim expire at the earliest:
``ttl`` after the last successful call was sent.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from helpers.worker_stores import FAST_POLL, WAIT_SECONDS, Store, all_done, wait_until
from sayiir_persistence import (
    BackendUnavailableError,
    ClaimedTask,
    InMemoryBackend,
    PersistentBackend,
    TaskClaim,
    WorkflowStatus,
)
from sayiir_persistence.worker import Pipeline, TaskContext, TaskOutcome, Worker
from sayiir_persistence.worker.lease import Lease
from sayiir_persistence.worker.renewals import Renewals

# The margin (TTL / 10, 0.3 s) is the room the worker has to tell the task on a busy machine.
TTL = timedelta(seconds=3)
STEP = Pipeline("step")
logger = logging.getLogger(__name__)
# How much sooner than the lease a task may be told: the worker reads the clock just before
# calling the wrapper, which reads it again.
EARLY_SLACK = 0.05


@dataclass(frozen=True)
class Call:
    """A call that granted or renewed a claim (or tried to)."""

    instance_id: str
    token: int
    sent: float
    returned: float
    ok: bool


class FaultyRenewals:
    """A real backend; the renewals of the claims given to :meth:`hang` or :meth:`fail`
    (instance, token) succeed ``after`` times, then block until :attr:`let_go` is set (then
    go through) or raise ``BackendUnavailableError``."""

    def __init__(self, backend: PersistentBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._faults: dict[tuple[str, int], tuple[str, int]] = {}
        self._renewals: Counter[tuple[str, int]] = Counter()
        self.calls: list[Call] = []
        self.let_go = threading.Event()
        self.hanging = threading.Semaphore(0)  # released once per call that starts hanging
        self.hung_now = 0
        self.in_flight = 0  # renewals not returned yet (hung ones included)
        self.hangs_began: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def hang(self, instance_id: str, token: int, *, after: int) -> None:
        self._faults[instance_id, token] = ("hang", after)

    def fail(self, instance_id: str, token: int, *, after: int) -> None:
        self._faults[instance_id, token] = ("fail", after)

    def calls_of(self, instance_id: str, token: int) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if (c.instance_id, c.token) == (instance_id, token)]

    def claim_available_tasks(self, *args: Any, **kwargs: Any) -> list[ClaimedTask]:
        sent = time.monotonic()
        claimed: list[ClaimedTask] = self._backend.claim_available_tasks(*args, **kwargs)
        returned = time.monotonic()
        with self._lock:
            for task in claimed:
                self.calls.append(
                    Call(task.claim.instance_id, task.claim.token, sent, returned, True)
                )
        return claimed

    def extend_task_claim(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        *,
        token: int | None = None,
    ) -> TaskClaim:
        sent = time.monotonic()
        assert token is not None  # the Worker always fences its renewals
        ok = False
        with self._lock:
            self.in_flight += 1
        try:
            self._inject_fault(instance_id, token)
            claim = self._backend.extend_task_claim(
                instance_id, task_id, worker_id, ttl, token=token
            )
            ok = True
            return claim
        finally:
            with self._lock:
                self.calls.append(Call(instance_id, token, sent, time.monotonic(), ok))
                self.in_flight -= 1

    def _inject_fault(self, instance_id: str, token: int) -> None:
        with self._lock:
            fault = self._faults.get((instance_id, token))
            self._renewals[instance_id, token] += 1
            if fault is None or self._renewals[instance_id, token] <= fault[1]:
                return
            if fault[0] == "fail":
                raise BackendUnavailableError("simulated: the store did not answer")
            self.hung_now += 1
            self.hangs_began.append(time.monotonic())
        self.hanging.release()
        try:
            assert self.let_go.wait(WAIT_SECONDS * 3), "the test never let the renewal go"
        finally:
            with self._lock:
                self.hung_now -= 1


def holder(store: Store, faulty: FaultyRenewals, handler: Any, **options: Any) -> Worker:
    """A worker on the faulty backend."""
    options.setdefault("poll_interval", FAST_POLL)
    backend = cast(PersistentBackend, faulty)
    return Worker(backend, handler, {store.definition: STEP}, worker_id="holder", **options)


@dataclass
class Told:
    """When a task was told its claim was lost, and whether the store still held it then."""

    at: float
    reason: str
    still_held: bool


def noticing(told: dict[tuple[str, int], Told], store: Store) -> Any:
    """A task function that waits until it is told its claim was lost, notes when, and asks
    the store at once whether the claim was still live (a probe's claim_task gets ``None``)."""

    def run(ctx: TaskContext) -> bytes:
        if ctx.claim_lost.wait(WAIT_SECONDS):
            at = time.monotonic()
            probe = store.backend.claim_task(ctx.instance_id, ctx.task_id, "probe", TTL)
            told[ctx.instance_id, ctx.claim.token] = Told(at, ctx.lost_reason or "", probe is None)
        return f"stale {ctx.claim.token}".encode()

    return run


def assert_told_within_the_margin(
    faulty: FaultyRenewals, told: Told, instance_id: str, margin: timedelta
) -> None:
    """Told no sooner than the lease (last successful call sent + TTL - margin) and before
    the claim could expire (last successful call sent + TTL); the store agrees."""
    succeeded = [c for c in faulty.calls_of(instance_id, 1) if c.ok and c.returned < told.at]
    last_sent = max(c.sent for c in succeeded)
    ttl = TTL.total_seconds()
    late = told.at - (last_sent + ttl - margin.total_seconds())
    before = last_sent + ttl - told.at
    logger.info("told %.3fs after the lease ran out, %.3fs before the TTL", late, before)
    assert late >= -EARLY_SLACK, f"told {-late:.3f}s before the lease ran out"
    assert before > 0, f"told {-before:.3f}s after the TTL"
    assert told.still_held, "the store had let the claim expire before the task was told"
    assert told.reason.startswith("lease ran out"), told.reason


# --------------------------------------------------------------------------------------------
# On every store


def test_a_hung_renewal_stops_its_task_before_its_claim_can_expire(
    real_time_store: Store,
) -> None:
    """One renewal hangs (after one that succeeded): its task is told before its claim can
    expire; the renewals of the other claims go on meanwhile (never expired, never taken over
    by the rival that polls all along, recorded by their first run); once the hung call is let
    go everything finishes, each task recorded once."""
    store = real_time_store
    hung, *others = store.start(STEP, count=3)
    faulty = FaultyRenewals(store.backend)
    faulty.hang(hung, 1, after=1)
    told: dict[tuple[str, int], Told] = {}
    wait_for_lost = noticing(told, store)
    outcomes: list[tuple[str, str, TaskOutcome, int]] = []

    def step(ctx: TaskContext) -> bytes:
        if ctx.instance_id == hung:
            return wait_for_lost(ctx) if ctx.claim.token == 1 else b"done"
        # Long enough to need renewals while the hung call blocks.
        lost = ctx.claim_lost.wait(TTL.total_seconds() * 2)
        return f"lost {ctx.lost_reason}".encode() if lost else b"done"

    def note(ctx: TaskContext, outcome: TaskOutcome) -> None:
        outcomes.append((ctx.instance_id, ctx.worker_id, outcome, ctx.claim.token))

    first = holder(store, faulty, step, ttl=TTL, threads=3, on_outcome=note)
    rival = store.worker(step, STEP, ttl=TTL, threads=1, worker_id="rival", on_outcome=note)
    try:
        with first:
            wait_until(lambda: first.running_count == 3, "the holder to run the three tasks")
            with rival:
                wait_until(lambda: (hung, 1) in told, "the hung task to be told")
                assert_told_within_the_margin(faulty, told[hung, 1], hung, first.lease_margin)
                assert faulty.hung_now == 1  # still hung: the lease told, not the call
                wait_until(all_done(store, others), "the other tasks to be recorded")
                faulty.let_go.set()
                wait_until(all_done(store, [hung]), "the hung task to run again and finish")
    finally:
        faulty.let_go.set()

    for instance_id in others:
        assert store.backend.load_snapshot(instance_id).output == b"done"
        assert [o for o in outcomes if o[0] == instance_id] == [
            (instance_id, "holder", TaskOutcome.RECORDED, 1)
        ]
        assert_renewed_in_time(faulty, instance_id)
        renewed_meanwhile = [
            call
            for call in faulty.calls_of(instance_id, 1)
            if call.ok and faulty.hangs_began[0] < call.sent and call.returned < told[hung, 1].at
        ]
        assert renewed_meanwhile, "no other claim was renewed while the renewal hung"
    hung_outcomes = sorted(o[2:] for o in outcomes if o[0] == hung)
    assert hung_outcomes == [(TaskOutcome.LOST, 1), (TaskOutcome.RECORDED, 2)]
    assert store.backend.load_snapshot(hung).output == b"done"
    assert first.stats.lost == 1


def assert_renewed_in_time(faulty: FaultyRenewals, instance_id: str) -> None:
    """Each successful renewal came back before the claim could have expired (TTL after the
    previous successful call was sent): the claim never expired."""
    calls = [call for call in faulty.calls_of(instance_id, 1) if call.ok]
    for previous, following in itertools.pairwise(calls):
        assert following.returned < previous.sent + TTL.total_seconds(), (previous, following)
    assert len(calls) >= 4, f"too few renewals for a task running 2 TTLs: {calls}"


def test_renewals_failing_stop_the_task_when_the_lease_runs_out(real_time_store: Store) -> None:
    """Renewals that keep failing (``BackendUnavailableError``) after one that succeeded:
    the task is told when its lease runs out, not sooner (the failures alone are no reason),
    not later than the TTL; then the task runs again and is recorded once."""
    store = real_time_store
    [instance_id] = store.start(STEP)
    faulty = FaultyRenewals(store.backend)
    faulty.fail(instance_id, 1, after=1)
    told: dict[tuple[str, int], Told] = {}
    wait_for_lost = noticing(told, store)

    def step(ctx: TaskContext) -> bytes:
        return wait_for_lost(ctx) if ctx.claim.token == 1 else b"done"

    worker = holder(store, faulty, step, ttl=TTL, threads=1)
    with worker:
        wait_until(lambda: (instance_id, 1) in told, "the task to be told")
        wait_until(all_done(store, [instance_id]), "the task to run again and finish")
    assert_told_within_the_margin(faulty, told[instance_id, 1], instance_id, worker.lease_margin)
    failed = [c for c in faulty.calls_of(instance_id, 1) if not c.ok]
    assert len(failed) >= 1, "no renewal failed before the lease ran out"
    assert store.backend.load_snapshot(instance_id).output == b"done"
    assert worker.stats.lost == 1 and worker.stats.recorded == 1


def test_stop_returns_within_its_grace_while_a_renewal_hangs(real_time_store: Store) -> None:
    store = real_time_store
    [instance_id] = store.start(STEP)
    faulty = FaultyRenewals(store.backend)
    faulty.hang(instance_id, 1, after=0)

    def step(ctx: TaskContext) -> bytes:
        ctx.claim_lost.wait(WAIT_SECONDS)
        return b"too late"

    worker = holder(store, faulty, step, ttl=timedelta(minutes=1), heartbeat_every=FAST_POLL)
    grace = timedelta(milliseconds=300)
    try:
        worker.start()
        assert faulty.hanging.acquire(timeout=WAIT_SECONDS), "no renewal hung"
        began = time.monotonic()
        worker.stop(grace=grace)
        took = time.monotonic() - began
        assert faulty.hung_now == 1  # stop() did not wait for it
    finally:
        faulty.let_go.set()
        # Not to call the store after the test closed it.
        wait_until(lambda: faulty.in_flight == 0, "the hung renewal to return")
    assert took < grace.total_seconds() + 2.0, f"stop() took {took:.2f}s"
    assert worker.stats.released == 1
    # Given back: claimable at once, long before the minute's TTL.
    claim = store.backend.claim_task(instance_id, "step", "next", TTL)
    assert claim is not None and claim.token == 2
    assert store.backend.load_snapshot(instance_id).status is WorkflowStatus.IN_PROGRESS


# --------------------------------------------------------------------------------------------
# The pieces


def test_a_stuck_job_holds_back_no_other_and_the_pool_shrinks_back() -> None:
    renewals = Renewals(stuck_after=0.05, name="test-renew")
    let_go = threading.Event()
    done: list[int] = []

    def stuck() -> None:
        let_go.wait(WAIT_SECONDS)

    try:
        assert renewals.submit("stuck", stuck)
        assert not renewals.submit("stuck", stuck)  # one job per key at a time
        wait_until(lambda: renewals.thread_count == 1, "the first thread")
        time.sleep(0.1)  # the first job is stuck now
        for number in range(50):
            assert renewals.submit(number, functools.partial(done.append, number))
        wait_until(lambda: len(done) == 50, "the other jobs to run beside the stuck one")
        assert renewals.thread_count == 2
        assert sorted(done) == list(range(50))
    finally:
        let_go.set()
    wait_until(lambda: renewals.thread_count == 1, "the pool to shrink back to one thread")
    assert renewals.submit("stuck", lambda: None)  # its key is free again
    renewals.close()
    wait_until(lambda: renewals.thread_count == 0, "the threads to end after close()")


def test_a_lease_starts_when_the_call_was_sent_and_stops_at_the_deadline() -> None:
    claimed_at = datetime(2026, 1, 1, tzinfo=UTC)
    claim = TaskClaim(
        "wf",
        "t",
        "w",
        claimed_at,
        claimed_at + timedelta(seconds=30),
        token=1,
        deadline=claimed_at + timedelta(seconds=50),
    )
    lease = Lease.of_claim(claim, sent_at=100.0, margin=3.0)
    assert (lease.held_until, lease.deadline) == (127.0, 147.0)
    assert not lease.ran_out(126.99) and lease.ran_out(127.0)
    renewed = lease.renewed(sent_at=110.0, ttl=30.0, margin=3.0)
    assert renewed.held_until == 137.0 and not renewed.at_deadline
    last = renewed.renewed(sent_at=130.0, ttl=30.0, margin=3.0)
    assert last.held_until == 147.0 and last.at_deadline  # never past the deadline
    forever = Lease.of_claim(TaskClaim("wf", "t", "w", claimed_at, None, 1), 100.0, 3.0)
    assert forever.held_until == math.inf and not forever.ran_out(1e12)


@pytest.mark.parametrize("heartbeat", [timedelta(seconds=1), timedelta(seconds=9)])
def test_a_heartbeat_slower_than_the_lease_is_warned_about(
    heartbeat: timedelta, caplog: pytest.LogCaptureFixture
) -> None:
    Worker(InMemoryBackend(), {}, STEP, ttl=timedelta(seconds=10), heartbeat_every=heartbeat)
    warned = "not below ttl less the lease margin" in caplog.text
    assert warned is (heartbeat == timedelta(seconds=9))
