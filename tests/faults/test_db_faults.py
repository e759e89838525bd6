"""Database faults under ``SqlBackend`` on PostgreSQL and MySQL/MariaDB: lost connections,
a database that refuses connections, and real server restarts.

The faults:

- **Cut connections** (``tcp_proxy.TcpProxy`` between the backend and the server): every open
  connection is reset at once, both sides, the way a crashed server, a dead network path or
  a killed proxy would do it. Cuts are placed precisely in the middle of one transaction
  (before its main write reaches the server, halfway through a multi-megabyte payload, just
  before ``COMMIT``, and after ``COMMIT`` ran with the answer lost: the client cannot know the
  outcome) and at random moments while several threads call the backend in a loop.
- **Refused connections**: the proxy stops listening, as a server that is down.
- **Server restarts**: the real server is restarted (``pg_ctlcluster ... restart``; MariaDB
  shutdown and start) while a ``Worker`` and looping threads use the store. These tests restart
  shared servers, so they only run with ``SAYIIR_TEST_RESTART_SERVERS=1`` (tox environment
  ``faults``); the commands are ``SAYIIR_TEST_POSTGRES_RESTART`` / ``SAYIIR_TEST_MYSQL_RESTART``,
  by default the local servers' (refused for another URL: set the command then).

What is checked, each time:

- a transaction cut before its ``COMMIT`` was sent (nothing committed) is run again, once, on
  a new connection, and applied exactly once;
- a call that the fault breaks otherwise raises ``BackendUnavailableError``, with the driver's
  error as ``__cause__``, never a raw SQLAlchemy or driver exception, and it does so promptly;
- nothing is half written: a task result is either stored whole or absent, and the workflow's
  version counts exactly the results stored (the version bump and the result are one
  transaction); a claim is either granted (and then visible, with the next fencing token) or
  absent; a snapshot is either the old one or the new one, with matching runnable tasks;
- a write whose ``COMMIT`` outcome is unknown is not applied twice: the backend reports the
  failure and leaves it to the caller, who finds out by reading (the *careful client* below);
- the *same* backend object works again, at the first call, once connections are possible
  again: pooled connections that died meanwhile are replaced, not handed out;
- after a restart, every workflow finishes and each task's result is recorded once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, TypeVar, cast

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from helpers.databases import unreachable_reason
from helpers.isolated_db import isolated_database
from helpers.tcp_proxy import TcpProxy
from sayiir_persistence import (
    AtTask,
    BackendUnavailableError,
    CompletionOutcome,
    CompletionResult,
    NotFoundError,
    PersistenceError,
    PersistentBackend,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
)
from sayiir_persistence.provisioning import migrate
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.worker import Pipeline, TaskContext, TaskOutcome, Worker

pytestmark = pytest.mark.faults

T = TypeVar("T")

SERVERS: Final = [
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]

# A call that meets a dead or refusing database must give up promptly.
PROMPT_SECONDS: Final = 5.0
# How long a careful client keeps retrying while the database is unreachable.
PATIENCE_SECONDS: Final = 60.0
CLAIM_TTL: Final = timedelta(seconds=60)
BIG_PAYLOAD: Final = 4 * 1024 * 1024


def commit_trigger(kind: str) -> Callable[[bytes], bool]:
    """Recognises the client's ``COMMIT`` message on the wire.

    PostgreSQL: a query message whose text ends the statement ``COMMIT`` (``READ COMMITTED``
    does not match). MySQL: a ``COM_QUERY`` packet (command byte 3) ``COMMIT``.
    """
    if kind == "postgres":
        return lambda chunk: b"COMMIT\x00" in chunk
    return lambda chunk: chunk.endswith(b"\x03COMMIT")


def payload(instance_id: str, key: str, size: int) -> bytes:
    """Deterministic, incompressible bytes for one write (so a torn write cannot pass)."""
    seed = hashlib.sha256(f"{instance_id}/{key}".encode()).digest()
    return random.Random(seed).randbytes(size)


def assert_translated(error: BackendUnavailableError) -> None:
    cause = error.__cause__
    assert cause is not None, f"{error!r} has no __cause__"
    assert not isinstance(cause, PersistenceError), f"{error!r}: cause {cause!r}"
    assert isinstance(cause, sa_exc.SQLAlchemyError | OSError), f"cause {cause!r}"


def expect_unavailable(call: Callable[[], object]) -> BackendUnavailableError:
    """Run ``call``: it must raise ``BackendUnavailableError`` (properly chained), promptly."""
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT_SECONDS, f"took {elapsed:.1f}s to report the outage"
    assert_translated(info.value)
    return info.value


@pytest.fixture(params=SERVERS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def server_url(kind: str, request: pytest.FixtureRequest) -> str:
    """The configured server of ``kind`` (the session's ``postgres_url`` / ``mysql_url``)."""
    url: str = request.getfixturevalue(f"{kind}_url")
    return url


@pytest.fixture
def private_url(server_url: str) -> Iterator[str]:
    """A migrated private namespace on the server, reached directly."""
    with isolated_database(server_url) as url:
        migrate(url)
        yield url


@dataclass
class Faulty:
    """A backend reached through a proxy that breaks connections, and a direct one to check."""

    kind: str
    proxy: TcpProxy
    backend: SqlBackend
    direct: SqlBackend


@pytest.fixture
def faulty(kind: str, private_url: str) -> Iterator[Faulty]:
    with (
        TcpProxy.for_url(private_url) as proxy,
        contextlib.closing(SqlBackend(proxy.proxied_url(private_url))) as backend,
        contextlib.closing(SqlBackend(private_url)) as direct,
    ):
        yield Faulty(kind, proxy, backend, direct)


def start_workflow(backend: PersistentBackend, instance_id: str, **kwargs: Any) -> None:
    snapshot = WorkflowSnapshot.new(instance_id, "faults-v1", first_task="work", **kwargs)
    backend.save_snapshot(snapshot, expected_version=0)


def available(backend: PersistentBackend, instance_id: str) -> set[str]:
    """The task ids of ``instance_id`` that a worker could claim now."""
    tasks = backend.find_available_tasks("observer", 1000, tags=("raw",))
    return {task.task_id for task in tasks if task.instance_id == instance_id}


# --------------------------------------------------------------------------------------------
# Cuts at precise points of one transaction


@dataclass(frozen=True)
class Operation:
    """One write, a cut point inside it, and how to tell whether it was applied."""

    name: str
    # The statement of the write that carries its data (cut before it reaches the server).
    statement: bytes
    carries_payload: bool
    bumps_version: bool


OPERATIONS: Final = {
    op.name: op
    for op in (
        Operation("save_task_result", b"INSERT INTO sayiir_task_results", True, True),
        Operation("claim_task", b"sayiir_task_claims", False, False),
        Operation("save_snapshot", b"UPDATE sayiir_workflows", True, True),
        # Records the result, moves the workflow on, releases the claim and claims the next
        # task for the same worker, in one transaction.
        Operation("complete_tasks", b"INSERT INTO sayiir_task_results", True, True),
    )
}
# Where the connection dies -> (the call returns normally, the write is applied). A transaction
# cut before COMMIT was sent committed nothing: the backend runs it again, once, on a new
# connection. A cut during COMMIT is reported: its outcome is unknown to the backend.
CUT_POINTS: Final = {
    "before_statement": (True, True),  # the write's statement never reaches the server
    "mid_payload": (True, True),  # 2 MiB of the statement carrying a 4 MiB payload went through
    "before_commit": (False, False),  # everything sent; COMMIT is cut on its way
    "commit_answer_lost": (False, True),  # COMMIT ran; its answer is lost
}
PRECISE_CASES: Final = [
    pytest.param(op, point, id=f"{op}-{point}")
    for op in OPERATIONS
    for point in CUT_POINTS
    if point != "mid_payload" or OPERATIONS[op].carries_payload
]


def _moved(snapshot: WorkflowSnapshot, output: bytes) -> WorkflowSnapshot:
    snapshot.mark_task_completed("work", output)
    snapshot.move_to(AtTask("next"))
    return snapshot


@pytest.mark.parametrize(("operation", "point"), PRECISE_CASES)
def test_connection_cut_inside_a_transaction_writes_all_or_nothing(
    faulty: Faulty, operation: str, point: str
) -> None:
    op = OPERATIONS[operation]
    backend, direct, proxy = faulty.backend, faulty.direct, faulty.proxy
    instance_id = f"cut-{operation}-{point}"
    start_workflow(backend, instance_id)
    before = direct.load_snapshot(instance_id)
    data = payload(instance_id, "big", BIG_PAYLOAD)
    # Everything the write needs is read before the cut is armed: only the write is cut.
    moved = _moved(backend.load_snapshot(instance_id), data)
    held = None
    if operation == "complete_tasks":
        held = backend.claim_task(instance_id, "work", "w1", CLAIM_TTL)
        assert held is not None
        before = direct.load_snapshot(instance_id)
    completion = [
        TaskCompletion(
            instance_id,
            "work",
            "w1",
            1,
            output=data,
            advance=lambda snapshot: snapshot.move_to(AtTask("next")),
        )
    ]

    def complete() -> list[CompletionResult]:
        return backend.complete_tasks(completion, ttl=CLAIM_TTL, claim_next=1)

    calls: dict[str, Callable[[], object]] = {
        "save_task_result": lambda: backend.save_task_result(instance_id, "big", data),
        "claim_task": lambda: backend.claim_task(instance_id, "work", "w1", CLAIM_TTL),
        "save_snapshot": lambda: backend.save_snapshot(moved, expected_version=before.version),
        "complete_tasks": complete,
    }

    if point == "before_statement":
        fired = proxy.cut_when(op.statement)
    elif point == "mid_payload":
        fired = proxy.cut_after(BIG_PAYLOAD // 2)
    else:
        fired = proxy.cut_when(commit_trigger(faulty.kind), deliver=point == "commit_answer_lost")
    succeeds, applied = CUT_POINTS[point]
    if succeeds:
        calls[operation]()
    else:
        expect_unavailable(calls[operation])
    assert fired.is_set(), "the cut did not happen at the intended point"
    proxy.disarm()

    after = direct.load_snapshot(instance_id)
    assert after.version == before.version + (applied and op.bumps_version)
    if operation == "save_task_result":
        assert direct.load_task_result(instance_id, "big") == (data if applied else None)
        assert after.completed_tasks == ({"big": data} if applied else {})
        assert after.last_completed_task_id == ("big" if applied else None)
    elif operation == "claim_task":
        assert available(direct, instance_id) == (set() if applied else {"work"})
        if applied:  # granted, and held by w1 with the first token
            assert direct.extend_task_claim(instance_id, "work", "w1", CLAIM_TTL).token == 1
        else:
            with pytest.raises(NotFoundError):
                direct.extend_task_claim(instance_id, "work", "w1", CLAIM_TTL)
    elif operation == "complete_tasks":
        assert after.position == (AtTask("next") if applied else AtTask("work"))
        assert after.completed_tasks == ({"work": data} if applied else {})
        assert available(direct, instance_id) == set()  # "next" claimed, or "work" still held
        if applied:  # w1's claim released, and the next task claimed for w1
            with pytest.raises(NotFoundError):
                direct.extend_task_claim(instance_id, "work", "w1", CLAIM_TTL)
            assert direct.extend_task_claim(instance_id, "next", "w1", CLAIM_TTL).token == 1
        else:  # nothing written: the claim is still w1's
            assert held is not None
            assert direct.extend_task_claim(instance_id, "work", "w1", CLAIM_TTL).token == 1
    else:
        assert after.position == (AtTask("next") if applied else AtTask("work"))
        assert after.completed_tasks == ({"work": data} if applied else {})
        assert available(direct, instance_id) == ({"next"} if applied else {"work"})

    # The same backend works again at once (its pool held the dead connection), and the
    # caller can finish the job after looking at what is stored.
    assert backend.load_snapshot(instance_id).version == after.version
    if operation == "save_task_result":
        assert backend.save_task_result(instance_id, "big", data) == after.version + 1
        assert direct.load_task_result(instance_id, "big") == data
    elif operation == "claim_task" and not applied:
        claim = backend.claim_task(instance_id, "work", "w1", CLAIM_TTL)
        assert claim is not None and claim.token == 1
    elif operation == "complete_tasks":
        # Repeating a completion whose outcome was unknown is safe: applied, its claim was
        # released and the repeat writes nothing; not applied, the repeat records it.
        [repeat] = complete()
        assert repeat.outcome is (
            CompletionOutcome.CLAIM_LOST if applied else CompletionOutcome.RECORDED
        )
        stored = direct.load_snapshot(instance_id)
        assert stored.completed_tasks == {"work": data}
        assert stored.version == before.version + 1
    elif operation == "save_snapshot" and not applied:
        backend.save_snapshot(_moved(after, data), expected_version=after.version)
        assert direct.load_snapshot(instance_id).completed_tasks == {"work": data}


# --------------------------------------------------------------------------------------------
# The careful client: loops claim -> save result -> release, resolving unknown outcomes


class _Unavailable:
    """What :meth:`CarefulClient._attempt` returns when the call raised
    ``BackendUnavailableError``."""


UNAVAILABLE: Final = _Unavailable()


@dataclass
class Ledger:
    """What one client knows of one workflow."""

    instance_id: str
    confirmed: dict[str, bytes] = field(default_factory=dict)  # results saved for sure
    uncertain: dict[str, bytes] = field(default_factory=dict)  # saves whose outcome is unknown
    token: int = 0  # the last fencing token granted
    version: int = 1  # the last version a save returned


class CarefulClient(threading.Thread):
    """Loops over its workflows: claim ``work``, save a result, release; until stopped.

    It treats ``BackendUnavailableError`` as the contract says (retryable, outcome unknown).
    The transaction of a failed call may still be committing on the server when the error
    arrives, so an unknown outcome is resolved by a call that waits for that transaction's
    locks, never by a plain read: a claim is tried again (``None`` then means the lost one
    committed, and ``extend_task_claim`` without token gives its token); a release is sent
    again (``NotFoundError`` then means the lost one committed). An unknown result save is
    left as *uncertain* and checked at the end. Any other exception, or an inconsistency
    with what it knows, is recorded in ``problems``.
    """

    def __init__(self, backend: PersistentBackend, name: str, workflows: int) -> None:
        super().__init__(name=name, daemon=True)
        self.backend = backend
        self.worker_id = name
        self.ledgers = [Ledger(f"{name}-{number}") for number in range(workflows)]
        self.stop_requested = threading.Event()
        self.problems: list[str] = []
        self.unavailable = 0
        self.successes = 0
        self.slowest = 0.0

    def setup(self) -> None:
        for ledger in self.ledgers:
            start_workflow(self.backend, ledger.instance_id, tags=("raw",))

    def run(self) -> None:
        try:
            cycle = 0
            while not self.stop_requested.is_set():
                for ledger in self.ledgers:
                    self._cycle(ledger, cycle)
                cycle += 1
        except BaseException as error:
            self.problems.append(f"{self.name}: {error!r}")

    def _attempt(self, call: Callable[[], T]) -> T | _Unavailable:
        started = time.monotonic()
        try:
            result = call()
        except BackendUnavailableError as error:
            self.unavailable += 1
            cause = error.__cause__
            if cause is None or isinstance(cause, PersistenceError):
                self.problems.append(f"{error!r} has cause {cause!r}")
            return UNAVAILABLE
        finally:
            self.slowest = max(self.slowest, time.monotonic() - started)
        self.successes += 1
        return result

    def _until_available(self, call: Callable[[], T]) -> T:
        deadline = time.monotonic() + PATIENCE_SECONDS
        while True:
            result = self._attempt(call)
            if not isinstance(result, _Unavailable):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"the store stayed unavailable for {PATIENCE_SECONDS}s")
            time.sleep(0.02)

    def _cycle(self, ledger: Ledger, cycle: int) -> None:
        instance_id = ledger.instance_id
        token = self._claim(ledger)
        key = f"r{cycle:05d}"
        data = payload(instance_id, key, random.choice((64, 4096, 64 * 1024, 512 * 1024)))
        version = self._attempt(lambda: self.backend.save_task_result(instance_id, key, data))
        if isinstance(version, _Unavailable):
            ledger.uncertain[key] = data
        else:
            if version <= ledger.version:
                self.problems.append(f"{instance_id}: version {version} after {ledger.version}")
            ledger.confirmed[key] = data
            ledger.version = version
        self._release(ledger, token)

    def _claim(self, ledger: Ledger) -> int:
        instance_id = ledger.instance_id

        def claim() -> TaskClaim | None:
            return self.backend.claim_task(instance_id, "work", self.worker_id, CLAIM_TTL)

        granted = self._attempt(claim)
        if isinstance(granted, _Unavailable):
            # Unknown outcome: claim again. claim_task locks the task's ready row first, so it
            # waits for the lost transaction if the server is still finishing it; then it
            # answers None if that one committed (the live claim is ours), else it grants.
            granted = self._until_available(claim)
            if granted is None:
                granted = self._held(instance_id)  # ours: learn its token
                if granted is None:
                    raise AssertionError(f"{instance_id}: claim refused, yet we do not hold it")
        elif granted is None:
            # Nobody else claims our workflows: a live claim must be one we lost track of.
            raise AssertionError(f"{instance_id}: claim refused, yet nobody holds it")
        return self._granted(ledger, granted)

    def _granted(self, ledger: Ledger, claim: TaskClaim) -> int:
        if claim.token != ledger.token + 1:
            self.problems.append(f"{ledger.instance_id}: token {claim.token} after {ledger.token}")
        ledger.token = claim.token
        return claim.token

    def _release(self, ledger: Ledger, token: int) -> None:
        instance_id = ledger.instance_id

        def release() -> None:
            self.backend.release_task_claim(instance_id, "work", self.worker_id, token=token)

        if not isinstance(self._attempt(release), _Unavailable):
            return
        # Unknown outcome: releasing again succeeds if it did not commit, else finds no claim.
        with contextlib.suppress(NotFoundError):
            self._until_available(release)

    def _held(self, instance_id: str) -> TaskClaim | None:
        try:
            return self._until_available(
                lambda: self.backend.extend_task_claim(
                    instance_id, "work", self.worker_id, CLAIM_TTL
                )
            )
        except NotFoundError:
            return None

    def finish(self, timeout: float) -> None:
        self.stop_requested.set()
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not finish its cycle within {timeout}s"


def check_ledgers(direct: PersistentBackend, clients: list[CarefulClient]) -> dict[str, int]:
    """Compare the store with what the clients know; returns a few counts for the report."""
    counts: Counter[str] = Counter()
    for client in clients:
        assert client.problems == []
        assert client.slowest < PROMPT_SECONDS * 2, f"a call took {client.slowest:.1f}s"
        counts["calls"] += client.successes + client.unavailable
        counts["unavailable"] += client.unavailable
        for ledger in client.ledgers:
            snapshot = direct.load_snapshot(ledger.instance_id)
            stored = snapshot.completed_tasks
            assert ledger.confirmed.keys() <= stored.keys(), "a confirmed result is missing"
            expected = {**ledger.confirmed, **ledger.uncertain}
            assert stored.keys() <= expected.keys(), "a result nobody saved is stored"
            for key, output in stored.items():
                assert output == expected[key], f"{ledger.instance_id}/{key}: torn result"
            # Each stored result came with exactly one version bump, and nothing else did.
            assert snapshot.version == 1 + len(stored)
            counts["uncertain"] += len(ledger.uncertain)
            counts["uncertain_applied"] += len(stored.keys() & ledger.uncertain.keys())
            # The last release went through: no claim left behind, and tokens continue.
            claim = direct.claim_task(ledger.instance_id, "work", "checker", CLAIM_TTL)
            assert claim is not None, f"{ledger.instance_id}: a claim was left behind"
            assert claim.token == ledger.token + 1
    return dict(counts)


# --------------------------------------------------------------------------------------------
# Cuts at random moments while threads call


def test_connections_cut_while_threads_call(
    faulty: Faulty, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sayiir_persistence.sql.backend")
    clients: list[CarefulClient] = [
        CarefulClient(faulty.backend, f"careful-{number}", workflows=2) for number in range(4)
    ]
    for client in clients:
        client.setup()
        client.start()
    rng = random.Random(4)
    cuts = connections_cut = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.03, 0.2))
        connections_cut += faulty.proxy.cut()
        cuts += 1
    for client in clients:
        client.finish(PATIENCE_SECONDS)
    counts = check_ledgers(faulty.direct, clients)
    # The cuts hit calls: reported (cut during COMMIT), or run again (cut before it).
    counts["run_again"] = sum("lost before COMMIT" in record.message for record in caplog.records)
    assert connections_cut > 0 and counts["unavailable"] > 0, (cuts, connections_cut, counts)
    assert counts["run_again"] > 0, (cuts, connections_cut, counts)
    # The same backend serves again at once (its pool held connections cut meanwhile).
    assert faulty.backend.list_snapshots(limit=1)


# --------------------------------------------------------------------------------------------
# A database that refuses connections


def fill_pool(backend: SqlBackend, connections: int) -> None:
    """Open ``connections`` pooled connections at once and give them back to the pool."""
    together = threading.Barrier(connections)

    def hold_a_connection() -> None:
        with backend.engine.connect():
            together.wait(timeout=10)

    threads = [threading.Thread(target=hold_a_connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backend.engine.pool.checkedin() >= connections  # type: ignore[attr-defined]


def call_concurrently(count: int, call: Callable[[], T]) -> list[T | BaseException]:
    """Run ``call`` on ``count`` threads at once; its results or exceptions."""
    outcomes: list[T | BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            outcome: T | BaseException = call()
        except BaseException as error:
            outcome = error
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_connections_cut_while_idle_in_the_pool_are_replaced_unnoticed(faulty: Faulty) -> None:
    """Connections that die between calls (server restart, idle timeout of a firewall) must
    not surface: no call failed on them, so nothing has told the pool yet."""
    backend, proxy = faulty.backend, faulty.proxy
    start_workflow(backend, "idle")
    fill_pool(backend, 6)
    accepted = proxy.connections_accepted
    assert proxy.cut() >= 6
    assert backend.load_snapshot("idle").version == 1
    outcomes = call_concurrently(8, lambda: backend.load_snapshot("idle").version)
    assert outcomes == [1] * 8
    assert proxy.connections_accepted > accepted  # the dead ones were replaced


def test_refused_connections_fail_fast_and_the_backend_recovers(
    faulty: Faulty, private_url: str
) -> None:
    backend, proxy = faulty.backend, faulty.proxy
    instance_id = "refused"
    start_workflow(backend, instance_id)
    fill_pool(backend, 6)  # all of them die with the outage

    proxy.refuse()
    assert proxy.cut() > 0
    data = payload(instance_id, "during", 1024)
    for _ in range(3):
        expect_unavailable(lambda: backend.load_snapshot(instance_id))
        expect_unavailable(lambda: backend.save_task_result(instance_id, "during", data))
        expect_unavailable(lambda: backend.claim_task(instance_id, "work", "w1", CLAIM_TTL))
        expect_unavailable(lambda: backend.claim_available_tasks("w1", 5, CLAIM_TTL))
        expect_unavailable(lambda: backend.list_snapshots())
    # A new backend cannot even check the schema: unavailable, not a raw driver error.
    expect_unavailable(lambda: SqlBackend(proxy.proxied_url(private_url)))

    proxy.accept()
    # The first call after the outage succeeds, and so do concurrent ones (each pooled
    # connection is dead and must be replaced, not handed out).
    assert backend.load_snapshot(instance_id).version == 1
    outcomes = call_concurrently(8, lambda: backend.load_snapshot(instance_id).version)
    assert outcomes == [1] * 8
    assert faulty.direct.load_task_result(instance_id, "during") is None
    claim = backend.claim_task(instance_id, "work", "w1", CLAIM_TTL)
    assert claim is not None and claim.token == 1


# --------------------------------------------------------------------------------------------
# Real server restarts

RESTART_ENV: Final = "SAYIIR_TEST_RESTART_SERVERS"
RESTART_COMMAND_ENV: Final = {
    "postgres": "SAYIIR_TEST_POSTGRES_RESTART",
    "mysql": "SAYIIR_TEST_MYSQL_RESTART",
}
# The local servers of the development container (see tests/helpers/databases.py, HOW_TO_START).
DEFAULT_RESTART_COMMANDS: Final = {
    "postgres": 'pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main restart',
    "mysql": (
        "mysqladmin -h127.0.0.1 -P3306 -uroot shutdown"
        # mysqladmin does not wait over TCP: wait for the server to remove its pid file.
        " && for _ in $(seq 600); do [ -e /run/mysqld/mysqld.pid ] || break; sleep 0.1; done"
        " && install -d -o mysql -g mysql /run/mysqld"
        " && start-stop-daemon --start --oknodo --background"
        " --pidfile /run/mysqld/mysqld.pid --exec /usr/sbin/mariadbd"
    ),
}
DEFAULT_PORTS: Final = {"postgres": 5432, "mysql": 3306}
SERVER_BACK_SECONDS: Final = 90.0


def restart_command(kind: str, url: str) -> str:
    """The command restarting the server at ``url``; skips the test when not allowed."""
    if os.environ.get(RESTART_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        pytest.skip(
            f"restarts the shared {kind} server: runs only with {RESTART_ENV}=1 "
            "(tox -e faults), never beside other test runs on that server"
        )
    configured = os.environ.get(RESTART_COMMAND_ENV[kind], "").strip()
    if configured:
        return configured
    parsed = make_url(url)
    if parsed.host not in ("127.0.0.1", "localhost") or (
        parsed.port not in (None, DEFAULT_PORTS[kind])
    ):
        pytest.skip(
            f"the default restart command restarts the local {kind} server on port "
            f"{DEFAULT_PORTS[kind]}, not the one tested here: set {RESTART_COMMAND_ENV[kind]}"
        )
    return DEFAULT_RESTART_COMMANDS[kind]


# Settings that only live until the server restarts (``SET GLOBAL``, as .ci/run does for
# MariaDB's packet size): read before a restart and put back after it, so that the tests
# running later find the server as it was.
RUNTIME_SETTINGS: Final = {"postgres": (), "mysql": ("max_allowed_packet",)}


def _runtime_settings(kind: str, url: str) -> dict[str, int]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {
                name: int(conn.exec_driver_sql(f"SELECT @@GLOBAL.{name}").scalar_one())
                for name in RUNTIME_SETTINGS[kind]
            }
    finally:
        engine.dispose()


def _restore_runtime_settings(kind: str, url: str, settings: dict[str, int]) -> None:
    if settings == _runtime_settings(kind, url):
        return
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for name, value in settings.items():
                conn.exec_driver_sql(f"SET GLOBAL {name} = {value:d}")
    finally:
        engine.dispose()


def restart_server(kind: str, command: str, url: str) -> float:
    """Run ``command``, wait until the server at ``url`` answers again and restore its runtime
    settings; the seconds it took."""
    settings = _runtime_settings(kind, url)
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=SERVER_BACK_SECONDS
    )
    # Even when the command failed, give the server its chance to come back: the tests that
    # run later need it.
    deadline = started + SERVER_BACK_SECONDS
    while (reason := unreachable_reason(url, timeout=2)) is not None:
        assert time.monotonic() < deadline, f"the server is not back: {reason}"
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, f"{command!r} failed: {done.stderr.strip()}"
    _restore_runtime_settings(kind, url, settings)
    return elapsed


class Recorder:
    """A backend whose public calls are recorded when they raise (given to the Worker)."""

    def __init__(self, backend: PersistentBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self.errors: list[Exception] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._backend, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except Exception as error:
                with self._lock:
                    self.errors.append(error)
                raise

        return call


PIPELINE: Final = Pipeline("a", ("b", "c"), "d")


def test_server_restart_while_workers_run(kind: str, server_url: str) -> None:
    command = restart_command(kind, server_url)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(isolated_database(server_url))
        migrate(url)
        backend = stack.enter_context(contextlib.closing(SqlBackend(url)))
        recorder = Recorder(backend)
        produced: dict[tuple[str, str], list[bytes]] = {}
        recorded: Counter[tuple[str, str]] = Counter()
        lock = threading.Lock()

        def handler(context: TaskContext) -> bytes:
            # Slow enough that tasks are left when the restart is over: at most 40 tasks/s.
            time.sleep(0.1)
            output = f"{context.task_id}:{uuid.uuid4()}".encode()
            with lock:
                produced.setdefault((context.instance_id, context.task_id), []).append(output)
            return output

        def on_outcome(context: TaskContext, outcome: TaskOutcome) -> None:
            if outcome is TaskOutcome.RECORDED:
                with lock:
                    recorded[context.instance_id, context.task_id] += 1

        def progress() -> int:
            with lock:
                return sum(recorded.values())

        instance_ids = [f"restart-{number:02d}" for number in range(32)]
        for instance_id in instance_ids:
            backend.save_snapshot(PIPELINE.start(instance_id, "pipeline-v1"), expected_version=0)
        clients: list[CarefulClient] = [
            CarefulClient(backend, f"careful-{number}", workflows=2) for number in range(2)
        ]
        for client in clients:
            client.setup()
            client.start()
            # Stopped before the namespace is dropped, even when the test fails.
            stack.callback(client.stop_requested.set)
        worker = Worker(
            cast(PersistentBackend, recorder),
            handler,
            PIPELINE,
            threads=4,
            ttl=timedelta(seconds=1),
            poll_interval=timedelta(milliseconds=20),
            shutdown_grace=timedelta(seconds=2),
            on_outcome=on_outcome,
        )
        with worker:
            deadline = time.monotonic() + 20
            while progress() < 6:
                assert time.monotonic() < deadline, "the worker made no progress"
                time.sleep(0.02)
            downtime = restart_server(kind, command, url)
            # Tasks were still to run: the workers worked across the restart.
            assert progress() < len(instance_ids) * 4
            # The same backend works at the first call once the server answers.
            assert backend.list_snapshots(limit=1)
            deadline = time.monotonic() + 60
            while backend.list_snapshots(status=WorkflowStatus.IN_PROGRESS) != sorted(
                client_workflows(clients)
            ):
                assert time.monotonic() < deadline, "workflows did not finish after the restart"
                time.sleep(0.1)
        for client in clients:
            client.finish(PATIENCE_SECONDS)
        counts = check_ledgers(backend, clients)

        unavailable = [e for e in recorder.errors if isinstance(e, BackendUnavailableError)]
        assert unavailable, "no call met the restart: the test proved nothing"
        for error in recorder.errors:
            assert isinstance(error, PersistenceError), f"raw exception {error!r}"
        for error in unavailable:
            assert_translated(error)
        for instance_id in instance_ids:
            snapshot = backend.load_snapshot(instance_id)
            assert snapshot.status is WorkflowStatus.COMPLETED, instance_id
            assert snapshot.completed_tasks.keys() == {"a", "b", "c", "d"}
            for task_id, output in snapshot.completed_tasks.items():
                assert output in produced[instance_id, task_id], "a result no execution made"
                assert recorded[instance_id, task_id] <= 1, "a task was recorded twice"
            assert snapshot.output == snapshot.completed_tasks["d"]
        print(
            f"{kind}: restart took {downtime:.1f}s; worker errors "
            f"{Counter(type(e).__name__ for e in recorder.errors)}; clients {counts}"
        )


def client_workflows(clients: list[CarefulClient]) -> list[str]:
    return [ledger.instance_id for client in clients for ledger in client.ledgers]
