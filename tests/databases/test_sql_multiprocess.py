"""Claims stay exclusive when several OS processes, each with many threads, share one database.

Every test runs once per SQL database (sqlite, postgres, mysql, and galera when selected)
against a database of its own, so it never collides with other test runs on the shared
``test`` database:

- PostgreSQL and MySQL/MariaDB: database ``sayiir_mp`` on the server of the fixture URL (created
  when missing, migrated, its ``sayiir_*`` tables emptied before each test);
- SQLite: a file in the test's temporary directory;
- Galera (3-node cluster, ``galera_cluster``): database ``sayiir_mp`` on the cluster, each
  worker process connected to another node (process N to node N mod 3 + 1), so that claims
  race across nodes; the test itself seeds and checks through node 1.

Workers are ``spawn``-ed processes (nothing inherited but arguments): each builds its own
``SqlBackend`` from the URL and runs ``THREADS`` threads that share it, as a real worker would.
What the workers saw is compared with what the database holds, read directly with SQLAlchemy
Core (the tables of ``sayiir_persistence.sql.schema``), not through the backend under test.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import random
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from helpers.clusters import GaleraCluster, again_after_giving_up, backend_options
from helpers.databases import GALERA, sql_params
from sayiir_persistence import (
    AtFork,
    AtTask,
    ClaimedTask,
    ClaimLostError,
    CompletionOutcome,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    migrate,
)
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.sql.schema import metadata, ready_tasks, task_claims, task_results
from sayiir_persistence.testing.contract.completions import chain

# The drain test takes most of the module's time: about 30 s (SQLite) to 100 s (PostgreSQL,
# MariaDB) on two busy cores. The timeout leaves room for a slow machine; a hang still fails.
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(420)]

# --------------------------------------------------------------------------------------------
# Sizes

PROCESSES = 4
THREADS = 8

#: The drain test: single-task workflows plus fork workflows of FORK_WIDTH parallel branches.
DRAIN_SINGLE_WORKFLOWS = 1_000
DRAIN_FORK_WORKFLOWS = 1_000
FORK_WIDTH = 4
DRAIN_TASKS = DRAIN_SINGLE_WORKFLOWS + DRAIN_FORK_WORKFLOWS * FORK_WIDTH  # 5,000
#: claim_available_tasks asks for random.randint(1, MAX_BATCH) tasks at a time.
MAX_BATCH = 10
#: A drain thread stops after this many empty claims in a row AND an empty find.
EMPTY_ROUNDS = 3
EMPTY_BACKOFF_SECONDS = 0.02

#: The completion test: chains of CHAIN_STEPS tasks.
CHAIN_WORKFLOWS = 600
CHAIN_STEPS = ("s1", "s2", "s3")
#: The claim_task race: every thread of every process tries every one of these tasks.
RACE_TASKS = 200
#: The expired-claim tests.
EXPIRY_TASKS = 10
#: The takeover race: claims that expired, taken over by many workers at once.
TAKEOVER_TASKS = 100

SHORT_TTL = timedelta(seconds=1)
#: Slept after a SHORT_TTL claim so that it has expired by the database's clock too.
EXPIRY_WAIT_SECONDS = SHORT_TTL.total_seconds() + 0.5
WORK_TTL = timedelta(minutes=5)
RETRY_AFTER = timedelta(milliseconds=50)

SEED_THREADS = 8
BARRIER_TIMEOUT_SECONDS = 60
PROCESS_TIMEOUT_SECONDS = 300

#: The database of this module's own on the PostgreSQL and MySQL/MariaDB servers.
OWN_DATABASE = "sayiir_mp"

DEFINITION = "mp-definition"

Key = tuple[str, str]

# --------------------------------------------------------------------------------------------
# The database of this module


_migrated: set[str] = set()


def _admin_engine(url: URL) -> sa.Engine:
    return sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def _create_database(server_url: URL, name: str) -> None:
    engine = _admin_engine(server_url)
    try:
        with engine.connect() as conn:
            if server_url.get_backend_name() == "postgresql":
                exists = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                ).first()
                if exists is None:
                    # A concurrent run may create it meanwhile.
                    with contextlib.suppress(sa.exc.ProgrammingError):
                        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            else:
                conn.exec_driver_sql(
                    f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4"
                )
    finally:
        engine.dispose()


def _empty_tables(url: str) -> None:
    """Empty the sayiir_* tables (not the migration version table)."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                if conn.dialect.name == "sqlite":
                    conn.execute(table.delete())
                else:
                    # TRUNCATE, not DELETE: no dead rows left behind for the next test's scans.
                    conn.exec_driver_sql(
                        f"TRUNCATE TABLE {conn.dialect.identifier_preparer.format_table(table)}"
                    )
    finally:
        engine.dispose()


@pytest.fixture(params=[*sql_params(), pytest.param(GALERA, id=GALERA, marks=pytest.mark.galera)])
def mp_urls(request: pytest.FixtureRequest) -> list[str]:
    """This module's own migrated, empty database on the server (or SQLite file) of each
    selected SQL database: its one URL, or on a Galera cluster the URL of each node (node 1
    first, where it is migrated and emptied)."""
    kind: str = request.param
    if kind == GALERA:
        cluster: GaleraCluster = request.getfixturevalue("galera_cluster")
        cluster.create_database(OWN_DATABASE)
        urls = cluster.node_urls(OWN_DATABASE)
    else:
        url = make_url(request.getfixturevalue(f"{kind}_url"))
        if url.get_backend_name() != "sqlite":
            _create_database(url, OWN_DATABASE)
            url = url.set(database=OWN_DATABASE)
        urls = [url.render_as_string(hide_password=False)]
    if urls[0] not in _migrated:
        migrate(urls[0])
        _migrated.add(urls[0])
    _empty_tables(urls[0])
    return urls


@pytest.fixture
def mp_url(mp_urls: list[str]) -> str:
    """The URL the test itself seeds and checks through (Galera: node 1)."""
    return mp_urls[0]


@pytest.fixture
def backend(mp_url: str) -> Iterator[SqlBackend]:
    """The test's own backend (seeding and checks), in the test's process."""
    store = SqlBackend(mp_url)
    try:
        yield store
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# Seeding and reading the database directly


def _seed(backend: SqlBackend, snapshots: Sequence[WorkflowSnapshot]) -> None:
    with ThreadPoolExecutor(SEED_THREADS) as pool:
        versions = list(pool.map(backend.save_snapshot, snapshots))
    assert versions == [1] * len(snapshots)


def _single_task_workflows(prefix: str, count: int, rng: random.Random) -> list[WorkflowSnapshot]:
    return [
        WorkflowSnapshot.new(
            f"{prefix}-{index:05d}",
            DEFINITION,
            initial_input=b"input",
            first_task="t",
            priority=rng.randint(1, 5),
        )
        for index in range(count)
    ]


def _fork_workflows(prefix: str, count: int, rng: random.Random) -> list[WorkflowSnapshot]:
    snapshots = []
    for index in range(count):
        snapshot = WorkflowSnapshot.new(
            f"{prefix}-{index:05d}", DEFINITION, initial_input=b"input", priority=rng.randint(1, 5)
        )
        snapshot.move_to(AtFork("fork", tuple(f"b{branch}" for branch in range(FORK_WIDTH))))
        snapshots.append(snapshot)
    return snapshots


def _keys(snapshots: Sequence[WorkflowSnapshot]) -> list[Key]:
    keys = []
    for snapshot in snapshots:
        position = snapshot.position
        if isinstance(position, AtTask):
            keys.append((snapshot.instance_id, position.task_id))
        else:
            assert isinstance(position, AtFork)
            keys.extend((snapshot.instance_id, task) for task in position.branch_task_ids)
    return keys


def _claim_rows(url: str) -> dict[Key, sa.Row[Any]]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(task_claims)).all()
    finally:
        engine.dispose()
    return {(row.instance_id, row.task_id): row for row in rows}


def _result_counts(url: str) -> Counter[Key]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    task_results.c.instance_id, task_results.c.task_id, sa.func.count()
                ).group_by(task_results.c.instance_id, task_results.c.task_id)
            ).all()
    finally:
        engine.dispose()
    return Counter({(row[0], row[1]): row[2] for row in rows})


def _table_keys(url: str, table: sa.Table) -> set[Key]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.instance_id, table.c.task_id)).all()
    finally:
        engine.dispose()
    return {(row[0], row[1]) for row in rows}


def _output(key: Key) -> bytes:
    return f"{key[0]}/{key[1]}".encode()


# --------------------------------------------------------------------------------------------
# Running worker processes


def _process_entry(
    results: Any, index: int, target: Callable[..., Any], barrier: Any, args: tuple[Any, ...]
) -> None:
    """The body of a worker process: run ``target`` and report its value or traceback."""
    try:
        value = target(index, barrier, *args)
    except BaseException:
        results.put((index, False, traceback.format_exc()))
    else:
        results.put((index, True, value))


def _run_processes(target: Callable[..., Any], urls: Sequence[str], *args: Any) -> list[Any]:
    """Run ``target(index, barrier, url, *args)`` in PROCESSES spawned processes; their values.

    ``url``: process ``index``'s among ``urls`` (in turn: one per Galera node). ``barrier``
    is a multiprocessing barrier for all PROCESSES x THREADS threads. A process
    that raises, dies or outlives PROCESS_TIMEOUT_SECONDS fails the test.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    barrier = context.Barrier(PROCESSES * THREADS)
    processes = [
        context.Process(
            target=_process_entry,
            args=(results, index, target, barrier, (urls[index % len(urls)], *args)),
            name=f"sayiir-mp-worker-{index}",
        )
        for index in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    values: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + PROCESS_TIMEOUT_SECONDS
    try:
        while len(values) + len(failures) < len(processes):
            try:
                index, ok, value = results.get(timeout=1)
            except queue.Empty:
                dead = [p.name for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    failures.append(f"worker process(es) died without reporting: {dead}")
                    break
                if time.monotonic() > deadline:
                    failures.append(
                        f"worker processes still running after {PROCESS_TIMEOUT_SECONDS}s"
                    )
                    break
                continue
            if ok:
                values[index] = value
            else:
                failures.append(f"worker process {index} raised:\n{value}")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
        results.close()
        results.join_thread()
    assert not failures, "\n".join(failures)
    return [values[index] for index in sorted(values)]


def _in_threads(work: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(work, range(THREADS)))


# --------------------------------------------------------------------------------------------
# Worker process bodies (module level: a spawned process imports them by name)


def _drain_process(index: int, barrier: Any, url: str, seed: int) -> dict[str, Any]:
    """Loop claim_available_tasks until nothing is left; complete and release each task."""
    backend = SqlBackend(url, **backend_options(url))
    patiently = partial(again_after_giving_up, url)

    def thread(number: int) -> tuple[list[tuple[str, str, str, int]], list[str]]:
        worker_id = f"drain-p{index}-t{number}"
        rng = random.Random(seed * 1_000 + index * THREADS + number)
        received: list[tuple[str, str, str, int]] = []
        errors: list[str] = []
        try:
            backend.find_available_tasks(worker_id, 1)  # open a connection before the start
            barrier.wait(BARRIER_TIMEOUT_SECONDS)
            empty = 0
            while True:
                size = rng.randint(1, MAX_BATCH)
                batch = patiently(backend.claim_available_tasks, worker_id, size, WORK_TTL)
                if not batch:
                    empty += 1
                    if empty >= EMPTY_ROUNDS and not backend.find_available_tasks(
                        worker_id, MAX_BATCH
                    ):
                        break
                    time.sleep(EMPTY_BACKOFF_SECONDS * empty)
                    continue
                empty = 0
                for claimed in batch:
                    claim, task = claimed.claim, claimed.task
                    key = (task.instance_id, task.task_id)
                    received.append((*key, worker_id, claim.token))
                    if (claim.instance_id, claim.task_id, claim.worker_id) != (*key, worker_id):
                        errors.append(f"claim {claim} does not match task {task}")
                    patiently(backend.save_task_result, *key, _output(key))
                    patiently(backend.release_task_claim, *key, worker_id, token=claim.token)
        except Exception:
            errors.append(f"{worker_id}: {traceback.format_exc()}")
        return received, errors

    try:
        outcomes = _in_threads(thread)
    finally:
        backend.close()
    return {
        "received": [item for received, _ in outcomes for item in received],
        "errors": [error for _, errors in outcomes for error in errors],
    }


#: CHAIN_STEPS in order, then complete with the last output (runs inside the store).
_chain_advance = chain(*CHAIN_STEPS)


def _fails_first(key: Key) -> bool:
    """A third of the tasks fail at their first attempt (the retried test)."""
    return zlib.crc32("/".join(key).encode()) % 3 == 0


def _complete_process(
    index: int, barrier: Any, url: str, seed: int, flaky: bool = False
) -> dict[str, Any]:
    """Claim available tasks, then complete them in batches with ``complete_tasks``, taking
    each chain's next task with the completion (``claim_next``) until nothing is left.

    ``flaky``: :func:`_fails_first` tasks fail their first attempt, retried after RETRY_AFTER
    (so nothing is left only once no workflow is in progress)."""
    backend = SqlBackend(url, **backend_options(url))
    patiently = partial(again_after_giving_up, url)

    def finished(worker_id: str) -> bool:
        if backend.find_available_tasks(worker_id, MAX_BATCH):
            return False
        return not flaky or not backend.list_snapshots(status=WorkflowStatus.IN_PROGRESS, limit=1)

    def thread(number: int) -> tuple[list[tuple[str, str, str, int]], list[str]]:
        worker_id = f"complete-p{index}-t{number}"
        rng = random.Random(seed * 1_000 + index * THREADS + number)
        received: list[tuple[str, str, str, int]] = []
        errors: list[str] = []
        try:
            backend.find_available_tasks(worker_id, 1)  # open a connection before the start
            barrier.wait(BARRIER_TIMEOUT_SECONDS)
            held: list[ClaimedTask] = []
            empty = 0
            while True:
                if not held:
                    size = rng.randint(1, MAX_BATCH)
                    held = patiently(backend.claim_available_tasks, worker_id, size, WORK_TTL)
                if not held:
                    empty += 1
                    if empty >= EMPTY_ROUNDS and finished(worker_id):
                        break
                    time.sleep(EMPTY_BACKOFF_SECONDS * min(empty, 10))
                    continue
                empty = 0
                completions = []
                for claimed in held:
                    key = (claimed.task.instance_id, claimed.task.task_id)
                    received.append((*key, worker_id, claimed.claim.token))
                    if flaky and claimed.claim.attempt == 1 and _fails_first(key):
                        completions.append(
                            TaskCompletion(
                                *key,
                                worker_id,
                                claimed.claim.token,
                                error="first attempts fail",
                                retry_after=RETRY_AFTER,
                            )
                        )
                        continue
                    completions.append(
                        TaskCompletion(
                            *key,
                            worker_id,
                            claimed.claim.token,
                            output=_output(key),
                            advance=_chain_advance,
                        )
                    )
                claim_next = rng.randint(0, MAX_BATCH)
                results = patiently(
                    backend.complete_tasks, completions, ttl=WORK_TTL, claim_next=claim_next
                )
                held = []
                for completion, result in zip(completions, results, strict=True):
                    wanted = (
                        CompletionOutcome.RECORDED
                        if completion.error is None
                        else CompletionOutcome.RETRY_SCHEDULED
                    )
                    if result.outcome is not wanted:
                        errors.append(f"{completion.instance_id}/{completion.task_id}: {result}")
                    held += result.next_tasks
        except Exception:
            errors.append(f"{worker_id}: {traceback.format_exc()}")
        return received, errors

    try:
        outcomes = _in_threads(thread)
    finally:
        backend.close()
    return {
        "received": [item for received, _ in outcomes for item in received],
        "errors": [error for _, errors in outcomes for error in errors],
    }


def _claim_race_process(
    index: int, barrier: Any, url: str, keys: list[Key], seed: int
) -> dict[str, Any]:
    """Every thread calls claim_task on every key (own shuffled order); report the wins."""
    backend = SqlBackend(url, **backend_options(url))

    def thread(number: int) -> tuple[list[tuple[str, str, str, int]], list[str]]:
        worker_id = f"race-p{index}-t{number}"
        order = list(keys)
        random.Random(seed * 1_000 + index * THREADS + number).shuffle(order)
        wins: list[tuple[str, str, str, int]] = []
        errors: list[str] = []
        try:
            backend.find_available_tasks(worker_id, 1)
            barrier.wait(BARRIER_TIMEOUT_SECONDS)
            for key in order:
                claim = backend.claim_task(*key, worker_id, WORK_TTL)
                if claim is not None:
                    wins.append((claim.instance_id, claim.task_id, claim.worker_id, claim.token))
        except Exception:
            errors.append(f"{worker_id}: {traceback.format_exc()}")
        return wins, errors

    try:
        outcomes = _in_threads(thread)
    finally:
        backend.close()
    return {
        "wins": [win for wins, _ in outcomes for win in wins],
        "errors": [error for _, errors in outcomes for error in errors],
    }


def _takeover_race_process(
    index: int, barrier: Any, url: str, keys: list[Key], seed: int
) -> dict[str, Any]:
    """Take over expired claims: even threads by claim_task, odd by claim_available_tasks."""
    backend = SqlBackend(url, **backend_options(url))

    def thread(number: int) -> tuple[list[tuple[str, str, str, int]], list[str]]:
        worker_id = f"takeover-p{index}-t{number}"
        rng = random.Random(seed * 1_000 + index * THREADS + number)
        wins: list[tuple[str, str, str, int]] = []
        errors: list[str] = []

        def record(claim: Any) -> None:
            wins.append((claim.instance_id, claim.task_id, claim.worker_id, claim.token))

        try:
            backend.find_available_tasks(worker_id, 1)
            barrier.wait(BARRIER_TIMEOUT_SECONDS)
            if number % 2 == 0:
                order = list(keys)
                rng.shuffle(order)
                for key in order:
                    claim = backend.claim_task(*key, worker_id, WORK_TTL)
                    if claim is not None:
                        record(claim)
            else:
                empty = 0
                while True:
                    batch = backend.claim_available_tasks(
                        worker_id, rng.randint(1, MAX_BATCH), WORK_TTL
                    )
                    for claimed in batch:
                        record(claimed.claim)
                    if batch:
                        empty = 0
                        continue
                    empty += 1
                    if empty >= EMPTY_ROUNDS and not backend.find_available_tasks(
                        worker_id, MAX_BATCH
                    ):
                        break
                    time.sleep(EMPTY_BACKOFF_SECONDS * empty)
        except Exception:
            errors.append(f"{worker_id}: {traceback.format_exc()}")
        return wins, errors

    try:
        outcomes = _in_threads(thread)
    finally:
        backend.close()
    return {
        "wins": [win for wins, _ in outcomes for win in wins],
        "errors": [error for _, errors in outcomes for error in errors],
    }


# Bodies for the expired-claim test, run in two long-lived single-process pools (the stale
# claimer and the newcomer); each process keeps one backend for all its calls.

_process_backends: dict[str, SqlBackend] = {}


def _process_backend(url: str) -> SqlBackend:
    if url not in _process_backends:
        _process_backends[url] = SqlBackend(url, **backend_options(url))
    return _process_backends[url]


def _claim_all(url: str, keys: list[Key], worker_id: str, ttl: timedelta) -> list[int | None]:
    backend = _process_backend(url)
    tokens = []
    for key in keys:
        claim = backend.claim_task(*key, worker_id, ttl)
        tokens.append(None if claim is None else claim.token)
    return tokens


def _outcome(call: Callable[[], Any]) -> str:
    """What a call did, as a picklable word: the exception class name or the value's repr."""
    try:
        value = call()
    except Exception as error:
        return type(error).__name__
    return repr(value) if value is None or isinstance(value, bool | int) else "claim"


def _act_as_stale_claimer(
    url: str, keys: list[Key], worker_id: str, token: int | None
) -> list[dict[str, str]]:
    """Release, extend and fenced-save with an old claim; what each attempt did, per key."""
    backend = _process_backend(url)
    outcomes = []
    for instance_id, task_id in keys:
        snapshot = backend.load_snapshot(instance_id)
        snapshot.mark_task_completed(task_id, b"stale result")
        snapshot.mark_completed(b"stale output")
        outcomes.append(
            {
                "release": _outcome(
                    partial(
                        backend.release_task_claim, instance_id, task_id, worker_id, token=token
                    )
                ),
                "extend": _outcome(
                    partial(
                        backend.extend_task_claim,
                        instance_id,
                        task_id,
                        worker_id,
                        WORK_TTL,
                        token=token,
                    )
                ),
                "fenced_save": _outcome(
                    partial(backend.save_snapshot_fenced, snapshot, task_id, worker_id, token=token)
                ),
            }
        )
    return outcomes


def _extend_and_release(url: str, keys: list[Key], worker_id: str, token: int) -> list[int]:
    backend = _process_backend(url)
    tokens = []
    for key in keys:
        tokens.append(backend.extend_task_claim(*key, worker_id, WORK_TTL, token=token).token)
        backend.release_task_claim(*key, worker_id, token=token)
    return tokens


# --------------------------------------------------------------------------------------------
# Tests


def _flatten(values: list[dict[str, Any]], field: str) -> tuple[list[Any], list[str]]:
    items = [item for value in values for item in value[field]]
    errors = [error for value in values for error in value["errors"]]
    return items, errors


def test_claim_available_tasks_hands_out_every_task_exactly_once(
    mp_url: str, mp_urls: list[str], backend: SqlBackend
) -> None:
    rng = random.Random(1)
    snapshots = _single_task_workflows("drain", DRAIN_SINGLE_WORKFLOWS, rng) + _fork_workflows(
        "drain-fork", DRAIN_FORK_WORKFLOWS, rng
    )
    expected = _keys(snapshots)
    assert len(expected) == len(set(expected)) == DRAIN_TASKS
    started = time.monotonic()
    _seed(backend, snapshots)
    seeded = time.monotonic()

    values = _run_processes(_drain_process, mp_urls, 1)
    drained = time.monotonic()
    received, errors = _flatten(values, "received")
    assert not errors, "\n".join(errors)

    # In the workers: each task handed out once, all of them, each as a first claim.
    counts = Counter((instance_id, task_id) for instance_id, task_id, _, _ in received)
    duplicates = {key: count for key, count in counts.items() if count > 1}
    assert not duplicates, f"{len(duplicates)} tasks handed out more than once: {duplicates}"
    assert len(received) == DRAIN_TASKS
    assert set(counts) == set(expected)
    assert {token for *_, token in received} == {1}

    # In the database: one result per task, one claim (token 1, released) by its receiver.
    results = _result_counts(mp_url)
    assert set(results) == set(expected)
    assert set(results.values()) == {1}
    claims = _claim_rows(mp_url)
    assert set(claims) == set(expected)
    receiver = {(instance_id, task_id): worker for instance_id, task_id, worker, _ in received}
    wrong = [
        (key, row.worker_id, row.token, row.released)
        for key, row in claims.items()
        if (row.worker_id, row.token, bool(row.released)) != (receiver[key], 1, True)
    ]
    assert not wrong, f"claims not (receiver, token 1, released): {wrong[:20]}"
    assert _table_keys(mp_url, ready_tasks) == set()
    assert backend.find_available_tasks("drain-check", 10) == []
    for instance_id in (snapshots[0].instance_id, snapshots[-1].instance_id):
        stored = backend.load_snapshot(instance_id)
        assert stored.completed_tasks == {
            task: _output((instance_id, task))
            for instance_id_, task in expected
            if instance_id_ == instance_id
        }

    per_process = Counter(worker.split("-t")[0] for _, _, worker, _ in received)
    print(
        f"\n[drain {make_url(mp_url).get_backend_name()}] {DRAIN_TASKS} tasks, "
        f"{PROCESSES}x{THREADS} workers: seed {seeded - started:.1f}s, "
        f"drain {drained - seeded:.1f}s; per process {dict(sorted(per_process.items()))}"
    )


def test_completions_in_batches_record_every_chain_task_exactly_once(
    mp_url: str, mp_urls: list[str], backend: SqlBackend
) -> None:
    """``complete_tasks`` from PROCESSES x THREADS workers, with next claims: every task of
    every chain handed out once, recorded once by its holder, every chain completed."""
    snapshots = [
        WorkflowSnapshot.new(
            f"chain-{index:05d}", DEFINITION, initial_input=b"input", first_task=CHAIN_STEPS[0]
        )
        for index in range(CHAIN_WORKFLOWS)
    ]
    expected = {(s.instance_id, step) for s in snapshots for step in CHAIN_STEPS}
    _seed(backend, snapshots)

    values = _run_processes(_complete_process, mp_urls, 1)
    received, errors = _flatten(values, "received")
    assert not errors, "\n".join(errors[:20])

    counts = Counter((instance_id, task_id) for instance_id, task_id, _, _ in received)
    duplicates = {key: count for key, count in counts.items() if count > 1}
    assert not duplicates, f"{len(duplicates)} tasks handed out more than once: {duplicates}"
    assert set(counts) == expected
    results = _result_counts(mp_url)
    assert set(results) == expected and set(results.values()) == {1}
    claims = _claim_rows(mp_url)
    receiver = {(instance_id, task_id): worker for instance_id, task_id, worker, _ in received}
    wrong = [
        (key, row.worker_id, row.token, row.released)
        for key, row in claims.items()
        if (row.worker_id, row.token, bool(row.released)) != (receiver[key], 1, True)
    ]
    assert not wrong, f"claims not (receiver, token 1, released): {wrong[:20]}"
    assert _table_keys(mp_url, ready_tasks) == set()
    for snapshot in (snapshots[0], snapshots[-1]):
        stored = backend.load_snapshot(snapshot.instance_id)
        assert stored.status is WorkflowStatus.COMPLETED
        assert stored.output == _output((snapshot.instance_id, CHAIN_STEPS[-1]))


def test_retried_tasks_record_their_result_exactly_once(
    mp_url: str, mp_urls: list[str], backend: SqlBackend
) -> None:
    """As above, with a third of the tasks failing their first attempt (``retry_after``):
    each of those is handed out exactly twice (tokens 1 and 2), every task recorded exactly
    once, every chain completed."""
    snapshots = [
        WorkflowSnapshot.new(
            f"retried-{index:05d}", DEFINITION, initial_input=b"input", first_task=CHAIN_STEPS[0]
        )
        for index in range(CHAIN_WORKFLOWS // 4)
    ]
    expected = {(s.instance_id, step) for s in snapshots for step in CHAIN_STEPS}
    _seed(backend, snapshots)

    values = _run_processes(_complete_process, mp_urls, 2, True)
    received, errors = _flatten(values, "received")
    assert not errors, "\n".join(errors[:20])

    tokens: dict[Key, list[int]] = {}
    for instance_id, task_id, _, token in received:
        tokens.setdefault((instance_id, task_id), []).append(token)
    assert set(tokens) == expected
    wrong = {
        key: sorted(handed)
        for key, handed in tokens.items()
        if sorted(handed) != ([1, 2] if _fails_first(key) else [1])
    }
    assert not wrong, f"tasks not handed out once per attempt: {list(wrong.items())[:20]}"
    assert any(_fails_first(key) for key in expected)
    results = _result_counts(mp_url)
    assert set(results) == expected and set(results.values()) == {1}
    for snapshot in snapshots:
        stored = backend.load_snapshot(snapshot.instance_id)
        assert stored.status is WorkflowStatus.COMPLETED, snapshot.instance_id


def test_claim_task_race_has_one_winner_per_task(
    mp_url: str, mp_urls: list[str], backend: SqlBackend
) -> None:
    snapshots = _single_task_workflows("race", RACE_TASKS, random.Random(2))
    keys = _keys(snapshots)
    _seed(backend, snapshots)

    started = time.monotonic()
    values = _run_processes(_claim_race_process, mp_urls, keys, 2)
    raced = time.monotonic() - started
    wins, errors = _flatten(values, "wins")
    assert not errors, "\n".join(errors)

    winners: dict[Key, list[str]] = {}
    for instance_id, task_id, worker, _ in wins:
        winners.setdefault((instance_id, task_id), []).append(worker)
    several = {key: workers for key, workers in winners.items() if len(workers) > 1}
    assert not several, f"tasks claimed by several workers: {several}"
    assert set(winners) == set(keys)
    assert {token for *_, token in wins} == {1}

    claims = _claim_rows(mp_url)
    assert set(claims) == set(keys)
    wrong = [
        (key, row.worker_id, row.token, row.released)
        for key, row in claims.items()
        if (row.worker_id, row.token, bool(row.released)) != (winners[key][0], 1, False)
    ]
    assert not wrong, f"claims not (winner, token 1, live): {wrong[:20]}"
    print(
        f"\n[claim race {make_url(mp_url).get_backend_name()}] {RACE_TASKS} tasks x "
        f"{PROCESSES * THREADS} claimers: {raced:.1f}s"
    )


def _assert_untouched(
    url: str, backend: SqlBackend, keys: list[Key], holder: str, token: int
) -> None:
    """Nothing the stale claimer tried was written; the new holder still holds the claim."""
    for instance_id, task_id in keys:
        stored = backend.load_snapshot(instance_id)
        assert (stored.version, stored.status, stored.position, stored.completed_tasks) == (
            1,
            WorkflowStatus.IN_PROGRESS,
            AtTask(task_id),
            {},
        )
        assert backend.load_task_result(instance_id, task_id) is None
    claims = _claim_rows(url)
    assert {
        key: (claims[key].worker_id, claims[key].token, bool(claims[key].released)) for key in keys
    } == {key: (holder, token, False) for key in keys}
    # The failed fenced saves rolled back: the ready rows they cleared are still there.
    assert _table_keys(url, ready_tasks) >= set(keys)


def test_expired_claim_taken_over_cannot_release_extend_or_fenced_save(
    mp_urls: list[str], backend: SqlBackend
) -> None:
    """The stale claimer and the newcomer are separate processes (on Galera, connected to
    nodes 1 and 2)."""
    mp_url, newcomer_url = mp_urls[0], mp_urls[1 % len(mp_urls)]
    other = _single_task_workflows("expired-other", EXPIRY_TASKS, random.Random(3))
    same = _single_task_workflows("expired-same", EXPIRY_TASKS, random.Random(4))
    other_keys, same_keys = _keys(other), _keys(same)
    _seed(backend, other + same)

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as stale, context.Pool(1) as newcomer:
        # The stale claimer claims briefly; its claims expire; others take them over.
        tokens = stale.apply(_claim_all, (mp_url, other_keys, "stale-worker", SHORT_TTL))
        assert tokens == [1] * EXPIRY_TASKS
        tokens = stale.apply(_claim_all, (mp_url, same_keys, "same-worker", SHORT_TTL))
        assert tokens == [1] * EXPIRY_TASKS
        time.sleep(EXPIRY_WAIT_SECONDS)
        tokens = newcomer.apply(_claim_all, (newcomer_url, other_keys, "new-worker", WORK_TTL))
        assert tokens == [2] * EXPIRY_TASKS
        # The same worker id, restarted elsewhere, claims its own expired tasks anew.
        tokens = newcomer.apply(_claim_all, (newcomer_url, same_keys, "same-worker", WORK_TTL))
        assert tokens == [2] * EXPIRY_TASKS

        # Taken over by another worker: refused with or without the old token.
        lost = ClaimLostError.__name__
        refused = {"release": lost, "extend": lost, "fenced_save": "False"}
        for token in (None, 1):
            outcomes = stale.apply(
                _act_as_stale_claimer, (mp_url, other_keys, "stale-worker", token)
            )
            assert outcomes == [refused] * EXPIRY_TASKS, f"token={token}"
        _assert_untouched(mp_url, backend, other_keys, "new-worker", 2)

        # Taken over by the same worker id: the old token is refused.
        outcomes = stale.apply(_act_as_stale_claimer, (mp_url, same_keys, "same-worker", 1))
        assert outcomes == [refused] * EXPIRY_TASKS
        _assert_untouched(mp_url, backend, same_keys, "same-worker", 2)

        # The new holders are unaffected: they heartbeat and release with their token.
        assert (
            newcomer.apply(_extend_and_release, (newcomer_url, other_keys, "new-worker", 2))
            == [2] * EXPIRY_TASKS
        )
        assert (
            newcomer.apply(_extend_and_release, (newcomer_url, same_keys, "same-worker", 2))
            == [2] * EXPIRY_TASKS
        )


def test_expired_claims_taken_over_under_contention_have_one_new_holder(
    mp_url: str, mp_urls: list[str], backend: SqlBackend
) -> None:
    snapshots = _single_task_workflows("takeover", TAKEOVER_TASKS, random.Random(5))
    keys = _keys(snapshots)
    _seed(backend, snapshots)
    for key in keys:
        claim = backend.claim_task(*key, "stale-worker", SHORT_TTL)
        assert claim is not None and claim.token == 1
    time.sleep(EXPIRY_WAIT_SECONDS)

    started = time.monotonic()
    values = _run_processes(_takeover_race_process, mp_urls, keys, 5)
    raced = time.monotonic() - started
    wins, errors = _flatten(values, "wins")
    assert not errors, "\n".join(errors)

    winners: dict[Key, list[tuple[str, int]]] = {}
    for instance_id, task_id, worker, token in wins:
        winners.setdefault((instance_id, task_id), []).append((worker, token))
    several = {key: holders for key, holders in winners.items() if len(holders) > 1}
    assert not several, f"expired claims taken over by several workers: {several}"
    assert set(winners) == set(keys)
    assert {token for *_, token in wins} == {2}

    claims = _claim_rows(mp_url)
    assert set(claims) == set(keys)
    wrong = [
        (key, row.worker_id, row.token, row.released)
        for key, row in claims.items()
        if (row.worker_id, row.token, bool(row.released)) != (winners[key][0][0], 2, False)
    ]
    assert not wrong, f"claims not (new holder, token 2, live): {wrong[:20]}"
    by_method = Counter(
        "claim_task" if int(worker.rsplit("-t", 1)[1]) % 2 == 0 else "claim_available_tasks"
        for _, _, worker, _ in wins
    )
    print(
        f"\n[takeover race {make_url(mp_url).get_backend_name()}] {TAKEOVER_TASKS} expired claims "
        f"x {PROCESSES * THREADS} claimers: {raced:.1f}s; won by {dict(by_method)}"
    )
