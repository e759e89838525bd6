"""``Worker``: claims tasks, runs them on a thread pool, records them in batches under fencing.

See the package documentation (``sayiir_persistence.worker``) for the cycle and its
guarantees. The pieces, by thread:

- the claim thread: waits for idle threads, claims that many tasks (``claim_available_tasks``)
  and hands them to the pool; when nothing is available it waits (``poll_interval``, less
  after recent work), or less when one of its own completions may have made work runnable;
- the pool's threads: run task functions and queue what they returned (or raised);
- the completion thread (a :class:`~sayiir_persistence.worker.batcher.Batcher`): records the
  queued outcomes with ``complete_tasks``, many per transaction, and takes the next tasks of
  those workflows for the threads that are idle (``claim_next``), in the same transaction;
- the heartbeat thread: every ``heartbeat_every`` hands the renewal of every claim held
  (tasks running or waiting to be recorded) to the renewal threads, and stops the tasks whose
  lease ran out (see :class:`~sayiir_persistence.worker.lease.Lease`); it never calls the
  store itself, so a renewal that hangs cannot stop it;
- the renewal threads (:class:`~sayiir_persistence.worker.renewals.Renewals`): one while
  the store answers, one more whenever all of them are stuck in calls that hang;
- the listening thread: wakes the claim thread when the store announces work.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType, TracebackType
from typing import Self, TypeVar

from ..backend import DEFAULT_AGING_INTERVAL, PersistentBackend
from ..errors import (
    ClaimLostError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PersistenceError,
    WorkflowTerminalError,
)
from ..model import (
    Advance,
    ClaimedTask,
    CompletionOutcome,
    CompletionResult,
    SignalKind,
    TaskCompletion,
    WorkflowStatus,
)
from ..retries import RetryPolicy
from ..telemetry.metrics import worker_metrics
from ..telemetry.tasks import TaskSpan, start_task_span
from .batcher import Batcher
from .context import TaskContext, TaskFunction, TaskOutcome, WorkerStats
from .lease import Lease
from .renewals import Renewals

__all__ = ["Worker", "default_worker_id"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How often the worker re-reads a workflow whose concurrent saves kept conflicting while it
# tried to move a stalled fork past its join; each conflict means somebody else moved it.
_SETTLE_ATTEMPTS = 10
# Most stalled forks one sweep moves on (the next sweep takes the rest).
_SWEEP_LIMIT = 100
# Back-off after the store was unreachable, doubled up to the maximum.
_MIN_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 5.0
# An idle worker first polls this much sooner than poll_interval, then backs off to it.
_POLL_SPEEDUP = 16
# Longest a wait for announcements of work lasts (how long stop() may wait for it).
_LISTEN_SECONDS = 0.25
# Attempts of a completion batch whose outcome was unknown (the store unreachable): safe to
# repeat, since recorded completions released their claims (docs/contract.md#complete_tasks).
# At least this many; more while the worker's lease on one of the batch's claims holds (a
# database failover of several seconds then re-runs no finished task).
_COMPLETION_ATTEMPTS = 4
# The lease on a claim ends this share of the TTL before the claim can expire at the earliest
# (see Worker.lease_margin).
_LEASE_MARGIN = 0.1
# A renewal still running after this share of heartbeat_every is stuck: the renewals waiting
# behind it get another thread.
_STUCK_RENEWAL = 0.5


def default_worker_id() -> str:
    """``host-pid-random``: unique per worker object, readable in claims and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Running:
    """A claimed task, from its hand-over to the pool until its outcome is known."""

    context: TaskContext
    advance: Advance
    key: tuple[str, str, int]
    # Taken by whoever ends the execution (the task's thread queueing its result, or stop()
    # releasing the claim) so that exactly one of them does, never both.
    finish_lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)
    # The function returned; its outcome waits in the completion queue (the claim is still
    # held, and renewed, until it is recorded).
    completing: bool = False
    future: Future[None] | None = None
    # The execution's span (None without OpenTelemetry): ended with the outcome, in _end.
    span: TaskSpan | None = None


@dataclass(frozen=True)
class _Finished:
    """What a task's execution left for the completion thread to record."""

    running: _Running
    output: bytes | None = None
    error: str | None = None
    retry_after: timedelta | None = None


class Worker:
    """Runs the tasks of a store on a pool of threads; see the package documentation.

    Args:
        backend: the store, shared by every thread of this worker (backends are thread-safe).
        handlers: the task functions by task id, or one function that dispatches on
            ``ctx.definition_hash`` / ``ctx.task_id``.
        advance: how workflows move on after a task completed (an :data:`Advance`, e.g. a
            :class:`Pipeline`), or one per ``definition_hash``. It runs inside the store's
            completion step: keep it quick, and do not call the backend from it.
        worker_id: the id the claims are held under; unique per worker (default
            :func:`default_worker_id`).
        threads: how many tasks run at once. The worker never claims more tasks than it has
            idle threads, so a claimed task never waits in a queue while its TTL runs.
        ttl: how long a claim lives without a heartbeat: how long the tasks of a crashed
            worker wait before another worker takes them over.
        heartbeat_every: how often every held claim is renewed (default ``ttl / 3``). Keep it
            well below ``ttl``: a claim not renewed within ``ttl - lease_margin`` of the last
            renewal that succeeded stops its task (see *Leases* below).
        poll_interval: the longest an idle worker waits before looking for tasks again.
            It looks at once when work is announced (``backend.work_waiter()``: a task
            made runnable by this process, or by any process on PostgreSQL), and after work
            it polls sooner (``poll_interval / 16``, doubling while it finds nothing):
            polling is the fallback for lost announcements and expired claims.
        tags: the worker's tags; it runs the tasks of workflows whose tags are a subset.
        batch_size: most tasks claimed in one call (default ``threads``).
        claim_batch_wait: when fewer than ``batch_size`` threads are idle, how long to wait
            for more to become idle before claiming, so that one claim call serves several
            threads.
        aging_interval: passed to ``claim_available_tasks`` (priority aging).
        shutdown_grace: how long :meth:`stop` waits for running tasks before releasing
            their claims.
        stall_sweep_every: how often to look for forks whose branches are all completed
            but whose workflow was not moved on (left by an older version of this worker, or
            by a writer outside the worker), and for workflows past their ``deadline`` (the
            workflow-level timeout: they are failed); the first look comes at start.
        completion_batch: most outcomes recorded in one ``complete_tasks`` call.
        completion_wait: how long a finished task may wait for others to share its
            transaction. ``0`` (default): recorded as soon as the completion thread is free;
            batches still form under load, from what finished during the previous write.
        claim_next: take the next tasks of completed workflows for idle threads in the same
            transaction as the completion (a chain of tasks then costs one transaction per
            task, with no claim call and no poll in between).
        on_outcome: called after each execution with its context and :class:`TaskOutcome`
            (metrics, audit logs); exceptions it raises are logged and ignored. It runs on
            the worker's threads: keep it short and thread-safe.
        retry: how often a task runs and how long it waits between attempts (a
            :class:`~sayiir_persistence.RetryPolicy`). ``None`` (default): a task function
            that raises fails its workflow at once, and a task whose worker died is taken
            over however often that happens. With a policy, every claim is an attempt: a
            task that kills its worker each time stops after ``max_attempts`` executions.
        task_timeout: the deadline of each execution, kept by the store: past it the claim
            is no longer renewed, the result is not recorded, and the task is claimed again
            as its next attempt. A Python thread cannot be killed: the hung function keeps
            its thread until it returns (read ``ctx.claim_lost`` to stop early).

    Leases: the worker stops a task before its claim can expire, whether the renewals failed
    or hang. Each execution has a lease, in this process's monotonic time: the moment the
    last call that granted or renewed its claim was *sent* (the store starts the TTL during
    the call, never before), plus the TTL granted (``ttl``, or less up to the claim's
    deadline), minus :attr:`lease_margin` (``ttl / 10``: room for the heartbeat thread to
    wake on a busy machine and for the store's clock to run a little faster than ours).
    When the lease runs out without a renewal having succeeded, the task's claim is marked
    lost (:attr:`TaskContext.claim_lost`, a warning in the log), exactly as when the store
    says it was taken over: its result is dropped (``TaskOutcome.LOST``), its claim is left
    to expire and the task runs again. The renewals run on their own daemon threads (one
    while the store answers, one more whenever every one is stuck in a call for half a
    heartbeat interval), so a call that hangs delays neither the renewal of the other
    claims, nor the watch on the leases, nor :meth:`stop`.

    OpenTelemetry (when installed; see :mod:`sayiir_persistence.telemetry`): each execution
    runs in a span ``task <task_id>``, a child of the span that started its workflow
    (``AvailableTask.trace_context``), ended once its :class:`TaskOutcome` is known; the task
    function's backend calls are its children. The worker counts claimed, recorded, failed
    and lost tasks and times its claim calls and task functions
    (:mod:`sayiir_persistence.telemetry.metrics`).

    Raises:
        ValueError: ``threads``, ``ttl``, ``heartbeat_every``, ``poll_interval`` or
            ``completion_batch`` is not positive, or ``completion_wait`` is negative.
    """

    def __init__(
        self,
        backend: PersistentBackend,
        handlers: Mapping[str, TaskFunction] | TaskFunction,
        advance: Advance | Mapping[str, Advance],
        *,
        worker_id: str | None = None,
        threads: int = 4,
        ttl: timedelta = timedelta(seconds=30),
        heartbeat_every: timedelta | None = None,
        poll_interval: timedelta = timedelta(seconds=1),
        tags: Iterable[str] = (),
        batch_size: int | None = None,
        claim_batch_wait: timedelta = timedelta(0),
        aging_interval: timedelta = DEFAULT_AGING_INTERVAL,
        shutdown_grace: timedelta = timedelta(seconds=10),
        stall_sweep_every: timedelta = timedelta(seconds=30),
        completion_batch: int = 64,
        completion_wait: timedelta = timedelta(0),
        claim_next: bool = True,
        on_outcome: Callable[[TaskContext, TaskOutcome], None] | None = None,
        retry: RetryPolicy | None = None,
        task_timeout: timedelta | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if ttl <= timedelta(0):
            raise ValueError(f"ttl must be positive, got {ttl}")
        heartbeat_every = ttl / 3 if heartbeat_every is None else heartbeat_every
        if heartbeat_every <= timedelta(0) or poll_interval <= timedelta(0):
            raise ValueError("heartbeat_every and poll_interval must be positive")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ValueError(f"retry must be a RetryPolicy or None, got {type(retry).__name__}")
        if task_timeout is not None and task_timeout <= timedelta(0):
            raise ValueError(f"task_timeout must be positive, got {task_timeout}")
        lease_margin = ttl * _LEASE_MARGIN
        if heartbeat_every >= ttl - lease_margin:
            logger.warning(
                "heartbeat_every (%s) is not below ttl less the lease margin (%s): every task "
                "running longer than that will be stopped as having lost its claim, and run "
                "again",
                heartbeat_every,
                ttl - lease_margin,
            )
        self.backend = backend
        self.worker_id = worker_id or default_worker_id()
        self.threads = threads
        self.ttl = ttl
        self.heartbeat_every = heartbeat_every
        self.lease_margin = lease_margin
        """``ttl / 10``: a task whose renewals fail or hang is stopped this long before the
        earliest moment its claim can expire (see *Leases*)."""
        self.poll_interval = poll_interval
        self.tags = frozenset(tags)
        self.batch_size = threads if batch_size is None else max(1, batch_size)
        self.claim_batch_wait = claim_batch_wait
        self.aging_interval = aging_interval
        self.shutdown_grace = shutdown_grace
        self.stall_sweep_every = stall_sweep_every
        self.claim_next = claim_next
        self.retry = retry
        self.task_timeout = task_timeout
        # What every claim carries to the store (docs/contract.md#attempts-and-deadlines).
        self._max_attempts = None if retry is None else retry.max_attempts
        self._handlers = handlers
        self._advance = advance
        self._on_outcome = on_outcome
        self._metrics = worker_metrics()
        self._completions = Batcher(
            self._record,
            max_size=completion_batch,
            max_wait=completion_wait,
            name=f"sayiir-complete-{self.worker_id}",
        )

        # One condition guards the slots, the held claims and the counters; the claim loop
        # waits on it for an idle thread, for a hint that work is runnable, or for stop().
        self._changed = threading.Condition()
        # Every claim held: tasks running, waiting for a thread, or waiting to be recorded.
        self._running: dict[tuple[str, str, int], _Running] = {}
        # Threads taken: tasks handed to the pool whose function has not returned yet.
        self._busy = 0
        # Threads promised to claim calls in flight (claim loop and completion thread).
        self._reserved = 0
        self._work_hint = False
        self._counts = {outcome: 0 for outcome in TaskOutcome}
        self._claimed = 0
        self._stopping = threading.Event()
        self._heartbeat_stop = threading.Event()
        # Set by a claim whose lease may run out before the heartbeat thread wakes next
        # (the latest moment it will, ``_heartbeat_bound``), so that it looks again.
        self._lease_added = threading.Event()
        self._heartbeat_bound = math.inf
        self._renewals = Renewals(
            stuck_after=heartbeat_every.total_seconds() * _STUCK_RENEWAL,
            name=f"sayiir-renew-{self.worker_id}",
        )
        self._started = False
        self._executor: ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"Worker({self.worker_id!r}, threads={self.threads}, ttl={self.ttl})"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start claiming and running tasks in background threads; returns ``self``."""
        with self._changed:
            if self._started:
                raise RuntimeError(f"{self!r} was already started")
            self._started = True
        self._executor = ThreadPoolExecutor(
            self.threads, thread_name_prefix=f"sayiir-task-{self.worker_id}"
        )
        self._completions.start()
        self._threads = [
            threading.Thread(
                target=self._claim_loop, name=f"sayiir-claim-{self.worker_id}", daemon=True
            ),
            threading.Thread(
                target=self._heartbeat_loop,
                name=f"sayiir-heartbeat-{self.worker_id}",
                daemon=True,
            ),
            threading.Thread(
                target=self._listen_loop, name=f"sayiir-listen-{self.worker_id}", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        self._metrics.watch_queue(self.backend)
        logger.info(
            "worker %s started: %d threads, ttl %s, heartbeat every %s",
            self.worker_id,
            self.threads,
            self.ttl,
            self.heartbeat_every,
        )
        return self

    def stop(self, grace: timedelta | None = None) -> None:
        """Stop claiming, wait up to ``grace`` (default ``shutdown_grace``) for the running
        tasks, record what finished, then release the claims of the tasks still running.

        Released tasks can be claimed by another worker at once. Their functions are told
        through :attr:`TaskContext.claim_lost` and their results are thrown away (Python
        cannot kill a thread: a function that ignores the flag keeps its thread busy until
        it returns). Calling ``stop`` again, or on a worker never started, does nothing.
        A renewal hanging in a silent network does not delay it (its thread is a daemon).
        """
        with self._changed:
            if not self._started or self._stopping.is_set():
                return
            self._stopping.set()
            self._changed.notify_all()
        claim_thread, heartbeat_thread, listen_thread = self._threads
        claim_thread.join()
        listen_thread.join()

        grace = self.shutdown_grace if grace is None else grace
        futures = [r.future for r in self._running_now() if r.future is not None]
        wait_for_futures(futures, timeout=max(grace.total_seconds(), 0.0))
        for running in self._running_now():
            self._release_unfinished(running)
        self._completions.close()  # records what finished (no next claims: stopping)

        # Heartbeats stop last: a task finishing during the grace period kept its claim.
        # The heartbeat thread never calls the store, so this join is quick; a renewal that
        # hangs is left to its daemon thread.
        self._heartbeat_stop.set()
        self._lease_added.set()
        heartbeat_thread.join()
        self._renewals.close()
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._metrics.unwatch_queue(self.backend)
        logger.info("worker %s stopped: %s", self.worker_id, self.stats)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run_until_signalled(
        self, signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    ) -> signal.Signals:
        """Start, run until one of ``signals`` arrives, then :meth:`stop`; returns it.

        The previous handlers are restored afterwards. Python delivers signals to the main
        thread only, so this must be called from it (``RuntimeError`` otherwise).
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("run_until_signalled() must be called from the main thread")
        received: list[signal.Signals] = []
        wake = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            received.append(signal.Signals(signum))
            wake.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in signals}
        try:
            self.start()
            # A timeout keeps the main thread returning to the interpreter, where Python
            # runs signal handlers, whatever the platform's lock implementation.
            while not wake.wait(0.5):
                pass
            logger.info("worker %s received %s, stopping", self.worker_id, received[0].name)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return received[0]

    @property
    def stats(self) -> WorkerStats:
        """A consistent copy of the counters."""
        with self._changed:
            return WorkerStats(
                claimed=self._claimed,
                **{outcome.value: count for outcome, count in self._counts.items()},
            )

    @property
    def running_count(self) -> int:
        """How many tasks are running now (functions not yet returned)."""
        with self._changed:
            return self._busy

    # -- threads: who may claim for how many ------------------------------------------------

    def _free(self) -> int:
        """Idle threads no claim call has been promised (call with ``_changed`` held)."""
        return self.threads - self._busy - self._reserved

    def _reserve(self, wanted: int) -> int:
        """Promise up to ``wanted`` idle threads to a claim call (call with ``_changed``)."""
        granted = max(0, min(wanted, self._free()))
        self._reserved += granted
        return granted

    def _take(self, reserved: int, claimed: list[ClaimedTask]) -> None:
        """A claim call promised ``reserved`` threads returned ``claimed``: they hold threads
        now, the rest go back (call with ``_changed`` held)."""
        self._reserved -= reserved
        self._busy += len(claimed)
        self._claimed += len(claimed)
        self._changed.notify_all()
        self._metrics.claimed(len(claimed))

    # -- claiming -------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        backoff = _MIN_BACKOFF_SECONDS
        poll = self.poll_interval.total_seconds()
        next_sweep = time.monotonic()
        while True:
            idle = self._wait_for_idle_thread()
            if idle == 0:
                return  # stopping
            if time.monotonic() >= next_sweep:
                # On this thread, not the heartbeat's: a slow sweep may delay claiming new
                # work, never the renewal of the claims already held.
                self._sweep_stalled_forks()
                self._fail_overdue()
                next_sweep = time.monotonic() + self.stall_sweep_every.total_seconds()
            claimed: list[ClaimedTask] = []
            sent_at = time.monotonic()  # the leases of the claims start here (see Lease)
            try:
                claimed = self.backend.claim_available_tasks(
                    self.worker_id,
                    idle,
                    self.ttl,
                    tags=self.tags,
                    aging_interval=self.aging_interval,
                    max_attempts=self._max_attempts,
                    timeout=self.task_timeout,
                )
                self._metrics.claim_took(time.monotonic() - sent_at)
            except Exception as error:
                self._metrics.claim_took(time.monotonic() - sent_at)
                # Never let the loop die: a worker that silently stops claiming is worse
                # than one that logs and retries.
                log = logger.warning if isinstance(error, PersistenceError) else logger.exception
                log("worker %s could not claim tasks (%s); retrying", self.worker_id, error)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                continue
            finally:
                with self._changed:
                    self._take(idle, claimed)
            backoff = _MIN_BACKOFF_SECONDS
            for claimed_task in claimed:
                self._submit(claimed_task, sent_at)
            if claimed:
                poll = self.poll_interval.total_seconds() / _POLL_SPEEDUP
            else:
                self._idle_wait(poll)
                poll = min(poll * 2, self.poll_interval.total_seconds())

    def _wait_for_idle_thread(self) -> int:
        """Block until a thread is idle or the worker stops; the idle threads now promised
        to the claim loop (0 when stopping)."""
        with self._changed:
            while True:
                self._changed.wait_for(lambda: self._stopping.is_set() or self._free() > 0)
                # One claim call for several threads costs about as much as for one: when
                # only some threads are idle, give the others a moment to finish too.
                self._changed.wait_for(
                    lambda: self._stopping.is_set() or self._free() >= self.batch_size,
                    self.claim_batch_wait.total_seconds(),
                )
                if self._stopping.is_set():
                    return 0
                # The completion thread may have promised the idle threads meanwhile.
                reserved = self._reserve(self.batch_size)
                if reserved:
                    self._work_hint = False
                    return reserved

    def _listen_loop(self) -> None:
        """Turn the store's announcements of work into a hint for the claim loop."""
        try:
            waiter = self.backend.work_waiter()
        except Exception:
            logger.exception("worker %s cannot wait for announcements; polling", self.worker_id)
            return
        try:
            while not self._stopping.is_set():
                if waiter.wait(_LISTEN_SECONDS):
                    with self._changed:
                        self._work_hint = True
                        self._changed.notify_all()
        finally:
            waiter.close()

    def _idle_wait(self, seconds: float) -> None:
        # Nothing to claim: wait (with jitter, so that workers started together do not poll
        # in lockstep), unless one of our completions may have made a task runnable.
        timeout = seconds * random.uniform(0.8, 1.2)
        with self._changed:
            self._changed.wait_for(lambda: self._stopping.is_set() or self._work_hint, timeout)

    def _submit(self, claimed: ClaimedTask, sent_at: float) -> None:
        """Hand a claimed task (its thread already counted busy) to the pool; ``sent_at``:
        when the call that claimed it was sent (``time.monotonic()``)."""
        lease = Lease.of_claim(claimed.claim, sent_at, self.lease_margin.total_seconds())
        span = start_task_span(claimed, self.worker_id)
        context = TaskContext(self.backend, claimed, self.worker_id, lease=lease)
        handler = self._find(self._handlers, context.task_id)
        advance = self._find(self._advance, context.definition_hash)
        if handler is None or advance is None:
            logger.error(
                "worker %s has no %s for task %r of definition %r (instance %r); leaving "
                "the claim to expire so that another worker can take it. Route tasks to "
                "workers with tags.",
                self.worker_id,
                "task function" if handler is None else "advance function",
                context.task_id,
                context.definition_hash,
                context.instance_id,
            )
            with self._changed:
                self._busy -= 1
                self._changed.notify_all()
            if span is not None:
                span.end(TaskOutcome.UNHANDLED.value)
            self._report(context, TaskOutcome.UNHANDLED)
            return
        # The token is part of the key: after a takeover the same worker may run the same
        # task again while its stale execution has not returned yet.
        running = _Running(
            context,
            advance,
            (context.instance_id, context.task_id, context.claim.token),
            span=span,
        )
        assert self._executor is not None
        with self._changed:
            self._running[running.key] = running
            # Submitted under the lock so that stop() never sees an entry without a future.
            running.future = self._executor.submit(self._execute, running, handler)
        if lease.held_until < self._heartbeat_bound:
            self._lease_added.set()  # rare: heartbeat_every near the TTL, or a near deadline

    @staticmethod
    def _find(table: Mapping[str, _T] | _T, key: str) -> _T | None:
        if isinstance(table, Mapping):
            return table.get(key)
        return table

    # -- executing ------------------------------------------------------------------------

    def _execute(self, running: _Running, handler: TaskFunction) -> None:
        context = running.context
        span = running.span
        try:
            started = time.perf_counter()
            try:
                try:
                    # With the span current, the task function's backend calls are its
                    # children.
                    output = (
                        handler(context)
                        if span is None
                        else span.run_in(functools.partial(handler, context))
                    )
                finally:
                    self._metrics.task_took(time.perf_counter() - started)
                if not isinstance(output, bytes):
                    raise TypeError(
                        f"task function returned {type(output).__name__}, expected bytes"
                    )
            except Exception as error:
                retry_after = self._retry_after(context, error)
                # A failure with another attempt to come is expected: a warning.
                logger.log(
                    logging.ERROR if retry_after is None else logging.WARNING,
                    "%r: task function failed (attempt %d%s): %r",
                    context,
                    context.claim.attempt,
                    "" if retry_after is None else f", retried in {retry_after}",
                    error,
                    exc_info=error,
                )
                self._finish(
                    running, error=f"task {context.task_id!r}: {error!r}", retry_after=retry_after
                )
            else:
                if len(output) > self.backend.max_payload_bytes:
                    self._finish(
                        running,
                        error=f"task {context.task_id!r}: its output is {len(output)} bytes, "
                        f"above max_payload_bytes ({self.backend.max_payload_bytes})",
                    )
                else:
                    self._finish(running, output=output)
        finally:
            with self._changed:
                self._busy -= 1
                self._changed.notify_all()

    def _retry_after(self, context: TaskContext, error: Exception) -> timedelta | None:
        """How long until the next attempt of a task that raised (``None``: no retry)."""
        attempt = context.claim.attempt
        if self.retry is None or not self.retry.retries(error, attempt):
            return None
        return self.retry.delay_after(attempt)

    def _finish(
        self,
        running: _Running,
        *,
        output: bytes | None = None,
        error: str | None = None,
        retry_after: timedelta | None = None,
    ) -> None:
        """Queue the outcome for the completion thread, unless stop() released the claim."""
        context = running.context
        with running.finish_lock:
            if running.finished.is_set():
                return  # stop() released the claim already and reported the outcome
            if context.claim_lost.is_set():
                # Whatever the function returned or raised: another worker may own the task.
                logger.info("%r: claim lost (%s), result dropped", context, context.lost_reason)
                self._end(running, TaskOutcome.LOST)
                return
            running.completing = True
        self._completions.put(
            _Finished(running, output=output, error=error, retry_after=retry_after)
        )

    # -- recording (the completion thread) ----------------------------------------------

    def _record(self, batch: list[_Finished]) -> None:
        """Record a batch of outcomes in one ``complete_tasks`` call (the Batcher's flush)."""
        # Threads promised to the next claims are kept from the claim loop during the write:
        # promise about one per completion (a chain's next step), not every idle thread.
        with self._changed:
            budget = (
                0 if self._stopping.is_set() or not self.claim_next else self._reserve(len(batch))
            )
        answer: tuple[list[CompletionResult], float] | None = None
        try:
            answer = self._complete(batch, budget)
        finally:
            results, sent_at = answer or (None, 0.0)
            next_tasks = [task for result in results or () for task in result.next_tasks]
            with self._changed:
                self._take(budget, next_tasks)
        for task in next_tasks:
            self._submit(task, sent_at)
        if results is None:
            for finished in batch:
                self._give_up(finished.running)
            return
        retry: list[_Finished] = []
        for finished, result in zip(batch, results, strict=True):
            if result.outcome is CompletionOutcome.ADVANCE_FAILED:
                context = finished.running.context
                logger.error("%r: advance function failed: %s", context, result.error)
                message = f"advancing past task {context.task_id!r}: {result.error}"
                retry.append(_Finished(finished.running, error=message))
                continue
            if result.outcome not in _WRITTEN:
                reason = result.outcome.value.replace("_", " ")
                finished.running.context._lose(f"the fenced save was refused ({reason})")
            self._end(finished.running, _outcome(finished, result))
        for finished in retry:
            self._completions.put(finished)
        if any(result.outcome is CompletionOutcome.RECORDED for result in results):
            # A completion may have made tasks runnable that no idle thread took here.
            with self._changed:
                self._work_hint = True
                self._changed.notify_all()

    def _complete(
        self, batch: list[_Finished], claim_next: int
    ) -> tuple[list[CompletionResult], float] | None:
        """``complete_tasks`` for the batch, repeated while the store is unreachable (safe:
        see ``_COMPLETION_ATTEMPTS``): its results and when the call that answered was sent
        (the leases of the next claims start there); ``None`` if it never answered."""
        completions = [
            TaskCompletion(
                f.running.context.instance_id,
                f.running.context.task_id,
                self.worker_id,
                f.running.context.claim.token,
                output=f.output,
                error=f.error,
                advance=f.running.advance,
                retry_after=f.retry_after,
            )
            for f in batch
        ]
        backoff = _MIN_BACKOFF_SECONDS
        attempt = 0
        while True:
            attempt += 1
            sent_at = time.monotonic()
            try:
                results = self.backend.complete_tasks(
                    completions,
                    ttl=self.ttl,
                    claim_next=claim_next,
                    max_attempts=self._max_attempts,
                    timeout=self.task_timeout,
                )
                return results, sent_at
            except InvalidInputError:
                # Not expected (outputs are checked before): record one by one, so that one
                # bad completion cannot hold the others back (no next claims).
                logger.exception("worker %s: a completion batch was refused", self.worker_id)
                return [self._complete_alone(c) for c in completions], sent_at
            except PersistenceError as error:
                holds = _lease_holds(batch, time.monotonic() + backoff)
                logger.warning(
                    "worker %s could not record %d result(s) (%s); attempt %d%s",
                    self.worker_id,
                    len(batch),
                    error,
                    attempt,
                    ", repeated while a lease holds" if holds else "",
                )
                if attempt >= _COMPLETION_ATTEMPTS and not holds:
                    return None
                time.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
            except Exception:
                # A bug (ours or the store's): give the tasks back rather than lose them.
                logger.exception("worker %s: unexpected error while recording", self.worker_id)
                return None

    def _complete_alone(self, completion: TaskCompletion) -> CompletionResult:
        try:
            [result] = self.backend.complete_tasks([completion], ttl=self.ttl)
            return result
        except InvalidInputError as invalid:
            failure = TaskCompletion(
                completion.instance_id,
                completion.task_id,
                completion.worker_id,
                completion.token,
                error=f"task {completion.task_id!r}: {invalid}",
            )
            [result] = self.backend.complete_tasks([failure], ttl=self.ttl)
            return result

    def _give_up(self, running: _Running) -> None:
        """The store never answered: give the claim back (likely refused too: it expires)."""
        self._release(running.context)
        self._end(running, TaskOutcome.RELEASED)

    def _end(self, running: _Running, outcome: TaskOutcome) -> None:
        """The execution is over: forget the claim and report how it ended."""
        context = running.context
        running.finished.set()
        with self._changed:
            self._running.pop(running.key, None)
        if running.span is not None:
            running.span.end(outcome.value)
        self._report(context, outcome)

    def _release(self, context: TaskContext) -> None:
        try:
            self.backend.release_task_claim(
                context.instance_id, context.task_id, self.worker_id, token=context.claim.token
            )
        except (NotFoundError, ClaimLostError) as gone:
            # Dropped by a cancel/pause or taken over: not ours to release any more.
            logger.debug("%r: claim already gone on release (%s)", context, gone)
        except PersistenceError as error:
            logger.warning(
                "%r: could not release the claim (%s); it expires by itself", context, error
            )

    def _release_unfinished(self, running: _Running) -> None:
        """stop(): give back the claim of a task that did not finish within the grace."""
        with running.finish_lock:
            if running.finished.is_set() or running.completing:
                return  # over, or waiting to be recorded (the completion thread does it)
            running.finished.set()
            running.context._lose("the worker stopped before the task finished")
            self._release(running.context)
        logger.warning("%r: still running at shutdown, claim released", running.context)
        self._end(running, TaskOutcome.RELEASED)

    def _report(self, context: TaskContext, outcome: TaskOutcome) -> None:
        with self._changed:
            self._counts[outcome] += 1
        self._metrics.ended(outcome.value)
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(context, outcome)
        except Exception:
            logger.exception("on_outcome failed for %r (%s)", context, outcome.value)

    def _running_now(self) -> list[_Running]:
        with self._changed:
            return list(self._running.values())

    # -- stalled forks ----------------------------------------------------------------------

    def _fail_overdue(self) -> None:
        """Fail the workflows past their deadline (``WorkflowSnapshot.deadline``)."""
        try:
            failed = self.backend.fail_overdue_workflows(limit=_SWEEP_LIMIT)
        except PersistenceError as error:
            logger.warning("worker %s could not fail overdue workflows (%s)", self.worker_id, error)
            return
        for instance_id in failed:
            logger.warning("worker %s: workflow %r timed out, failed", self.worker_id, instance_id)

    def _sweep_stalled_forks(self) -> None:
        """Move on the workflows left at a completed fork (see ``stall_sweep_every``)."""
        try:
            stalled = self.backend.list_stalled_forks(limit=_SWEEP_LIMIT)
        except PersistenceError as error:
            logger.warning("worker %s could not look for stalled forks (%s)", self.worker_id, error)
            return
        for instance_id in stalled:
            try:
                snapshot = self.backend.load_snapshot(instance_id)
                advance = self._find(self._advance, snapshot.definition_hash)
                if advance is None:
                    continue  # another worker's definition: its own workers sweep it
                logger.info(
                    "worker %s: moving %r past its completed fork", self.worker_id, instance_id
                )
                self._settle(instance_id, advance)
            except PersistenceError as error:
                logger.warning(
                    "worker %s: could not move %r on (%s)", self.worker_id, instance_id, error
                )
            except Exception:
                # The advance function is user code: its failure must not stop the claim loop.
                logger.exception("worker %s: could not move %r on", self.worker_id, instance_id)

    def _settle(self, instance_id: str, advance: Advance) -> None:
        """Move a workflow past a join whose branches are all completed.

        Not fenced (no claim covers the join); ``expected_version`` makes it safe instead:
        if anyone saved in between, we re-read and decide again.
        """
        for _ in range(_SETTLE_ATTEMPTS):
            snapshot = self.backend.load_snapshot(instance_id)
            if snapshot.status is not WorkflowStatus.IN_PROGRESS:
                return
            before = snapshot.position
            advance(snapshot)
            if snapshot.status is WorkflowStatus.IN_PROGRESS and snapshot.position == before:
                return  # a branch is still running: its completion will move it on
            try:
                self.backend.save_snapshot(snapshot, expected_version=snapshot.version)
                return
            except WorkflowTerminalError:
                return
            except ConflictError:
                continue  # somebody saved meanwhile: re-read
        logger.warning("gave up moving %r past its join after repeated conflicts", instance_id)

    # -- heartbeat ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Every ``heartbeat_every``, queue the renewal of every live claim; in between,
        wake when a lease runs out or a renewal may be stuck. Never calls the store."""
        interval = self.heartbeat_every.total_seconds()
        next_beat = time.monotonic() + interval
        while not self._heartbeat_stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._queue_renewals()
                next_beat = now + interval
            # Published before the claims are read: a claim added from here on whose lease
            # ends earlier wakes this thread (see _submit); one added before is read below.
            self._heartbeat_bound = next_beat
            self._lease_added.clear()
            wake = min(next_beat, self._stop_expired_leases(now))
            stuck_check = self._renewals.check(now)
            if stuck_check is not None:
                wake = min(wake, stuck_check)
            self._lease_added.wait(max(wake - time.monotonic(), 0.0))

    def _queue_renewals(self) -> None:
        for running in self._running_now():
            if not running.finished.is_set() and not running.context.claim_lost.is_set():
                # Skipped while this claim's previous renewal is still queued or running.
                self._renewals.submit(running.key, functools.partial(self._beat, running))

    def _stop_expired_leases(self, now: float) -> float:
        """Mark lost the claims of running tasks whose lease ran out; returns when the
        earliest lease still held runs out (``math.inf``: none)."""
        earliest = math.inf
        for running in self._running_now():
            context = running.context
            if running.finished.is_set() or running.completing or context.claim_lost.is_set():
                continue  # over, or up to the completion's fenced save to decide
            lease = context._current_lease
            if not lease.ran_out(now):
                earliest = min(earliest, lease.held_until)
                continue
            reason = (
                f"lease ran out: the claim's deadline (task_timeout) is less than the lease "
                f"margin ({self.lease_margin}) away"
                if lease.at_deadline
                else f"lease ran out: no renewal of the claim succeeded in time (ttl {self.ttl}"
                f", lease margin {self.lease_margin}); it may expire any moment"
            )
            if context._lose(reason):
                logger.warning("%r: claim lost (%s)", context, reason)
        return earliest

    def _beat(self, running: _Running) -> None:
        """Renew one claim (on a renewal thread); on loss tell the task; on a pending signal
        apply it."""
        context = running.context
        sent_at = time.monotonic()  # the renewed lease starts here (see Lease)
        try:
            claim = self.backend.extend_task_claim(
                context.instance_id,
                context.task_id,
                self.worker_id,
                self.ttl,
                token=context.claim.token,
            )
        except (ClaimLostError, NotFoundError) as lost:
            if running.finished.is_set() or running.completing:
                return  # recorded (and released) meanwhile, or the completion will tell
            if context._lose(f"heartbeat: {lost}"):
                logger.warning("%r: claim lost (%s)", context, lost)
            return
        except PersistenceError as error:
            # The claim is still ours until its lease runs out; the next beat retries.
            logger.warning("%r: heartbeat failed (%s)", context, error)
            return
        lease = context._current_lease.renewed(
            sent_at, self.ttl.total_seconds(), self.lease_margin.total_seconds()
        )
        context._renewed(claim, lease)
        if claim.pending_signals:
            self._apply_signals(context, claim.pending_signals)

    def _apply_signals(self, context: TaskContext, kinds: frozenset[SignalKind]) -> None:
        # Cancel wins over pause. Applying drops every claim of the instance, so the tasks
        # of that instance running here must stop; whether we or another worker applied it.
        try:
            if SignalKind.CANCEL in kinds:
                self.backend.check_and_cancel(context.instance_id)
                reason = "the workflow was cancelled"
            else:
                self.backend.check_and_pause(context.instance_id)
                reason = "the workflow was paused"
        except PersistenceError as error:
            logger.warning("%r: could not apply %s (%s)", context, sorted(kinds), error)
            return
        logger.info("%r: %s", context, reason)
        for running in self._running_now():
            if running.context.instance_id == context.instance_id:
                running.context._lose(reason)


# Outcomes of a completion that wrote what the execution left (a result, a failure, a retry).
_WRITTEN = frozenset({CompletionOutcome.RECORDED, CompletionOutcome.RETRY_SCHEDULED})


def _lease_holds(batch: list[_Finished], at: float) -> bool:
    """Whether the worker's lease on one of the batch's claims still holds at ``at`` (a
    claim that never expires counts as not: repeating for ever would hang ``stop()``)."""
    return any(
        math.isfinite(lease.held_until) and not lease.ran_out(at)
        for lease in (finished.running.context._current_lease for finished in batch)
    )


def _outcome(finished: _Finished, result: CompletionResult) -> TaskOutcome:
    if result.outcome is CompletionOutcome.RETRY_SCHEDULED:
        return TaskOutcome.RETRYING
    if result.outcome is CompletionOutcome.RECORDED:
        return TaskOutcome.RECORDED if finished.error is None else TaskOutcome.FAILED
    logger.info(
        "%r: result dropped (%s)", finished.running.context, result.outcome.value.replace("_", " ")
    )
    return TaskOutcome.LOST
