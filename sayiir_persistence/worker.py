"""A reference worker: claim tasks, run them on a thread pool, record results under fencing.

This module is meant to be read (and copied) as much as used. It shows the one safe way to
drive a :class:`~sayiir_persistence.PersistentBackend` from many threads and processes::

    claim_available_tasks -> run the task function -> load, advance, fenced save -> release
                 ^                       |
                 |        heartbeat: extend_task_claim every ttl/3
                 |        (claim lost? the result is thrown away, never saved)

A minimal worker for a three-step workflow::

    from sayiir_persistence.worker import Pipeline, Worker

    orders = Pipeline("validate", ("reserve_stock", "charge_payment"), "ship")
    handlers = {
        "validate": validate,            # each: Callable[[TaskContext], bytes]
        "reserve_stock": reserve_stock,
        "charge_payment": charge_payment,
        "ship": ship,
    }
    backend.save_snapshot(orders.start("order-1", "orders-v1", initial_input=b"{...}"))
    Worker(backend, handlers, orders, threads=8).run_until_signalled()

Guarantees, and where they come from:

- A task's result is recorded at most once: the result is written with
  :meth:`~sayiir_persistence.PersistentBackend.save_snapshot_fenced`, which the store refuses
  unless this worker still holds a live claim with the same fencing token.
- Work is not lost when a worker dies: its claims expire after ``ttl`` and another worker
  takes the task over (with a greater token). So a task *function* may run more than once
  (at-least-once execution); make external side effects idempotent, e.g. keyed by
  ``f"{ctx.instance_id}/{ctx.task_id}"``.
- A slow task keeps its claim: a heartbeat thread renews every live claim every
  ``heartbeat_every`` (default ``ttl / 3``, so two beats may fail before the claim expires).
- A fork is joined even when the worker that saved its last branch dies before moving the
  workflow on (two branches saved at the same moment each see the other unfinished and
  leave the move to a second step): every ``stall_sweep_every`` the worker asks the store
  for such stalled forks (:meth:`~sayiir_persistence.PersistentBackend.list_stalled_forks`)
  and moves on those it has an advance function for.
- A clean stop (:meth:`Worker.stop`, SIGINT/SIGTERM in :meth:`Worker.run_until_signalled`)
  waits a bounded time for running tasks and then releases the claims of the unfinished
  ones, so other workers retry them at once instead of after the TTL.

How a workflow moves on is the user's decision, expressed as an *advance* function (see
:data:`Advance`; :class:`Pipeline` builds one for chains with fork/join steps). The worker
records the finished task's output and then calls it: it is a function of the stored state
(position and completed tasks), not of the event "task X finished", so that it can be called
again after a race between parallel branches and still give the right answer.
"""

from __future__ import annotations

import logging
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
from enum import StrEnum
from types import FrameType, TracebackType
from typing import Self, TypeVar

from .backend import DEFAULT_AGING_INTERVAL, PersistentBackend
from .errors import (
    BackendUnavailableError,
    ClaimLostError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PersistenceError,
    WorkflowTerminalError,
)
from .model import (
    AtFork,
    AtTask,
    AvailableTask,
    ClaimedTask,
    Position,
    SignalKind,
    TaskClaim,
    WorkflowSnapshot,
    WorkflowStatus,
)

__all__ = [
    "Advance",
    "Pipeline",
    "TaskContext",
    "TaskFunction",
    "TaskOutcome",
    "Worker",
    "WorkerStats",
    "default_worker_id",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

TaskFunction = Callable[["TaskContext"], bytes]
"""Runs one task: gets its context (input, claim, ...) and returns the task's output."""

Advance = Callable[[WorkflowSnapshot], None]
"""Moves a snapshot past its current position when that position is finished.

Called by the worker after it marked a task completed in the snapshot, and again (on a fresh
load) when parallel branches may have finished concurrently. It must decide from the snapshot
alone (``position`` and ``completed_tasks``): move on with ``move_to`` / ``mark_completed`` /
``mark_failed`` when every task of the current position is completed, do nothing otherwise.
It must be deterministic: two workers calling it on the same state must agree.
"""

# How often the worker re-reads a workflow whose concurrent saves kept conflicting while it
# tried to move it past a join; each conflict means somebody else moved it, so a few suffice.
_SETTLE_ATTEMPTS = 10
# Most stalled forks one sweep moves on (the next sweep takes the rest).
_SWEEP_LIMIT = 100
# Back-off after the store was unreachable, doubled up to the maximum.
_MIN_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 5.0


def default_worker_id() -> str:
    """``host-pid-random``: unique per worker object, readable in claims and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------------
# Workflow shape


@dataclass(frozen=True, init=False)
class Pipeline:
    """A workflow shape: steps run in order; a step is a task id, or a tuple of task ids that
    run in parallel (a fork) and are all joined before the next step.

    ``Pipeline("validate", ("reserve", "charge"), "ship")`` is an :data:`Advance` (call it
    with a snapshot) and makes new snapshots with :meth:`start`. The workflow completes with
    the output of the last task completed in the last step.

    The task after a fork receives the output of the branch that finished last as its
    input (see ``AvailableTask.input``); read the others with :meth:`TaskContext.result_of`.
    """

    steps: tuple[str | tuple[str, ...], ...]

    def __init__(self, *steps: str | tuple[str, ...]) -> None:
        if not steps:
            raise ValueError("a Pipeline needs at least one step")
        seen: set[str] = set()
        for step in steps:
            task_ids = (step,) if isinstance(step, str) else step
            if not task_ids or any(not isinstance(t, str) for t in task_ids):
                raise ValueError(f"a step is a task id or a non-empty tuple of them: {step!r}")
            if seen & set(task_ids) or len(set(task_ids)) != len(task_ids):
                raise ValueError(f"task ids must be unique in a Pipeline: {step!r}")
            seen.update(task_ids)
        object.__setattr__(self, "steps", tuple(steps))

    def position_of(self, index: int) -> Position:
        """The position that runs step ``index``."""
        step = self.steps[index]
        if isinstance(step, str):
            return AtTask(step)
        return AtFork(f"step-{index}", step)

    def start(
        self,
        instance_id: str,
        definition_hash: str,
        *,
        initial_input: bytes | None = None,
        priority: int = 3,
        tags: Iterable[str] = (),
    ) -> WorkflowSnapshot:
        """A new snapshot positioned at the first step (save it to start the workflow)."""
        snapshot = WorkflowSnapshot.new(
            instance_id,
            definition_hash,
            initial_input=initial_input,
            priority=priority,
            tags=frozenset(tags),
        )
        snapshot.move_to(self.position_of(0))
        return snapshot

    def __call__(self, snapshot: WorkflowSnapshot) -> None:
        """Advance ``snapshot`` if every task of its current step is completed."""
        index = self._current_step(snapshot.position)
        if index is None or snapshot.status is not WorkflowStatus.IN_PROGRESS:
            return
        step = self.steps[index]
        task_ids = (step,) if isinstance(step, str) else step
        if not all(task_id in snapshot.completed_tasks for task_id in task_ids):
            return  # a sibling branch is still running; whoever finishes last moves on
        if index + 1 < len(self.steps):
            snapshot.move_to(self.position_of(index + 1))
        else:
            last = snapshot.last_completed_task_id
            assert last is not None  # a task of this step just completed
            snapshot.mark_completed(snapshot.completed_tasks[last])

    def _current_step(self, position: Position) -> int | None:
        for index in range(len(self.steps)):
            if self.position_of(index) == position:
                return index
        return None


# --------------------------------------------------------------------------------------------
# What a task function sees


class TaskContext:
    """The context of one execution of a task, passed to its :data:`TaskFunction`.

    A long task should check :attr:`claim_lost` (or call :meth:`raise_if_lost`) from time to
    time: once it is set, another worker may already be running the same task and this
    execution's result will be thrown away.
    """

    def __init__(self, backend: PersistentBackend, claimed: ClaimedTask, worker_id: str) -> None:
        self.task: AvailableTask = claimed.task
        """The task as it was claimed (ids, input, priority, tags)."""
        self.worker_id = worker_id
        self.execution_id = uuid.uuid4().hex
        """Unique per execution: a re-run of the same task after a takeover gets a new one."""
        self.claim_lost = threading.Event()
        """Set when the claim was lost (expired and taken over, cancelled, paused, or the
        worker stopped): stop working, the result will not be saved."""
        self._backend = backend
        self._lock = threading.Lock()
        self._claim = claimed.claim
        self._lost_reason: str | None = None

    @property
    def instance_id(self) -> str:
        return self.task.instance_id

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def definition_hash(self) -> str:
        return self.task.definition_hash

    @property
    def input(self) -> bytes | None:
        """The initial input, or the output of the task completed before this position."""
        return self.task.input

    @property
    def claim(self) -> TaskClaim:
        """The latest view of this execution's claim (renewed by each heartbeat)."""
        with self._lock:
            return self._claim

    @property
    def lost_reason(self) -> str | None:
        """Why the claim was lost, ``None`` while it is held."""
        with self._lock:
            return self._lost_reason

    def result_of(self, task_id: str) -> bytes | None:
        """The stored output of another task of this workflow (``None``: not completed)."""
        return self._backend.load_task_result(self.instance_id, task_id)

    def raise_if_lost(self) -> None:
        """Raise :class:`~sayiir_persistence.ClaimLostError` if the claim was lost."""
        if self.claim_lost.is_set():
            raise ClaimLostError(
                f"task {self.task_id!r} of {self.instance_id!r}: {self.lost_reason}"
            )

    def __repr__(self) -> str:
        return (
            f"TaskContext({self.instance_id!r}, {self.task_id!r}, "
            f"token={self.claim.token}, worker={self.worker_id!r})"
        )

    # The worker's side: only it updates the claim and declares it lost.

    def _renewed(self, claim: TaskClaim) -> None:
        with self._lock:
            self._claim = claim

    def _lose(self, reason: str) -> bool:
        """Mark the claim lost; ``False`` if it already was (the first reason is kept)."""
        with self._lock:
            if self._lost_reason is not None:
                return False
            self._lost_reason = reason
        self.claim_lost.set()
        return True


class TaskOutcome(StrEnum):
    """How one execution of a task ended, as reported to ``on_outcome``."""

    RECORDED = "recorded"
    """The output was saved (fenced) and the workflow moved on."""
    FAILED = "failed"
    """The task function raised (or returned something other than bytes): the workflow was
    marked failed."""
    LOST = "lost"
    """The claim was lost before the result could be saved (expired and taken over, cancelled,
    paused, or the fenced save was refused): nothing was written."""
    RELEASED = "released"
    """Not recorded, and the claim was given back so that another worker runs the task again
    (the worker stopped first, or the store could not be reached to save the result)."""
    UNHANDLED = "unhandled"
    """No task function or advance function for this task: the claim is left to expire, so
    a worker that knows the task can take it (route tasks with tags to avoid this)."""


@dataclass(frozen=True)
class WorkerStats:
    """Counters of a worker since it was created, one per :class:`TaskOutcome`."""

    claimed: int = 0
    recorded: int = 0
    failed: int = 0
    lost: int = 0
    released: int = 0
    unhandled: int = 0


@dataclass
class _Running:
    """A claimed task handed to the pool, and who gets to finish it."""

    context: TaskContext
    advance: Advance
    key: tuple[str, str, int]
    # Taken by whoever ends the execution (the task's thread saving its result, or stop()
    # releasing the claim) so that exactly one of them does, never both.
    finish_lock: threading.Lock = field(default_factory=threading.Lock)
    finished: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None


# --------------------------------------------------------------------------------------------
# The worker


class Worker:
    """Runs the tasks of a store on a pool of threads; see the module documentation.

    Args:
        backend: the store, shared by every thread of this worker (backends are thread-safe).
        handlers: the task functions by task id, or one function that dispatches on
            ``ctx.definition_hash`` / ``ctx.task_id``.
        advance: how workflows move on after a task completed (an :data:`Advance`, e.g. a
            :class:`Pipeline`), or one per ``definition_hash``.
        worker_id: the id the claims are held under; unique per worker (default
            :func:`default_worker_id`).
        threads: how many tasks run at once. The worker never claims more tasks than it has
            idle threads, so a claimed task never waits in a queue while its TTL runs.
        ttl: how long a claim lives without a heartbeat: how long the tasks of a crashed
            worker wait before another worker takes them over.
        heartbeat_every: how often every running task's claim is renewed (default
            ``ttl / 3``). Keep it well below ``ttl``.
        poll_interval: how long an idle worker waits before looking for tasks again (it
            looks at once when one of its own tasks finishes, since that often makes the
            next task of the workflow runnable).
        tags: the worker's tags; it runs the tasks of workflows whose tags are a subset.
        batch_size: most tasks claimed in one call (default ``threads``).
        claim_batch_wait: when fewer than ``batch_size`` threads are idle, how long to wait
            for more to become idle before claiming, so that one claim call serves several
            threads. Each claim is a write transaction: under load (above all on SQLite,
            whose writers take turns) fewer, larger claims leave more room for the rest.
        aging_interval: passed to ``claim_available_tasks`` (priority aging).
        shutdown_grace: how long :meth:`stop` waits for running tasks before releasing
            their claims.
        stall_sweep_every: how often to look for forks whose branches are all completed
            but whose workflow was not moved on (its last branch's worker died in between);
            the first look comes at start, the next ones when a thread is idle.
        on_outcome: called after each execution with its context and :class:`TaskOutcome`
            (metrics, audit logs); exceptions it raises are logged and ignored. It runs on
            the worker's threads: keep it short and thread-safe.
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
        on_outcome: Callable[[TaskContext, TaskOutcome], None] | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if ttl <= timedelta(0):
            raise ValueError(f"ttl must be positive, got {ttl}")
        heartbeat_every = ttl / 3 if heartbeat_every is None else heartbeat_every
        if heartbeat_every <= timedelta(0) or poll_interval <= timedelta(0):
            raise ValueError("heartbeat_every and poll_interval must be positive")
        if heartbeat_every >= ttl:
            logger.warning(
                "heartbeat_every (%s) is not below ttl (%s): claims will expire while their "
                "tasks run, and other workers will take them over",
                heartbeat_every,
                ttl,
            )
        self.backend = backend
        self.worker_id = worker_id or default_worker_id()
        self.threads = threads
        self.ttl = ttl
        self.heartbeat_every = heartbeat_every
        self.poll_interval = poll_interval
        self.tags = frozenset(tags)
        self.batch_size = threads if batch_size is None else max(1, batch_size)
        self.claim_batch_wait = claim_batch_wait
        self.aging_interval = aging_interval
        self.shutdown_grace = shutdown_grace
        self.stall_sweep_every = stall_sweep_every
        self._handlers = handlers
        self._advance = advance
        self._on_outcome = on_outcome

        # One condition guards the running set and the counters; the claim loop waits on it
        # for an idle thread, for one of our tasks to finish, or for stop().
        self._changed = threading.Condition()
        self._running: dict[tuple[str, str, int], _Running] = {}
        self._finished_since_claim = False
        self._counts = {outcome: 0 for outcome in TaskOutcome}
        self._claimed = 0
        self._stopping = threading.Event()
        self._heartbeat_stop = threading.Event()
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
        self._threads = [
            threading.Thread(
                target=self._claim_loop, name=f"sayiir-claim-{self.worker_id}", daemon=True
            ),
            threading.Thread(
                target=self._heartbeat_loop,
                name=f"sayiir-heartbeat-{self.worker_id}",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
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
        tasks, then release the claims of those still running.

        Released tasks can be claimed by another worker at once. Their functions are told
        through :attr:`TaskContext.claim_lost` and their results are thrown away (Python
        cannot kill a thread: a function that ignores the flag keeps its thread busy until
        it returns). Calling ``stop`` again, or on a worker never started, does nothing.
        """
        with self._changed:
            if not self._started or self._stopping.is_set():
                return
            self._stopping.set()
            self._changed.notify_all()
        claim_thread, heartbeat_thread = self._threads
        claim_thread.join()

        grace = self.shutdown_grace if grace is None else grace
        futures = [r.future for r in self._running_now() if r.future is not None]
        wait_for_futures(futures, timeout=max(grace.total_seconds(), 0.0))
        for running in self._running_now():
            self._release_unfinished(running)

        # Heartbeats stop last: a task finishing during the grace period kept its claim.
        self._heartbeat_stop.set()
        heartbeat_thread.join()
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)
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
        """How many tasks are running now."""
        with self._changed:
            return len(self._running)

    # -- claiming -------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        backoff = _MIN_BACKOFF_SECONDS
        next_sweep = time.monotonic()
        while True:
            idle = self._wait_for_idle_thread()
            if idle == 0:
                return  # stopping
            if time.monotonic() >= next_sweep:
                # On this thread, not the heartbeat's: a slow sweep may delay claiming new
                # work, never the renewal of the claims already held.
                self._sweep_stalled_forks()
                next_sweep = time.monotonic() + self.stall_sweep_every.total_seconds()
            try:
                claimed = self.backend.claim_available_tasks(
                    self.worker_id,
                    min(idle, self.batch_size),
                    self.ttl,
                    tags=self.tags,
                    aging_interval=self.aging_interval,
                )
            except Exception as error:
                # Never let the loop die: a worker that silently stops claiming is worse
                # than one that logs and retries.
                log = logger.warning if isinstance(error, PersistenceError) else logger.exception
                log("worker %s could not claim tasks (%s); retrying", self.worker_id, error)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
                continue
            backoff = _MIN_BACKOFF_SECONDS
            for claimed_task in claimed:
                self._submit(claimed_task)
            if not claimed:
                self._idle_wait()

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
                    "worker %s: moving %r past its completed fork (the worker that saved its "
                    "last branch did not)",
                    self.worker_id,
                    instance_id,
                )
                self._settle(instance_id, advance)
            except PersistenceError as error:
                logger.warning(
                    "worker %s: could not move %r on (%s)", self.worker_id, instance_id, error
                )
            except Exception:
                # The advance function is user code: its failure must not stop the claim loop.
                logger.exception("worker %s: could not move %r on", self.worker_id, instance_id)

    def _wait_for_idle_thread(self) -> int:
        """Block until a thread is idle or the worker stops; the number of idle threads
        (0 when stopping)."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._stopping.is_set() or len(self._running) < self.threads
            )
            # One claim call for several threads costs about as much as for one: when only
            # some threads are idle, give the others a moment to finish too.
            self._changed.wait_for(
                lambda: (
                    self._stopping.is_set() or self.threads - len(self._running) >= self.batch_size
                ),
                self.claim_batch_wait.total_seconds(),
            )
            self._finished_since_claim = False
            return 0 if self._stopping.is_set() else self.threads - len(self._running)

    def _idle_wait(self) -> None:
        # Nothing to claim: wait for the poll interval (with jitter, so that workers started
        # together do not poll in lockstep), unless one of our own tasks finishes first:
        # its workflow's next task is probably runnable now.
        timeout = self.poll_interval.total_seconds() * random.uniform(0.8, 1.2)
        with self._changed:
            self._changed.wait_for(
                lambda: self._stopping.is_set() or self._finished_since_claim, timeout
            )

    def _submit(self, claimed: ClaimedTask) -> None:
        context = TaskContext(self.backend, claimed, self.worker_id)
        with self._changed:
            self._claimed += 1
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
            self._report(context, TaskOutcome.UNHANDLED)
            return
        # The token is part of the key: after a takeover the same worker may run the same
        # task again while its stale execution has not returned yet.
        running = _Running(
            context, advance, (context.instance_id, context.task_id, context.claim.token)
        )
        assert self._executor is not None
        with self._changed:
            self._running[running.key] = running
            # Submitted under the lock so that stop() never sees an entry without a future.
            running.future = self._executor.submit(self._execute, running, handler)

    @staticmethod
    def _find(table: Mapping[str, _T] | _T, key: str) -> _T | None:
        if isinstance(table, Mapping):
            return table.get(key)
        return table

    # -- executing ------------------------------------------------------------------------

    def _execute(self, running: _Running, handler: TaskFunction) -> None:
        context = running.context
        try:
            try:
                output = handler(context)
                if not isinstance(output, bytes):
                    raise TypeError(
                        f"task function returned {type(output).__name__}, expected bytes"
                    )
            except Exception as error:
                self._finish(running, error=error)
            else:
                self._finish(running, output=output)
        finally:
            with self._changed:
                self._running.pop(running.key)
                self._finished_since_claim = True
                self._changed.notify_all()

    def _finish(
        self, running: _Running, *, output: bytes | None = None, error: Exception | None = None
    ) -> None:
        context = running.context
        with running.finish_lock:
            if running.finished.is_set():
                return  # stop() released the claim already and reported the outcome
            running.finished.set()
            if context.claim_lost.is_set():
                # Whatever the function returned or raised: another worker may own the task.
                logger.info("%r: claim lost (%s), result dropped", context, context.lost_reason)
                outcome = TaskOutcome.LOST
            else:
                outcome = self._save_outcome(running, output, error)
            if outcome in (TaskOutcome.RECORDED, TaskOutcome.FAILED, TaskOutcome.RELEASED):
                self._release(context)
        self._report(context, outcome)

    def _save_outcome(
        self, running: _Running, output: bytes | None, error: Exception | None
    ) -> TaskOutcome:
        context = running.context
        try:
            if error is not None:
                logger.error("%r: task function failed: %r", context, error, exc_info=error)
                return self._record_failure(context, f"task {context.task_id!r}: {error!r}")
            assert output is not None
            return self._record_result(running, output)
        except NotFoundError:
            return TaskOutcome.LOST  # the instance was deleted meanwhile
        except BackendUnavailableError as unavailable:
            # The save may or may not have committed. Releasing is right either way: if it
            # did, the task is completed and nobody re-runs it; if not, somebody will.
            logger.warning("%r: could not save the result (%s)", context, unavailable)
            return TaskOutcome.RELEASED
        except Exception:
            # A bug (ours or the store's): give the task back rather than lose it silently.
            logger.exception("%r: unexpected error while saving the result", context)
            return TaskOutcome.RELEASED

    def _record_result(self, running: _Running, output: bytes) -> TaskOutcome:
        """Load, mark completed, advance, fenced save; then settle a join if needed."""
        context = running.context
        snapshot = self.backend.load_snapshot(context.instance_id)
        if (
            snapshot.status is not WorkflowStatus.IN_PROGRESS
            or context.task_id in snapshot.completed_tasks
        ):
            # Another worker finished it after taking over our claim, or the workflow was
            # cancelled, paused or failed meanwhile: our result is stale.
            return TaskOutcome.LOST
        before = snapshot.position
        try:
            snapshot.mark_task_completed(context.task_id, output)
        except InvalidInputError as invalid:  # e.g. an output over the size limit
            return self._record_failure(context, f"task {context.task_id!r}: {invalid}")
        try:
            running.advance(snapshot)
        except Exception as error:
            logger.exception("%r: advance function failed", context)
            return self._record_failure(
                context, f"advancing past task {context.task_id!r}: {error!r}"
            )
        try:
            saved = self._save_fenced(snapshot, context)
        except InvalidInputError as invalid:  # the store's own payload limit is lower
            return self._record_failure(context, f"task {context.task_id!r}: {invalid}")
        if not saved:
            return TaskOutcome.LOST
        if snapshot.status is WorkflowStatus.IN_PROGRESS and snapshot.position == before:
            # We completed one branch of a fork and the others looked unfinished. A sibling
            # may have saved its result at the same moment, seeing ours unfinished too: then
            # neither moved on. Look again now that both results are stored.
            self._settle(context.instance_id, running.advance)
        return TaskOutcome.RECORDED

    def _record_failure(self, context: TaskContext, message: str) -> TaskOutcome:
        snapshot = self.backend.load_snapshot(context.instance_id)
        if snapshot.status is not WorkflowStatus.IN_PROGRESS:
            return TaskOutcome.LOST
        snapshot.mark_failed(message)
        return TaskOutcome.FAILED if self._save_fenced(snapshot, context) else TaskOutcome.LOST

    def _save_fenced(self, snapshot: WorkflowSnapshot, context: TaskContext) -> bool:
        """The one write of a task's result: refused unless our claim (token) still holds."""
        try:
            saved = self.backend.save_snapshot_fenced(
                snapshot, context.task_id, self.worker_id, token=context.claim.token
            )
        except WorkflowTerminalError:
            saved = False  # a sibling branch failed the workflow, or it was cancelled
        if not saved:
            context._lose("the fenced save was refused: the claim no longer holds")
            logger.warning("%r: fenced save refused, result dropped", context)
        return saved

    def _settle(self, instance_id: str, advance: Advance) -> None:
        """Move a workflow past a join whose branches were all saved concurrently.

        Not fenced (the branches' claims do not cover the join); ``expected_version``
        makes it safe instead: if anyone saved in between, we re-read and decide again.
        """
        for _ in range(_SETTLE_ATTEMPTS):
            snapshot = self.backend.load_snapshot(instance_id)
            if snapshot.status is not WorkflowStatus.IN_PROGRESS:
                return
            before = snapshot.position
            advance(snapshot)
            if snapshot.status is WorkflowStatus.IN_PROGRESS and snapshot.position == before:
                return  # a branch is still running: its worker will move the workflow on
            try:
                self.backend.save_snapshot(snapshot, expected_version=snapshot.version)
                return
            except WorkflowTerminalError:
                return
            except ConflictError:
                continue  # somebody saved meanwhile (maybe the sibling moving on): re-read
        logger.warning("gave up moving %r past its join after repeated conflicts", instance_id)

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
            if running.finished.is_set():
                return
            running.finished.set()
            running.context._lose("the worker stopped before the task finished")
            self._release(running.context)
        logger.warning("%r: still running at shutdown, claim released", running.context)
        self._report(running.context, TaskOutcome.RELEASED)

    def _report(self, context: TaskContext, outcome: TaskOutcome) -> None:
        with self._changed:
            self._counts[outcome] += 1
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(context, outcome)
        except Exception:
            logger.exception("on_outcome failed for %r (%s)", context, outcome.value)

    def _running_now(self) -> list[_Running]:
        with self._changed:
            return list(self._running.values())

    # -- heartbeat ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_every.total_seconds()
        while not self._heartbeat_stop.wait(interval):
            for running in self._running_now():
                if not running.finished.is_set() and not running.context.claim_lost.is_set():
                    self._beat(running)

    def _beat(self, running: _Running) -> None:
        """Renew one claim; on loss tell the task; on a pending signal apply it."""
        context = running.context
        try:
            claim = self.backend.extend_task_claim(
                context.instance_id,
                context.task_id,
                self.worker_id,
                self.ttl,
                token=context.claim.token,
            )
        except (ClaimLostError, NotFoundError) as lost:
            if running.finished.is_set():
                return  # the task finished (and released its claim) during this beat
            if context._lose(f"heartbeat: {lost}"):
                logger.warning("%r: claim lost (%s)", context, lost)
            return
        except PersistenceError as error:
            # Transient: the claim is still ours until it expires; the next beat retries.
            logger.warning("%r: heartbeat failed (%s)", context, error)
            return
        context._renewed(claim)
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
