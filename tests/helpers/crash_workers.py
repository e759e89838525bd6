"""The worker processes that ``test_crashes.py`` SIGKILLs, and the journal they leave behind.

Each process is started with ``spawn`` and shares nothing with the test process but its
argument (a :class:`ProcessSpec`) and files in one directory:

- ``<worker_id>.jsonl``: the process's journal. One ``os.write`` of one JSON line per record,
  on a file opened ``O_APPEND``: the kernel holds what was written the moment the call
  returns, so a SIGKILL loses only the records not yet written, never earlier ones.
- ``<worker_id>.ready``: created once the backend is open (the test kills only ready
  processes, so that a kill lands in the claim/save/release cycle, not in ``import``).
- ``stop``: created by the test when every workflow is done; the processes then finish
  their cycle and exit 0.

No multiprocessing queue, event or lock is shared: a process killed while holding one of
their internal locks would hang everyone else who uses it.

Two kinds of process:

- ``cycle``: threads running the bare claim -> work -> fenced save -> release cycle on
  chain workflows (tasks ``t1`` .. ``tN`` in sequence), journalling each step. All threads
  of a process share one worker id (as :class:`~sayiir_persistence.worker.Worker` does), so
  that only the fencing token tells a stale execution from a fresh one.
- ``worker``: the reference :class:`~sayiir_persistence.worker.Worker` with a
  :class:`~sayiir_persistence.worker.Pipeline` that has a fork, on a backend that can kill
  its own process around its calls and drops the heartbeats of some claims
  (:class:`SuicidalBackend`); some task runs outlast the TTL.

A process may carry a :class:`KillPlan`: the ``after``-th time any of its threads reaches
``point`` it SIGKILLs itself: ``<call>:before`` (just before the call), ``<call>:after``
(the call returned, nothing journalled yet: the process dies knowing what the store
accepted, and tells no one) or ``<call>:during`` (a timer thread kills the process at a random
instant of the next few milliseconds while the call runs, usually mid-transaction). Processes
without a plan are killed by the test at random times, or live until the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

from helpers.clusters import backend_options
from sayiir_persistence import (
    AtTask,
    AvailableTask,
    BackendUnavailableError,
    ClaimedTask,
    ClaimLostError,
    CompletionResult,
    NotFoundError,
    TaskClaim,
    WorkflowSnapshot,
    WorkflowStatus,
    WorkflowTerminalError,
)
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.worker import Pipeline, TaskContext, TaskOutcome, Worker

_T = TypeVar("_T")

#: Where a cycle process can kill itself: every call of the cycle, before, during, after it;
#: plus ``work:during`` (in the middle of the task's sleep, claim held).
CYCLE_CALLS: Final = ("claim", "extend", "save", "release")
CYCLE_KILL_POINTS: Final = (
    *(f"{call}:{when}" for call in CYCLE_CALLS for when in ("before", "during", "after")),
    "work:during",
)
#: Where a Worker process can kill itself: around the backend calls the Worker makes.
WORKER_CALLS: Final = ("claim", "extend", "complete", "release")
WORKER_KILL_POINTS: Final = tuple(
    f"{call}:{when}" for call in WORKER_CALLS for when in ("before", "during", "after")
)

#: A ``:during`` kill fires within this many seconds after the call starts.
DURING_MAX_DELAY_SECONDS: Final = 0.008
#: A process outliving this (the test hung or died) exits by itself.
MAX_LIFETIME_SECONDS: Final = 300.0

STOP_FILE: Final = "stop"

#: Worker processes: the share of task runs that outlast the TTL (kept alive by heartbeats),
#: and of claims whose heartbeats are lost (so a slow run's claim expires and is taken over
#: while it runs on: its save must be refused).
SLOW_TASKS: Final = 0.15
PARTITIONED_CLAIMS: Final = 0.5

# The Worker test's workflow: a fork between two single tasks.
FORK_PIPELINE: Final = Pipeline("a", ("b1", "b2"), "c")
FORK_DEFINITION: Final = "crash-fork-v1"


# --------------------------------------------------------------------------------------------
# Specs and the journal


@dataclass(frozen=True)
class KillPlan:
    """Die the ``after``-th time (1-based) any thread of the process reaches ``point``."""

    point: str
    after: int


@dataclass(frozen=True)
class ProcessSpec:
    """Everything a worker process is given (pickled to it)."""

    kind: str
    """``"cycle"`` or ``"worker"``."""
    url: str
    directory: str
    worker_id: str
    threads: int
    ttl_seconds: float
    plan: KillPlan | None
    seed: int


def digest(payload: bytes | None) -> str:
    """A short fingerprint of a payload, carried by outputs to check who consumed what."""
    return "none" if payload is None else hashlib.sha256(payload).hexdigest()[:16]


def _encode(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot journal {type(value).__name__}")


class Journal:
    """Append-only JSON lines, one ``os.write`` per record (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, "at": time.time(), **fields}, default=_encode)
        os.write(self._fd, (line + "\n").encode())


def read_journals(directory: Path) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Every process's records by worker id, and how many torn lines were skipped.

    Only the last line of a file may be torn (a SIGKILL in the middle of a long write);
    a torn line anywhere else is a broken journal and raises.
    """
    journals: dict[str, list[dict[str, Any]]] = {}
    torn = 0
    for path in sorted(directory.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number != len(lines) - 1:
                    raise
                torn += 1
        journals[path.stem] = records
    return journals, torn


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --------------------------------------------------------------------------------------------
# Killing ourselves


class Killer:
    """Carries out a process's :class:`KillPlan` (does nothing without one)."""

    def __init__(self, plan: KillPlan | None, journal: Journal, seed: int) -> None:
        self.seed = seed
        self._plan = plan
        self.journal = journal
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._passes = 0

    def _due(self, point: str) -> bool:
        if self._plan is None or point != self._plan.point:
            return False
        with self._lock:
            self._passes += 1
            return self._passes == self._plan.after

    def die(self, point: str) -> None:
        self.journal.write("self-kill", point=point)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL cannot be caught

    def at(self, point: str) -> None:
        """Die here if the plan says so."""
        if self._due(point):
            self.die(point)

    @contextmanager
    def around(self, call: str) -> Iterator[None]:
        """``call:before``, ``call:during`` and ``call:after`` around the ``with`` body.

        ``after`` fires only when the body returned normally (the interesting case: the
        store accepted something and the process dies before telling anyone).
        """
        self.at(f"{call}:before")
        self.during(f"{call}:during")
        yield
        self.at(f"{call}:after")

    def during(self, point: str) -> None:
        """Arm a timer that kills the process a few milliseconds from now, if due."""
        if not self._due(point):
            return
        delay = self._rng.uniform(0, DURING_MAX_DELAY_SECONDS)

        def fire() -> None:
            time.sleep(delay)
            self.die(point)

        threading.Thread(target=fire, name="self-kill", daemon=True).start()


# --------------------------------------------------------------------------------------------
# Process entry point


def process_main(spec: ProcessSpec) -> None:
    """Entry point of every worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the test's to handle
    logging.basicConfig(
        level=logging.ERROR, format=f"{spec.worker_id} %(levelname)s %(name)s: %(message)s"
    )
    exit_with_parent()
    directory = Path(spec.directory)
    journal = Journal(directory / f"{spec.worker_id}.jsonl")
    logging.getLogger().addHandler(_JournalHandler(journal))
    rng = random.Random(spec.seed)
    killer = Killer(spec.plan, journal, spec.seed + 1)
    backend = SuicidalBackend(spec.url, killer, **backend_options(spec.url))
    try:
        journal.write("ready", worker=spec.worker_id, plan=spec.plan and spec.plan.point)
        (directory / f"{spec.worker_id}.ready").touch()
        if spec.kind == "cycle":
            _run_cycle_threads(spec, backend, journal, killer, rng)
        elif spec.kind == "worker":
            _run_worker(spec, backend, journal, rng)
        else:
            raise ValueError(f"unknown process kind {spec.kind!r}")
    finally:
        backend.close()


class _JournalHandler(logging.Handler):
    """Journals ERROR log records (the library logs unexpected exceptions at that level)."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(logging.ERROR)
        self._journal = journal

    def emit(self, record: logging.LogRecord) -> None:
        self._journal.write("log-error", logger=record.name, message=self.format(record))


def exit_with_parent() -> None:
    """Die when the test process dies (or after MAX_LIFETIME_SECONDS), whatever happens."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        if parent is not None:
            multiprocessing.connection.wait([parent.sentinel], MAX_LIFETIME_SECONDS)
        else:
            time.sleep(MAX_LIFETIME_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _stopped(spec: ProcessSpec) -> bool:
    return (Path(spec.directory) / STOP_FILE).exists()


# --------------------------------------------------------------------------------------------
# The bare claim -> work -> fenced save -> release cycle


def chain_length(definition_hash: str) -> int:
    """Chain workflows are ``crash-chain-<n>``: tasks ``t1`` .. ``tn`` in sequence."""
    return int(definition_hash.rsplit("-", 1)[1])


def chain_workflow(instance_id: str, length: int, initial_input: bytes) -> WorkflowSnapshot:
    return WorkflowSnapshot.new(
        instance_id, f"crash-chain-{length}", initial_input=initial_input, first_task="t1"
    )


def advance_chain(snapshot: WorkflowSnapshot, task_id: str, output: bytes) -> None:
    """Record ``task_id``'s output and move to the next task (or complete the workflow)."""
    snapshot.mark_task_completed(task_id, output)
    number = int(task_id[1:])
    if number < chain_length(snapshot.definition_hash):
        snapshot.move_to(AtTask(f"t{number + 1}"))
    else:
        snapshot.mark_completed(output)


# How an execution behaves between its claim and its save (cumulative thresholds):
# - normal: work, save, release;
# - extend: heartbeat once in the middle of the work;
# - stall: sleep until just past the claim's expiry without a heartbeat, then save the state
#   loaded at claim time: the fence must refuse it (the claim expired, and maybe was taken
#   over);
# - renew: the same, but heartbeat before saving (succeeds only if nobody took over);
# - zombie: stall, let a sibling thread of the same process (same worker id) take the task
#   over, then heartbeat, save and release with the old token: only the token tells the two
#   apart, and all three must be refused;
# - give-up: release without saving (the task must be claimable again at once).
# ("slow": the zombie's sibling, working long enough for the zombie to try its old token.)
_MODES: Final = (
    ("normal", 0.45),
    ("extend", 0.70),
    ("stall", 0.78),
    ("renew", 0.83),
    ("zombie", 0.93),
)
#: A stall ends this long (seconds) after the claim's expiry.
STALL_PAST_EXPIRY: Final = (0.005, 0.25)
#: How long a zombie's sibling keeps trying to take the task over.
TAKEOVER_TRIES_SECONDS: Final = 2.0


def _mode(rng: random.Random) -> str:
    draw = rng.random()
    for name, threshold in _MODES:
        if draw < threshold:
            return name
    return "give-up"


@dataclass
class _Cycle:
    """What every execution of a cycle process shares."""

    spec: ProcessSpec
    backend: SqlBackend
    journal: Journal
    killer: Killer

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.spec.ttl_seconds)


def _run_cycle_threads(
    spec: ProcessSpec,
    backend: SqlBackend,
    journal: Journal,
    killer: Killer,
    rng: random.Random,
) -> None:
    cycle = _Cycle(spec, backend, journal, killer)
    seeds = [rng.randrange(2**32) for _ in range(spec.threads)]
    threads = [
        threading.Thread(target=_cycle_loop, args=(cycle, random.Random(seed)), name=f"cycle-{n}")
        for n, seed in enumerate(seeds)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _guarded(cycle: _Cycle, body: Callable[[], _T]) -> _T | None:
    """Run ``body``; journal any exception (every one is a failure of the test)."""
    try:
        return body()
    except Exception as error:
        cycle.journal.write(
            "error", type=type(error).__name__, message=str(error), traceback=traceback.format_exc()
        )
        return None


def _cycle_loop(cycle: _Cycle, rng: random.Random) -> None:
    while not _stopped(cycle.spec):
        if not _guarded(cycle, lambda: _cycle(cycle, rng)):
            time.sleep(rng.uniform(0.02, 0.06))


def _claim_one(cycle: _Cycle, rng: random.Random) -> tuple[TaskClaim, AvailableTask, str] | None:
    """Claim one task, by claim_available_tasks or by find_available_tasks + claim_task."""
    backend, worker_id = cycle.backend, cycle.spec.worker_id
    if rng.random() < 0.5:
        batch = backend.claim_available_tasks(worker_id, 1, cycle.ttl)
        return (batch[0].claim, batch[0].task, "claim_available_tasks") if batch else None
    found = backend.find_available_tasks(worker_id, 4)
    rng.shuffle(found)
    for task in found:
        claim = backend.claim_task(task.instance_id, task.task_id, worker_id, cycle.ttl)
        if claim is not None:
            return claim, task, "claim_task"
    return None


def _cycle(cycle: _Cycle, rng: random.Random) -> bool:
    """One execution: claim, work, fenced save, release. False when nothing was claimable."""
    cycle.killer.at("claim:before")
    cycle.killer.during("claim:during")
    claimed = _claim_one(cycle, rng)
    if claimed is None:
        return False
    cycle.killer.at("claim:after")  # claimed, and nobody knows yet
    claim, task, via = claimed
    _execute(cycle, rng, claim, task, via, _mode(rng))
    return True


def _execute(
    cycle: _Cycle,
    rng: random.Random,
    claim: TaskClaim,
    task: AvailableTask,
    via: str,
    mode: str,
    taken_over: Callable[[], None] | None = None,
) -> None:
    """Everything after the claim; ``taken_over`` is called once the claim is journalled."""
    spec, backend, journal, killer = cycle.spec, cycle.backend, cycle.journal, cycle.killer
    claimed = time.monotonic()
    execution = uuid.uuid4().hex
    key = {"instance": claim.instance_id, "task": claim.task_id, "token": claim.token}
    journal.write(
        "claim",
        exec=execution,
        worker=spec.worker_id,
        via=via,
        mode=mode,
        claimed_at=claim.claimed_at,
        expires_at=claim.expires_at,
        **key,
    )
    if taken_over is not None:
        taken_over()
    # Loaded at claim time on purpose: a stale execution later saves this old state, which
    # would roll the workflow back if the fence let it through.
    snapshot = backend.load_snapshot(claim.instance_id)
    if snapshot.status is not WorkflowStatus.IN_PROGRESS or snapshot.position != AtTask(
        claim.task_id
    ):
        journal.write("stale-load", exec=execution, **key)  # our claim expired already
        _release(cycle, execution, key)
        return

    killer.during("work:during")
    if mode == "give-up":
        time.sleep(rng.uniform(0.0, 0.05))
        _release(cycle, execution, key)
        return
    if mode in ("stall", "renew", "zombie"):
        assert claim.expires_at is not None
        lifetime = (claim.expires_at - claim.claimed_at).total_seconds()
        time.sleep(
            max(0.0, claimed + lifetime - time.monotonic()) + rng.uniform(*STALL_PAST_EXPIRY)
        )
    else:
        time.sleep(rng.uniform(0.1, 0.2) if mode == "slow" else rng.uniform(0.005, 0.06))
    if mode == "zombie":
        _let_sibling_take_over(cycle, rng, claim, task, execution)
    if mode in ("extend", "renew", "zombie"):
        try:
            with killer.around("extend"):
                renewed = backend.extend_task_claim(
                    claim.instance_id, claim.task_id, spec.worker_id, cycle.ttl, token=claim.token
                )
        except (ClaimLostError, NotFoundError) as lost:
            journal.write("extend-lost", exec=execution, error=type(lost).__name__, **key)
        else:
            journal.write("extend", exec=execution, expires_at=renewed.expires_at, **key)
        if mode == "extend":
            time.sleep(rng.uniform(0.005, 0.06))

    output = json.dumps(
        {
            "exec": execution,
            "worker": spec.worker_id,
            "token": claim.token,
            "input": digest(task.input),
        }
    ).encode()
    advance_chain(snapshot, claim.task_id, output)
    journal.write("save-intent", exec=execution, output=output.decode(), **key)
    terminal = False
    try:
        with killer.around("save"):
            accepted = backend.save_snapshot_fenced(
                snapshot, claim.task_id, spec.worker_id, token=claim.token
            )
    except WorkflowTerminalError:
        accepted, terminal = False, True
    journal.write(
        "saved",
        exec=execution,
        accepted=accepted,
        terminal=terminal,
        version=snapshot.version if accepted else None,
        **key,
    )
    _release(cycle, execution, key)


def _let_sibling_take_over(
    cycle: _Cycle, rng: random.Random, claim: TaskClaim, task: AvailableTask, execution: str
) -> None:
    """Start a sibling thread (same worker id) that claims the expired task anew and runs it;
    return once it holds the claim (or gave up: another process took the task)."""
    settled = threading.Event()
    holds: list[int] = []
    sibling_rng = random.Random(rng.randrange(2**32))

    def holding(token: int) -> None:
        holds.append(token)
        settled.set()

    def sibling() -> None:
        deadline = time.monotonic() + TAKEOVER_TRIES_SECONDS
        while time.monotonic() < deadline:
            fresh = cycle.backend.claim_task(
                claim.instance_id, claim.task_id, cycle.spec.worker_id, cycle.ttl
            )
            if fresh is not None:
                taken_over = partial(holding, fresh.token)
                _execute(cycle, sibling_rng, fresh, task, "takeover", "slow", taken_over)
                return
            time.sleep(0.005)

    def run_sibling() -> None:
        try:
            _guarded(cycle, sibling)
        finally:
            settled.set()

    threading.Thread(target=run_sibling, name="sibling").start()
    settled.wait()
    cycle.journal.write(
        "zombie", exec=execution, sibling_token=holds[0] if holds else None, token=claim.token
    )


def _release(cycle: _Cycle, execution: str, key: dict[str, Any]) -> None:
    cycle.journal.write("release-intent", exec=execution, **key)
    outcome = "released"
    try:
        with cycle.killer.around("release"):
            cycle.backend.release_task_claim(
                key["instance"], key["task"], cycle.spec.worker_id, token=key["token"]
            )
    except (ClaimLostError, NotFoundError) as gone:
        outcome = type(gone).__name__
    cycle.journal.write("release", exec=execution, outcome=outcome, **key)


# --------------------------------------------------------------------------------------------
# The reference Worker, on a backend that kills its own process around its calls


class SuicidalBackend(SqlBackend):
    """A ``SqlBackend`` whose process follows its :class:`Killer` around the worker's calls.

    The cycle processes use the killer themselves (their kill points bracket whole steps);
    for the :class:`Worker` this class is the only way in.
    """

    def __init__(self, url: str, killer: Killer, **options: Any) -> None:
        super().__init__(url, **options)
        self.killer = killer
        self.armed = False
        # Claims (instance, task, token) whose heartbeats never reach the store, as if this
        # process were cut off from it: they expire while their task runs on.
        self._partitioned: dict[tuple[str, str, int], bool] = {}
        self._rng = random.Random(killer.seed)
        self._lock = threading.Lock()

    def _around(self, call: str, body: Callable[[], _T]) -> _T:
        if not self.armed:
            return body()
        with self.killer.around(call):
            return body()

    def claim_available_tasks(self, *args: Any, **kwargs: Any) -> list[ClaimedTask]:
        return self._around(
            "claim", lambda: super(SuicidalBackend, self).claim_available_tasks(*args, **kwargs)
        )

    def extend_task_claim(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        *,
        token: int | None = None,
    ) -> TaskClaim:
        if self.armed and token is not None:
            with self._lock:
                cut = self._partitioned.setdefault(
                    (instance_id, task_id, token), self._rng.random() < PARTITIONED_CLAIMS
                )
            if cut:
                raise BackendUnavailableError("simulated: the heartbeat never reached the store")
        claim = self._around(
            "extend",
            lambda: super(SuicidalBackend, self).extend_task_claim(
                instance_id, task_id, worker_id, ttl, token=token
            ),
        )
        if self.armed:
            self.killer.journal.write(
                "extend",
                instance=claim.instance_id,
                task=claim.task_id,
                token=claim.token,
                expires_at=claim.expires_at,
            )
        return claim

    def complete_tasks(self, *args: Any, **kwargs: Any) -> list[CompletionResult]:
        return self._around(
            "complete", lambda: super(SuicidalBackend, self).complete_tasks(*args, **kwargs)
        )

    def release_task_claim(self, *args: Any, **kwargs: Any) -> None:
        self._around(
            "release", lambda: super(SuicidalBackend, self).release_task_claim(*args, **kwargs)
        )


def fork_workflow(instance_id: str, initial_input: bytes) -> WorkflowSnapshot:
    return FORK_PIPELINE.start(instance_id, FORK_DEFINITION, initial_input=initial_input)


def _run_worker(
    spec: ProcessSpec, backend: SuicidalBackend, journal: Journal, rng: random.Random
) -> None:
    def handler(ctx: TaskContext) -> bytes:
        journal.write(
            "start",
            exec=ctx.execution_id,
            worker=spec.worker_id,
            instance=ctx.instance_id,
            task=ctx.task_id,
            token=ctx.claim.token,
            claimed_at=ctx.claim.claimed_at,
            expires_at=ctx.claim.expires_at,
        )
        if rng.random() < SLOW_TASKS:
            time.sleep(spec.ttl_seconds * rng.uniform(1.02, 1.3))
        else:
            time.sleep(rng.uniform(0.01, 0.08))
        consumed = {"input": digest(ctx.input)}
        if ctx.task_id == "c":
            consumed |= {branch: digest(ctx.result_of(branch)) for branch in ("b1", "b2")}
        return json.dumps({"exec": ctx.execution_id, "token": ctx.claim.token, **consumed}).encode()

    def on_outcome(ctx: TaskContext, outcome: TaskOutcome) -> None:
        journal.write("outcome", exec=ctx.execution_id, outcome=outcome.value)

    worker = Worker(
        backend,
        handler,
        {FORK_DEFINITION: FORK_PIPELINE},
        worker_id=spec.worker_id,
        threads=spec.threads,
        ttl=timedelta(seconds=spec.ttl_seconds),
        poll_interval=timedelta(milliseconds=50),
        shutdown_grace=timedelta(seconds=3),
        # A worker killed between a branch's save and the join leaves the fork for this sweep.
        stall_sweep_every=timedelta(seconds=1),
        on_outcome=on_outcome,
    )
    backend.armed = True
    with worker:
        while not _stopped(spec):
            time.sleep(0.05)
        backend.armed = False  # a clean stop: releasing claims is not a kill point
