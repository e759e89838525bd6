"""SQLite shared by several processes: ``database is locked`` never escapes raw.

A write that finds the database locked waits up to ``sqlite_busy_timeout`` and then raises
``BackendUnavailableError`` (retryable) with the driver's exception as ``__cause__``; it
writes nothing, and the backend keeps working once the lock is gone. Reads do not wait for
writers (WAL): they see the last committed state.

- A *locker* is another process using the raw ``sqlite3`` module: it holds ``BEGIN
  EXCLUSIVE`` with an uncommitted ``UPDATE`` of every workflow (so a reader that saw it
  would see priority 5) until told to roll back. Timings are coarse bounds, not benchmarks:
  a write gives up no sooner than the busy timeout and well before the timeout plus a
  generous margin; also when several threads of one backend wait at once (the backend queues
  its own writers: the queue counts against the same timeout, or the last thread would wait
  one timeout per thread ahead of it). ``migrate`` under the lock is unavailable too, not a
  schema error; opening a new backend (its schema check is a read) does not wait at all.
- The hammer test runs several processes of several threads each (claims, fenced saves,
  releases, new workflows, reads) on one file for a few seconds, half of them with a busy
  timeout shorter than the bursts of a locker thread. Every exception is journalled: none
  but ``BackendUnavailableError`` may occur (and only with the short timeout), its cause
  being the driver's ``database is locked`` or, for a thread that waited its whole timeout
  behind its own process's writers, a ``TimeoutError``; and the file must agree with what the
  processes saw accepted (see ``test_processes_hammering_one_file``).
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from helpers.crash_workers import Journal, advance_chain, chain_workflow, read_journals
from sayiir_persistence import (
    AtTask,
    BackendUnavailableError,
    NotFoundError,
    SignalKind,
    SignalRequest,
    SqlBackend,
    WorkflowSnapshot,
    WorkflowStatus,
    migrate,
)
from sayiir_persistence.sql import codec
from sayiir_persistence.sql.schema import (
    events,
    signals,
    task_claims,
    task_results,
    workflows,
)

pytestmark = [pytest.mark.sqlite, pytest.mark.timeout(120)]

BUSY_TIMEOUT = timedelta(seconds=0.3)
#: How much longer than the busy timeout a write may take to give up (a loaded machine).
MARGIN_SECONDS = 1.5
#: A read under a held write lock must not wait: it answers in less than this.
READ_SECONDS = 1.0
LONG_TTL = timedelta(minutes=5)

_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
conn.execute("UPDATE sayiir_workflows SET priority = 5")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
"""


def _path(url: str) -> str:
    database = make_url(url).database
    assert database
    return database


@contextmanager
def _locked(url: str) -> Iterator[None]:
    """Another process holds the database's write lock (and an uncommitted write) inside."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, _path(url)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdin is not None and locker.stdout is not None
    try:
        assert locker.stdout.readline().strip() == "locked"
        yield
    finally:
        locker.stdin.write("\n")
        locker.stdin.close()
        locker.stdout.close()
        assert locker.wait(30) == 0


def _assert_locked_error(error: BaseException) -> None:
    """The driver's 'database is locked', chained, never raised itself."""
    assert isinstance(error, BackendUnavailableError)
    cause = error.__cause__
    assert isinstance(cause, sa_exc.OperationalError), repr(cause)
    assert isinstance(cause.orig, sqlite3.OperationalError)
    assert "database is locked" in str(cause.orig)


def _snapshot(instance_id: str) -> WorkflowSnapshot:
    return WorkflowSnapshot.new(instance_id, "locking-v1", initial_input=b"in", first_task="t")


def _table_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a write could touch, read with a fresh engine."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {
                table.name: sorted(tuple(row) for row in conn.execute(sa.select(table)))
                for table in (workflows, task_claims, task_results, signals, events)
            }
    finally:
        engine.dispose()


@pytest.fixture
def store(sqlite_url: str) -> Iterator[SqlBackend]:
    """A provisioned file with two workflows at task ``t``: ``free``, and ``held`` (claimed
    by ``holder`` with token 1); its backend has the short BUSY_TIMEOUT."""
    migrate(sqlite_url)
    backend = SqlBackend(sqlite_url, sqlite_busy_timeout=BUSY_TIMEOUT)
    try:
        backend.save_snapshot(_snapshot("free"))
        backend.save_snapshot(_snapshot("held"))
        claim = backend.claim_task("held", "t", "holder", LONG_TTL)
        assert claim is not None and claim.token == 1
        yield backend
    finally:
        backend.close()


def _writes(backend: SqlBackend) -> dict[str, Callable[[], object]]:
    """One call of every writing method, each of which would succeed on a free database."""
    request = SignalRequest("test", "tester", datetime.now(UTC))
    finished = _snapshot("held")
    finished.mark_task_completed("t", b"out")
    finished.mark_completed(b"out")
    return {
        "save_snapshot": lambda: backend.save_snapshot(_snapshot("new")),
        "save_snapshot_fenced": lambda: backend.save_snapshot_fenced(
            finished, "t", "holder", token=1
        ),
        "save_task_result": lambda: backend.save_task_result("free", "t", b"out"),
        "claim_task": lambda: backend.claim_task("free", "t", "claimer", LONG_TTL),
        "claim_available_tasks": lambda: backend.claim_available_tasks("claimer", 5, LONG_TTL),
        "extend_task_claim": lambda: backend.extend_task_claim(
            "held", "t", "holder", LONG_TTL, token=1
        ),
        "release_task_claim": lambda: backend.release_task_claim("held", "t", "holder", token=1),
        "store_signal": lambda: backend.store_signal("free", SignalKind.PAUSE, request),
        "send_event": lambda: backend.send_event("free", "event", b"payload"),
        "delete_snapshot": lambda: backend.delete_snapshot("free"),
    }


def test_write_under_a_held_lock_gives_up_after_the_busy_timeout(
    sqlite_url: str, store: SqlBackend
) -> None:
    before = _table_rows(sqlite_url)
    timeout = BUSY_TIMEOUT.total_seconds()
    elapsed: dict[str, float] = {}
    with _locked(sqlite_url):
        for name, call in _writes(store).items():
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError) as raised:
                call()
            elapsed[name] = time.monotonic() - started
            _assert_locked_error(raised.value)
    slow_or_fast = {
        name: round(seconds, 2)
        for name, seconds in elapsed.items()
        if not timeout * 0.9 <= seconds < timeout + MARGIN_SECONDS
    }
    assert not slow_or_fast, f"busy timeout {timeout}s, gave up after {slow_or_fast}"
    # Nothing was written.
    assert _table_rows(sqlite_url) == before

    # The same backend works again, every call and every pooled connection.
    results = {name: call() for name, call in _writes(store).items()}
    assert results["save_snapshot"] == 1
    assert results["save_snapshot_fenced"] is True
    with pytest.raises(NotFoundError):
        store.load_snapshot("free")
    assert store.load_snapshot("held").status is WorkflowStatus.COMPLETED

    def cycles(number: int) -> None:
        instance_id = f"after-{number}"
        store.save_snapshot(_snapshot(instance_id))
        for _ in range(5):
            claim = store.claim_task(instance_id, "t", f"w{number}", LONG_TTL)
            assert claim is not None
            store.release_task_claim(instance_id, "t", f"w{number}", token=claim.token)

    threads = [threading.Thread(target=cycles, args=(number,)) for number in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.list_snapshots()) == 14


def test_threads_waiting_together_each_give_up_within_the_busy_timeout(
    sqlite_url: str, store: SqlBackend
) -> None:
    """Several threads of one backend blocked at once: each waits about the busy timeout,
    not its turn behind the others' timeouts."""
    threads = 8
    timeout = BUSY_TIMEOUT.total_seconds()
    for number in range(threads):
        store.save_snapshot(_snapshot(f"w{number}"))
    outcomes: dict[int, tuple[BaseException | None, float]] = {}
    barrier = threading.Barrier(threads)

    def claim(number: int) -> None:
        barrier.wait(10)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            store.claim_task(f"w{number}", "t", f"claimer-{number}", LONG_TTL)
        except BaseException as caught:
            error = caught
        outcomes[number] = (error, time.monotonic() - started)

    with _locked(sqlite_url):
        workers = [threading.Thread(target=claim, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    for error, _ in outcomes.values():
        assert isinstance(error, BackendUnavailableError), repr(error)
        assert error.__cause__ is not None
    waited = sorted(round(seconds, 2) for _, seconds in outcomes.values())
    assert waited[-1] < timeout + MARGIN_SECONDS, f"busy timeout {timeout}s, waits {waited}"
    assert waited[0] >= timeout * 0.9, f"busy timeout {timeout}s, waits {waited}"
    # The lock is gone: all of them can claim now.
    for number in range(threads):
        assert store.claim_task(f"w{number}", "t", f"claimer-{number}", LONG_TTL) is not None


def test_reads_do_not_wait_for_a_held_write_lock(sqlite_url: str) -> None:
    migrate(sqlite_url)
    # A long busy timeout: a read that waited for the lock would take that long.
    backend = SqlBackend(sqlite_url, sqlite_busy_timeout=timedelta(seconds=10))
    try:
        backend.save_snapshot(_snapshot("free"))
        backend.save_task_result("free", "t", b"out")
        backend.save_snapshot(_snapshot("other"))
        reads: dict[str, Callable[[], object]] = {
            "load_snapshot": lambda: backend.load_snapshot("free"),
            "load_task_result": lambda: backend.load_task_result("free", "t"),
            "list_snapshots": backend.list_snapshots,
            "find_available_tasks": lambda: backend.find_available_tasks("reader", 10),
            "get_signal": lambda: backend.get_signal("free", SignalKind.CANCEL),
        }
        with _locked(sqlite_url):
            elapsed = {}
            answers = {}
            for name, call in reads.items():
                started = time.monotonic()
                answers[name] = call()
                elapsed[name] = time.monotonic() - started
            # A fresh backend (new connections, schema check) reads too.
            started = time.monotonic()
            fresh = SqlBackend(sqlite_url, sqlite_busy_timeout=timedelta(seconds=10))
            try:
                answers["fresh"] = fresh.load_snapshot("other")
            finally:
                fresh.close()
            elapsed["fresh backend"] = time.monotonic() - started
    finally:
        backend.close()
    slow = {name: round(seconds, 2) for name, seconds in elapsed.items() if seconds >= 1}
    assert not slow, f"reads waited for the writer: {slow}"
    # The committed state, not the locker's uncommitted priority 5.
    loaded = answers["load_snapshot"]
    assert isinstance(loaded, WorkflowSnapshot) and loaded.priority == 3
    assert loaded.version == 2 and loaded.completed_tasks == {"t": b"out"}
    assert answers["load_task_result"] == b"out"
    assert answers["list_snapshots"] == ["free", "other"]
    found = answers["find_available_tasks"]
    assert isinstance(found, list) and [task.instance_id for task in found] == ["other"]
    assert found[0].priority == 3
    assert answers["get_signal"] is None
    assert isinstance(answers["fresh"], WorkflowSnapshot) and answers["fresh"].priority == 3


def test_migrate_under_a_held_lock_is_unavailable_not_a_schema_error(sqlite_url: str) -> None:
    migrate(sqlite_url)
    timeout = BUSY_TIMEOUT.total_seconds()
    engine = sa.create_engine(sqlite_url, poolclass=NullPool, connect_args={"timeout": timeout})
    try:
        with _locked(sqlite_url), pytest.raises(BackendUnavailableError) as raised:
            migrate(engine)
        _assert_locked_error(raised.value)
        migrate(engine)  # the lock is gone
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# Several processes hammering one file

HAMMER_PROCESSES = 4
HAMMER_THREADS = 4
HAMMER_SECONDS = 3.0
#: Processes with an even index wait long for the lock; odd ones give up quickly.
LONG_BUSY = timedelta(seconds=20)
SHORT_BUSY = timedelta(milliseconds=50)
#: The locker process holds the write lock this long, then leaves it free as long, in turn.
LOCK_BURST_SECONDS = 0.15
STARTUP_SECONDS = 3.0


@dataclass(frozen=True)
class HammerSpec:
    url: str
    directory: str
    index: int
    busy_timeout: timedelta
    start_at: float
    """Wall-clock time at which every process starts, for HAMMER_SECONDS."""
    seed: int


def _hammer_main(spec: HammerSpec) -> None:
    """A process: HAMMER_THREADS threads writing and reading; every outcome journalled."""
    journal = Journal(Path(spec.directory) / f"hammer-{spec.index}.jsonl")
    backend = SqlBackend(spec.url, sqlite_busy_timeout=spec.busy_timeout)
    worker_id = f"hammer-{spec.index}"
    time.sleep(max(0.0, spec.start_at - time.time()))
    deadline = time.monotonic() + HAMMER_SECONDS

    def unavailable(operation: str, error: BackendUnavailableError) -> None:
        cause = error.__cause__
        journal.write(
            "unavailable",
            op=operation,
            cause=type(cause).__name__,
            driver=type(getattr(cause, "orig", None)).__name__,
            message=str(cause),
        )

    def step(rng: random.Random, thread: int, created: list[str]) -> None:
        draw = rng.random()
        if draw < 0.25 or not created:
            instance_id = f"h{spec.index}-{thread}-{len(created)}"
            journal.write("create-intent", instance=instance_id)
            try:
                backend.save_snapshot(chain_workflow(instance_id, 2, b"input"), expected_version=0)
            except BackendUnavailableError as error:
                unavailable("save_snapshot", error)
                return
            journal.write("created", instance=instance_id)
            created.append(instance_id)
        elif draw < 0.45:
            try:
                backend.load_snapshot(rng.choice(created))
                backend.find_available_tasks(worker_id, 5)
                backend.list_snapshots(limit=10)
            except BackendUnavailableError as error:
                unavailable("read", error)
        else:
            try:
                claimed = backend.claim_available_tasks(worker_id, 1, LONG_TTL)
            except BackendUnavailableError as error:
                unavailable("claim_available_tasks", error)
                return
            if not claimed:
                return
            claim = claimed[0].claim
            key = {"instance": claim.instance_id, "task": claim.task_id, "token": claim.token}
            journal.write("claim", **key)
            try:
                snapshot = backend.load_snapshot(claim.instance_id)
                output = json.dumps({**key, "worker": worker_id}).encode()
                advance_chain(snapshot, claim.task_id, output)
                accepted = backend.save_snapshot_fenced(
                    snapshot, claim.task_id, worker_id, token=claim.token
                )
                journal.write("saved", accepted=accepted, output=output.decode(), **key)
            except BackendUnavailableError as error:
                unavailable("save_snapshot_fenced", error)
            try:
                backend.release_task_claim(
                    claim.instance_id, claim.task_id, worker_id, token=claim.token
                )
                journal.write("released", **key)
            except BackendUnavailableError as error:
                unavailable("release_task_claim", error)

    def run(thread: int) -> None:
        rng = random.Random(spec.seed * 100 + thread)
        created: list[str] = []
        while time.monotonic() < deadline:
            try:
                step(rng, thread, created)
            except Exception as error:
                journal.write(
                    "error",
                    type=type(error).__name__,
                    message=str(error),
                    traceback=traceback.format_exc(),
                )

    threads = [threading.Thread(target=run, args=(n,)) for n in range(HAMMER_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    backend.close()


def _lock_bursts(path: str, start_at: float, stop: threading.Event) -> int:
    """Hold the write lock in bursts from ``start_at`` until ``stop``; how many bursts."""
    time.sleep(max(0.0, start_at - time.time()))
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    bursts = 0
    try:
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            time.sleep(LOCK_BURST_SECONDS)
            conn.execute("ROLLBACK")
            bursts += 1
            time.sleep(LOCK_BURST_SECONDS)
    finally:
        conn.close()
    return bursts


@pytest.mark.multiprocess
@pytest.mark.slow
def test_processes_hammering_one_file(sqlite_url: str, tmp_path: Path) -> None:
    """No exception but BackendUnavailableError (for the short timeout only), chained to the
    driver's error; no task saved twice; every accepted write stored; each workflow's
    version and results agree (each accepted fenced save added one result and one version);
    created workflows exist and nothing else does."""
    migrate(sqlite_url)
    journal_dir = tmp_path / "journals"
    journal_dir.mkdir()
    start_at = time.time() + STARTUP_SECONDS
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_hammer_main,
            args=(
                HammerSpec(
                    sqlite_url,
                    str(journal_dir),
                    index,
                    LONG_BUSY if index % 2 == 0 else SHORT_BUSY,
                    start_at,
                    random.randrange(2**32),
                ),
            ),
            daemon=True,
        )
        for index in range(HAMMER_PROCESSES)
    ]
    for process in processes:
        process.start()
    stop = threading.Event()
    bursts: list[int] = []
    locker = threading.Thread(
        target=lambda: bursts.append(_lock_bursts(_path(sqlite_url), start_at, stop))
    )
    locker.start()
    try:
        for process in processes:
            process.join(STARTUP_SECONDS + HAMMER_SECONDS + 60)
    finally:
        stop.set()
        locker.join()
        for process in processes:
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in processes] == [0] * HAMMER_PROCESSES
    assert bursts and bursts[0] > 0

    journals, torn = read_journals(journal_dir)
    assert torn == 0
    records = [
        (int(worker.rsplit("-", 1)[1]), record)
        for worker, records in journals.items()
        for record in records
    ]
    errors = [record["traceback"] for _, record in records if record["kind"] == "error"]
    assert not errors, "non-contract exceptions:\n" + "\n".join(errors[:3])
    unavailable = [(index, record) for index, record in records if record["kind"] == "unavailable"]
    assert unavailable, "the short busy timeout never expired: no contention happened"
    long_waiters = [record for index, record in unavailable if index % 2 == 0]
    assert not long_waiters, f"gave up despite a {LONG_BUSY} busy timeout: {long_waiters[:3]}"
    causes = Counter((record["cause"], record["driver"]) for _, record in unavailable)
    assert set(causes) <= {("OperationalError", "OperationalError"), ("TimeoutError", "NoneType")}
    for _, record in unavailable:
        if record["cause"] == "OperationalError":
            assert "database is locked" in record["message"]

    engine = sa.create_engine(sqlite_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            stored = {row.instance_id: row for row in conn.execute(sa.select(workflows))}
            results = {
                (row.instance_id, row.task_id): row.output
                for row in conn.execute(sa.select(task_results))
            }
    finally:
        engine.dispose()
    kinds = Counter(record["kind"] for _, record in records)
    created = {record["instance"] for _, record in records if record["kind"] == "created"}
    intended = {record["instance"] for _, record in records if record["kind"] == "create-intent"}
    assert created <= set(stored) <= intended
    accepted = [record for _, record in records if record["kind"] == "saved" and record["accepted"]]
    per_task = Counter((record["instance"], record["task"]) for record in accepted)
    assert max(per_task.values(), default=1) == 1, "a task saved twice"
    for record in accepted:
        assert results[record["instance"], record["task"]] == record["output"].encode()
    for instance_id, row in stored.items():
        done = sorted(task for instance, task in results if instance == instance_id)
        assert row.version == 1 + len(done), (instance_id, row.version, done)
        if len(done) == 2:
            assert row.status == WorkflowStatus.COMPLETED.value
        else:
            assert row.status == WorkflowStatus.IN_PROGRESS.value
            assert done == [] or done == ["t1"]
            assert codec.decode_position(row.position) == AtTask("t2" if done else "t1")
    claims = Counter(
        (record["instance"], record["task"], record["token"])
        for _, record in records
        if record["kind"] == "claim"
    )
    assert max(claims.values(), default=1) == 1, "one claim token handed out twice"
    assert kinds["created"] > 20 and kinds["claim"] > 20 and len(accepted) > 20
    print(
        f"\n[sqlite hammer] {HAMMER_PROCESSES}x{HAMMER_THREADS} threads for {HAMMER_SECONDS}s, "
        f"{bursts[0]} lock bursts: {dict(kinds)}; unavailable by cause {dict(causes)}"
    )


def test_migrate_leaves_a_sqlite_file_in_wal_mode(sqlite_url: str) -> None:
    """Worker processes opening a fresh file together must not each try to switch it to WAL
    (a switch needs the file to itself: with a short busy timeout they failed at start)."""
    migrate(sqlite_url)
    with sqlite3.connect(_path(sqlite_url)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
