"""Worker processes that run across a PostgreSQL failover, the scenario that drives them, and
the journal they leave behind (used by ``tests/cluster/test_failover.py`` and
``benchmarks/failover.py``).

Every process is started with ``spawn`` and given one multi-host URL naming both servers of a
:class:`~helpers.clusters.StandbyPair`; it is never restarted: it must carry on against the
promoted standby by itself. Each writes ``<worker_id>.jsonl`` (the O_APPEND journal of
``helpers.crash_workers``: one ``os.write`` per line, so a SIGKILL tears at most the last
line), ``<worker_id>.ready`` once its backend is open, and stops when ``stop`` appears.

Two kinds of process:

- ``worker``: the reference :class:`~sayiir_persistence.worker.Worker` on
  :data:`PIPELINE` workflows. The task function journals each execution (``exec``) before it
  returns; the backend journals every ``complete_tasks`` answer (``ack``: what the store
  acknowledged, with the output's digest) and every call that succeeded (``ok``, with the
  moment it was sent) or raised ``BackendUnavailableError`` (``down``).
- ``claimer``: threads that only claim (``claim_available_tasks``), hold the claim a moment,
  then release it or let it expire, journalling every claim the store granted (``claim``,
  with its token and expiry by the store's clock) and every release it acknowledged.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from helpers.clusters import StandbyPair, wait_until
from helpers.crash_workers import STOP_FILE, Journal, digest, exit_with_parent, read_journals
from sayiir_persistence import (
    BackendUnavailableError,
    ClaimedTask,
    ClaimLostError,
    CompletionResult,
    NotFoundError,
    PersistenceError,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    migrate,
)
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.worker import Pipeline, TaskContext, Worker

_T = TypeVar("_T")

#: The workflows' shape: a fork between two single tasks, then one more.
PIPELINE: Final = Pipeline("s1", ("s2a", "s2b"), "s3")
DEFINITION: Final = "failover-v1"
TASKS: Final = ("s1", "s2a", "s2b", "s3")

#: The workers' call timeout: a call never waits longer for a server that went silent.
CALL_TIMEOUT: Final = timedelta(seconds=10)


@dataclass(frozen=True)
class Spec:
    """Everything a process is given (pickled to it)."""

    kind: str
    url: str
    directory: str
    worker_id: str
    threads: int
    ttl_seconds: float
    seed: int
    task_seconds: tuple[float, float] = (0.05, 0.2)


def process_main(spec: Spec) -> None:
    """Entry point of every process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    directory = Path(spec.directory)
    journal = Journal(directory / f"{spec.worker_id}.jsonl")
    backend = JournallingBackend(spec.url, journal, call_timeout=CALL_TIMEOUT)
    try:
        journal.write("ready")
        (directory / f"{spec.worker_id}.ready").touch()
        if spec.kind == "worker":
            _run_worker(spec, backend, journal)
        elif spec.kind == "claimer":
            _run_claimers(spec, backend, journal)
        else:
            raise ValueError(f"unknown process kind {spec.kind!r}")
        journal.write("exit")
    finally:
        backend.close()


def _stopped(spec: Spec) -> bool:
    return (Path(spec.directory) / STOP_FILE).exists()


class JournallingBackend(SqlBackend):
    """A ``SqlBackend`` that journals the worker's calls: when each was sent, whether the
    store answered, and what ``complete_tasks`` acknowledged."""

    def __init__(self, url: str, journal: Journal, **options: Any) -> None:
        super().__init__(url, **options)
        self.journal = journal

    def _journalled(self, call: str, body: Callable[[], _T]) -> _T:
        sent = time.time()
        try:
            answer = body()
        except BackendUnavailableError as error:
            self.journal.write("down", call=call, sent=sent, error=str(error)[:300])
            raise
        self.journal.write("ok", call=call, sent=sent)
        return answer

    def claim_available_tasks(self, *args: Any, **kwargs: Any) -> list[ClaimedTask]:
        return self._journalled(
            "claim",
            lambda: super(JournallingBackend, self).claim_available_tasks(*args, **kwargs),
        )

    def extend_task_claim(self, *args: Any, **kwargs: Any) -> TaskClaim:
        return self._journalled(
            "extend", lambda: super(JournallingBackend, self).extend_task_claim(*args, **kwargs)
        )

    def release_task_claim(self, *args: Any, **kwargs: Any) -> None:
        self._journalled(
            "release", lambda: super(JournallingBackend, self).release_task_claim(*args, **kwargs)
        )

    def complete_tasks(
        self, completions: Sequence[TaskCompletion], **kwargs: Any
    ) -> list[CompletionResult]:
        results = self._journalled(
            "complete",
            lambda: super(JournallingBackend, self).complete_tasks(completions, **kwargs),
        )
        for completion, result in zip(completions, results, strict=True):
            self.journal.write(
                "ack",
                instance=completion.instance_id,
                task=completion.task_id,
                token=completion.token,
                outcome=result.outcome.value,
                output=digest(completion.output),
            )
            for task in result.next_tasks:
                self.journal.write(
                    "claim",
                    instance=task.claim.instance_id,
                    task=task.claim.task_id,
                    token=task.claim.token,
                )
        return results


# --------------------------------------------------------------------------------------------
# The Worker process


def _run_worker(spec: Spec, backend: JournallingBackend, journal: Journal) -> None:
    rng = random.Random(spec.seed)
    low, high = spec.task_seconds

    def handler(ctx: TaskContext) -> bytes:
        consumed = {"input": digest(ctx.input)}
        if ctx.task_id == "s3":
            consumed |= {branch: digest(ctx.result_of(branch)) for branch in ("s2a", "s2b")}
        journal.write(
            "exec",
            exec=ctx.execution_id,
            instance=ctx.instance_id,
            task=ctx.task_id,
            token=ctx.claim.token,
        )
        time.sleep(rng.uniform(low, high))
        return json.dumps({"exec": ctx.execution_id, "token": ctx.claim.token, **consumed}).encode()

    worker = Worker(
        backend,
        handler,
        {DEFINITION: PIPELINE},
        worker_id=spec.worker_id,
        threads=spec.threads,
        ttl=timedelta(seconds=spec.ttl_seconds),
        poll_interval=timedelta(milliseconds=200),
        shutdown_grace=timedelta(seconds=5),
        stall_sweep_every=timedelta(seconds=1),
    )
    with worker:
        while not _stopped(spec):
            time.sleep(0.05)


def start_workflows(url: str, count: int, prefix: str = "wf") -> dict[str, bytes]:
    """Start ``count`` :data:`PIPELINE` workflows; their initial inputs by instance id."""
    backend = SqlBackend(url)
    try:
        inputs = {f"{prefix}-{n:03d}": f"input-{n}".encode() for n in range(count)}
        for instance_id, initial in inputs.items():
            backend.start_workflow(PIPELINE.start(instance_id, DEFINITION, initial_input=initial))
        return inputs
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------
# The claimer process


def _run_claimers(spec: Spec, backend: JournallingBackend, journal: Journal) -> None:
    threads = [
        threading.Thread(
            target=_claim_loop, args=(spec, backend, journal, random.Random(spec.seed + n))
        )
        for n in range(spec.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _claim_loop(
    spec: Spec, backend: JournallingBackend, journal: Journal, rng: random.Random
) -> None:
    ttl = timedelta(seconds=spec.ttl_seconds)
    while not _stopped(spec):
        try:
            claimed = backend.claim_available_tasks(spec.worker_id, ttl=ttl, limit=2)
        except PersistenceError:
            time.sleep(0.05)
            continue
        for task in claimed:
            claim = task.claim
            journal.write(
                "claim",
                instance=claim.instance_id,
                task=claim.task_id,
                token=claim.token,
                claimed_at=claim.claimed_at.isoformat(),
                expires_at=claim.expires_at.isoformat() if claim.expires_at else None,
            )
        time.sleep(rng.uniform(0.0, 0.2))
        for task in claimed:
            if rng.random() < 0.3:
                continue  # abandoned: the claim expires by itself
            claim = task.claim
            try:
                backend.release_task_claim(
                    claim.instance_id, claim.task_id, spec.worker_id, token=claim.token
                )
            except (ClaimLostError, NotFoundError):
                continue
            except PersistenceError:
                # Unknown outcome: released or not. Judged as "maybe" by the checks.
                journal.write(
                    "release-unknown",
                    instance=claim.instance_id,
                    task=claim.task_id,
                    token=claim.token,
                )
                continue
            journal.write(
                "released", instance=claim.instance_id, task=claim.task_id, token=claim.token
            )
        if not claimed:
            time.sleep(0.02)


def start_single_tasks(url: str, count: int) -> None:
    """Start ``count`` one-task workflows (``race-NNN``, task ``t1``) for the claimers."""
    backend = SqlBackend(url)
    try:
        for n in range(count):
            backend.start_workflow(WorkflowSnapshot.new(f"race-{n:03d}", "race", first_task="t1"))
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------
# The scenario: processes running, the primary SIGKILLed, the standby promoted


@dataclass
class Fleet:
    """The processes of a scenario, and what the test did to them."""

    directory: Path
    specs: dict[str, Spec] = field(default_factory=dict)
    processes: dict[str, multiprocessing.process.BaseProcess] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)

    def start(self, spec: Spec) -> None:
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=process_main, args=(spec,), name=spec.worker_id)
        process.start()
        self.specs[spec.worker_id] = spec
        self.processes[spec.worker_id] = process

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(
            lambda: all((self.directory / f"{w}.ready").exists() for w in self.processes),
            timeout,
            "every process ready",
        )

    def sigkill(self, worker_id: str) -> None:
        process = self.processes[worker_id]
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        self.killed.add(worker_id)

    def stop(self, timeout: float = 60) -> dict[str, int | None]:
        """Ask every process to stop; their exit codes."""
        (self.directory / STOP_FILE).touch()
        for process in self.processes.values():
            process.join(timeout)
        codes = {}
        for worker_id, process in self.processes.items():
            if process.is_alive():
                process.kill()
                process.join(10)
            codes[worker_id] = process.exitcode
        return codes


@dataclass
class Failover:
    """When the test killed the primary and promoted the standby (``time.time()``)."""

    killed_at: float = 0.0
    promoted_at: float = 0.0
    first_write_at: float = 0.0
    """A probe's first write accepted after the kill (polling every 50 ms)."""


def fail_over(pair: StandbyPair, promote_after: float) -> Failover:
    """SIGKILL the primary, promote the standby ``promote_after`` seconds later, and wait for
    a write to be accepted through the multi-host URL."""
    failover = Failover()
    pair.kill_primary()
    # Once the script returned: the postmaster is gone (its backends follow within
    # milliseconds), so a call sent from now on cannot commit on the old primary.
    failover.killed_at = time.time()
    time.sleep(max(0.0, promote_after - (time.time() - failover.killed_at)))
    pair.promote()
    failover.promoted_at = time.time()
    engine = sa.create_engine(pair.url(), poolclass=NullPool)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql("CREATE TEMPORARY TABLE probe (x int)")
                failover.first_write_at = time.time()
                return failover
            except sa.exc.OperationalError:
                assert time.monotonic() < deadline, "no write accepted after the promotion"
                time.sleep(0.05)
    finally:
        engine.dispose()


def first_success_after(
    journals: dict[str, list[dict[str, Any]]], moment: float, calls: frozenset[str]
) -> dict[str, float]:
    """Per process that saw the outage (a call sent after ``moment`` that failed), the first
    of ``calls`` sent after that failure that the store answered, as seconds after
    ``moment``."""
    firsts = {}
    for worker_id, records in journals.items():
        failed = [r["sent"] for r in records if r["kind"] == "down" and r["sent"] >= moment]
        if not failed:
            continue
        sent = [
            r["sent"]
            for r in records
            if r["kind"] == "ok" and r["call"] in calls and r["sent"] >= min(failed)
        ]
        if sent:
            firsts[worker_id] = min(sent) - moment
    return firsts


def downtime_summary(values: Sequence[float]) -> str:
    if not values:
        return "none"
    return (
        f"median {statistics.median(values):.2f} s, "
        f"range {min(values):.2f}-{max(values):.2f} s (n={len(values)})"
    )


@dataclass
class WorkerRun:
    """What a run of worker processes across a failover left: for the checks and the
    figures."""

    failover: Failover
    inputs: dict[str, bytes]
    snapshots: dict[str, WorkflowSnapshot]
    journals: dict[str, list[dict[str, Any]]]
    torn: int
    exit_codes: dict[str, int | None]
    killed: set[str]
    finished_at: float

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [
            {**r, "worker": w} for w, rs in self.journals.items() for r in rs if r["kind"] == kind
        ]

    def worker_downtimes(self) -> dict[str, float]:
        """Per surviving process: from the kill to the first call sent after it that the
        store answered (any call)."""
        firsts = first_success_after(
            {w: r for w, r in self.journals.items() if w not in self.killed},
            self.failover.killed_at,
            frozenset({"claim", "complete", "extend", "release"}),
        )
        return firsts

    def completion_downtimes(self) -> dict[str, float]:
        """Per surviving process: from the kill to its first ``complete_tasks`` sent after
        it that the store answered."""
        return first_success_after(
            {w: r for w, r in self.journals.items() if w not in self.killed},
            self.failover.killed_at,
            frozenset({"complete"}),
        )


def run_workers_across_failover(
    pair: StandbyPair,
    directory: Path,
    *,
    processes: int = 3,
    threads: int = 4,
    workflows: int = 60,
    ttl_seconds: float = 10.0,
    promote_after: float = 1.0,
    kill_workers: int = 0,
    seed: int = 0,
    finish_timeout: float = 180.0,
) -> WorkerRun:
    """Worker processes run :data:`PIPELINE` workflows through the multi-host URL; once a
    quarter of the tasks are recorded, the primary is SIGKILLed and the standby promoted
    ``promote_after`` seconds later; the workers are not restarted. With ``kill_workers``,
    that many worker processes are SIGKILLed too (one just before the primary, the next
    just after the promotion, ...) and as many fresh ones started after the promotion."""
    url = pair.url()
    prepare(url)
    inputs = start_workflows(url, workflows)
    fleet = Fleet(directory)
    for n in range(processes):
        fleet.start(
            Spec("worker", url, str(directory), f"w{n}", threads, ttl_seconds, seed * 100 + n)
        )
    fleet.wait_ready()
    quarter = workflows * len(TASKS) // 4

    def recorded() -> int:
        journals, _ = read_journals(directory)
        return sum(
            1
            for records in journals.values()
            for r in records
            if r["kind"] == "ack" and r["outcome"] == "recorded"
        )

    wait_until(lambda: recorded() >= quarter, 120, f"{quarter} tasks recorded")
    victims = [f"w{n}" for n in range(min(kill_workers, processes))]
    if victims:
        fleet.sigkill(victims[0])
    failover = fail_over(pair, promote_after)
    for victim in victims[1:]:
        fleet.sigkill(victim)
    for n, _ in enumerate(victims):
        worker_id = f"w{processes + n}"
        fleet.start(
            Spec(
                "worker",
                url,
                str(directory),
                worker_id,
                threads,
                ttl_seconds,
                seed * 100 + processes + n,
            )
        )
    new_primary = SqlBackend(pair.server_url(standby=True))
    try:
        wait_until(
            lambda: all(s.status.is_terminal for s in _load_all(new_primary, inputs).values()),
            finish_timeout,
            "every workflow finished",
        )
        finished_at = time.time()
        exit_codes = fleet.stop()
        snapshots = _load_all(new_primary, inputs)
    finally:
        new_primary.close()
    journals, torn = read_journals(directory)
    return WorkerRun(
        failover, inputs, snapshots, journals, torn, exit_codes, fleet.killed, finished_at
    )


def _load_all(backend: SqlBackend, inputs: dict[str, bytes]) -> dict[str, WorkflowSnapshot]:
    return {instance_id: backend.load_snapshot(instance_id) for instance_id in inputs}


def check_worker_run(run: WorkerRun) -> list[str]:
    """Everything that must hold after a run; the problems found (empty: all good).

    - every workflow completed, every task's result stored;
    - every stored result is the output of an execution that ran (its ``exec`` line) with
      the input the workflow held then (the chain of digests);
    - no acknowledged completion lost: every completion ``complete_tasks`` answered
      ``recorded`` is the stored one (same output);
    - none recorded twice: per task, one token only was ever acknowledged as recorded
      (a repeat of the same completion, after an unknown outcome, may answer again);
    - the surviving processes exited cleanly.
    """
    problems: list[str] = []
    executions = {r["exec"]: r for r in run.records("exec")}
    acked: dict[tuple[str, str], dict[int, str]] = {}
    for r in run.records("ack"):
        if r["outcome"] == "recorded":
            acked.setdefault((r["instance"], r["task"]), {})[r["token"]] = r["output"]
    for instance_id, snapshot in run.snapshots.items():
        if snapshot.status.value != "completed":
            problems.append(f"{instance_id}: {snapshot.status.value}, not completed")
            continue
        outputs = snapshot.completed_tasks
        for task_id in TASKS:
            output = outputs.get(task_id)
            if output is None:
                problems.append(f"{instance_id}/{task_id}: no result stored")
                continue
            stored = json.loads(output)
            if stored["exec"] not in executions:
                problems.append(f"{instance_id}/{task_id}: stored output of no execution")
            expected_input = (
                digest(run.inputs[instance_id])
                if task_id == "s1"
                else digest(outputs.get("s1"))
                if task_id in ("s2a", "s2b")
                else None
            )
            if expected_input is not None and stored["input"] != expected_input:
                problems.append(f"{instance_id}/{task_id}: ran on an input that is not stored")
            if task_id == "s3":
                for branch in ("s2a", "s2b"):
                    if stored[branch] != digest(outputs.get(branch)):
                        problems.append(f"{instance_id}/s3: read a {branch} result not stored")
            tokens = acked.get((instance_id, task_id), {})
            if len(tokens) > 1:
                problems.append(f"{instance_id}/{task_id}: recorded under tokens {sorted(tokens)}")
            for token, acked_output in tokens.items():
                if acked_output != digest(output):
                    problems.append(
                        f"{instance_id}/{task_id}: acknowledged result (token {token}) lost"
                    )
    for worker_id, code in run.exit_codes.items():
        if worker_id not in run.killed and code != 0:
            problems.append(f"process {worker_id} exited {code}")
    if run.torn > len(run.killed):
        problems.append(f"{run.torn} torn journal lines, {len(run.killed)} processes killed")
    return problems


def check_claims(journals: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The claimers' journals: per task, every token handed out once, tokens rising with
    the time of their claim (the store's clock), and no claim granted while an earlier one
    was live (neither released nor expired); the problems found."""
    problems: list[str] = []
    released = {
        (r["instance"], r["task"], r["token"])
        for records in journals.values()
        for r in records
        if r["kind"] in ("released", "release-unknown")
    }
    by_task: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for worker_id, records in journals.items():
        for r in records:
            if r["kind"] == "claim":
                by_task.setdefault((r["instance"], r["task"]), []).append(
                    {**r, "worker": worker_id}
                )
    for key, granted in by_task.items():
        tokens = [c["token"] for c in granted]
        if len(set(tokens)) != len(tokens):
            repeated = sorted({t for t in tokens if tokens.count(t) > 1})
            problems.append(f"{key}: tokens handed out twice: {repeated}")
        granted.sort(key=lambda c: c["token"])
        for earlier, later in itertools.pairwise(granted):
            later_at = datetime.fromisoformat(later["claimed_at"])
            if later_at < datetime.fromisoformat(earlier["claimed_at"]):
                problems.append(f"{key}: token {later['token']} granted before {earlier['token']}")
            if (*key, earlier["token"]) in released:
                continue  # released (or maybe released) before: the task was free again
            if later_at < datetime.fromisoformat(earlier["expires_at"]):
                problems.append(
                    f"{key}: token {later['token']} ({later['worker']}) granted at {later_at} "
                    f"while token {earlier['token']} ({earlier['worker']}) was live until "
                    f"{earlier['expires_at']}"
                )
    return problems


def prepare(url: str) -> None:
    """Migrate the pair's database (through the multi-host URL)."""
    migrate(url)


__all__ = [
    "CALL_TIMEOUT",
    "DEFINITION",
    "PIPELINE",
    "TASKS",
    "Failover",
    "Fleet",
    "JournallingBackend",
    "Spec",
    "WorkerRun",
    "check_worker_run",
    "downtime_summary",
    "fail_over",
    "first_success_after",
    "prepare",
    "process_main",
    "read_journals",
    "run_workers_across_failover",
    "start_single_tasks",
    "start_workflows",
]
