"""Replicated database servers of the tests' own: a 3-node MariaDB Galera cluster and a
PostgreSQL primary with a synchronous hot standby, started and stopped through the readable
scripts ``scripts/galera-cluster`` and ``scripts/pg-standby-pair`` (which say what each setting
is for). Each runs on its own ports and data folders under a temporary directory, beside the
machine's own servers, and leaves nothing behind once stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pymysql
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from sayiir_persistence import BackendUnavailableError

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
GALERA_SCRIPT = SCRIPTS / "galera-cluster"
PAIR_SCRIPT = SCRIPTS / "pg-standby-pair"

T = TypeVar("T")

GALERA_NODES = 3
GALERA_SQL_BASE_PORT = 3310  # node N answers on 3310 + N (the script's default)
#: ``SqlBackend(max_retries=...)`` for workers on several Galera nodes racing for the same
#: tasks, as the README advises: claimers of different nodes collide at certification, and
#: the default 5 attempts run out under the tests' contention (32 threads on one backlog).
GALERA_MAX_RETRIES = 20
PAIR_BASE_PORT = 5440  # primary; the standby is + 1 (the script's default)
START_TIMEOUT_SECONDS = 300


def _run(script: Path, *args: str, timeout: float = START_TIMEOUT_SECONDS) -> str:
    """Run a cluster script; its output, or an error carrying it."""
    done = subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{script.name} {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


# A cluster started by hand (``scripts/galera-cluster start DIR``) that the session fixture
# uses instead of starting its own: saves its start-up on every run while working on tests.
# Tests that kill a node start clusters of their own (``start(..., reuse=False)``).
RUNNING_GALERA_ENV = "SAYIIR_TEST_GALERA_DIR"


@dataclass
class GaleraCluster:
    """A running 3-node Galera cluster in ``directory`` (see scripts/galera-cluster)."""

    directory: Path
    killed: set[int] = field(default_factory=set)
    owned: bool = True

    @classmethod
    def start(cls, directory: Path, *, reuse: bool = True) -> GaleraCluster:
        """Start the cluster, every node synced (or, with ``reuse`` and
        ``$SAYIIR_TEST_GALERA_DIR`` set, the cluster already running there, left running).

        Raises:
            RuntimeError: a node did not become ready (with the script's output).
        """
        running = os.environ.get(RUNNING_GALERA_ENV)
        if reuse and running:
            return cls(Path(running), owned=False)
        _run(GALERA_SCRIPT, "start", str(directory))
        return cls(directory)

    def stop(self) -> None:
        """Stop every node and delete the directory (not a cluster this did not start)."""
        if self.owned:
            _run(GALERA_SCRIPT, "stop", str(self.directory), timeout=120)

    def kill(self, node: int) -> None:
        """SIGKILL node ``node`` (1-based)."""
        _run(GALERA_SCRIPT, "kill", str(self.directory), str(node))
        self.killed.add(node)

    def start_node(self, node: int) -> None:
        """Start node ``node`` again (after :meth:`kill`); returns once it has rejoined,
        synced.

        Raises:
            RuntimeError: it did not become ready (with the script's output).
        """
        _run(GALERA_SCRIPT, "start-node", str(self.directory), str(node))
        self.killed.discard(node)

    def isolate(self, node: int, isolated: bool = True) -> None:
        """Cut node ``node`` off from the others' group communication (``gmcast.isolate``),
        as a network partition would: alone, it leaves the primary component; ``False``
        lets it rejoin."""
        with _outside_connection(node) as cursor:
            cursor.execute(
                "SET GLOBAL wsrep_provider_options = %s",
                (f"gmcast.isolate={1 if isolated else 0}",),
            )

    def ready(self, node: int) -> bool:
        """Node ``node`` answers and is in the primary component, synced (``wsrep_ready``)."""
        try:
            with _outside_connection(node) as cursor:
                cursor.execute("SHOW STATUS LIKE 'wsrep_ready'")
                row = cursor.fetchone()
        except pymysql.err.MySQLError:
            return False
        return row is not None and row[1] == "ON"

    def status(self) -> str:
        return _run(GALERA_SCRIPT, "status", str(self.directory))

    @staticmethod
    def node_url(node: int, database: str = "test") -> str:
        """The URL of ``database`` on node ``node`` (1-based)."""
        port = GALERA_SQL_BASE_PORT + node
        return f"mysql+pymysql://root@127.0.0.1:{port}/{database}?charset=utf8mb4"

    def node_urls(self, database: str = "test") -> list[str]:
        """The URLs of ``database`` on every node, node 1 first."""
        return [self.node_url(node, database) for node in range(1, GALERA_NODES + 1)]

    def create_database(self, name: str) -> None:
        """Create ``name`` (on node 1; Galera replicates the DDL to the others)."""
        engine = sa.create_engine(
            self.node_url(1, "test"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(
                    f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4"
                )
        finally:
            engine.dispose()


@dataclass
class StandbyPair:
    """A running PostgreSQL primary with a synchronous hot standby in ``directory`` (see
    scripts/pg-standby-pair)."""

    directory: Path

    @classmethod
    def start(cls, directory: Path) -> StandbyPair:
        """Start both servers, the standby streaming synchronously, database ``test`` made.

        Raises:
            RuntimeError: a server did not start (with the script's output).
        """
        _run(PAIR_SCRIPT, "start", str(directory))
        return cls(directory)

    def stop(self) -> None:
        """Stop both servers and delete the directory."""
        _run(PAIR_SCRIPT, "stop", str(self.directory), timeout=120)

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster: the server is lost, as by a machine failure."""
        _run(PAIR_SCRIPT, "kill", str(self.directory))

    def promote(self) -> None:
        """Make the standby the primary (returns once it takes writes)."""
        _run(PAIR_SCRIPT, "promote", str(self.directory))

    def status(self) -> str:
        return _run(PAIR_SCRIPT, "status", str(self.directory))

    @staticmethod
    def url(database: str = "test", driver: str = "psycopg2") -> str:
        """One libpq URL naming both servers: libpq connects to whichever takes writes."""
        return (
            f"postgresql+{driver}://postgres@/{database}"
            f"?host=127.0.0.1:{PAIR_BASE_PORT}&host=127.0.0.1:{PAIR_BASE_PORT + 1}"
            "&target_session_attrs=read-write"
        )

    @staticmethod
    def server_url(standby: bool, database: str = "test") -> str:
        """The URL of one of the two servers."""
        port = PAIR_BASE_PORT + (1 if standby else 0)
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"


@contextlib.contextmanager
def _outside_connection(node: int) -> Iterator[Any]:
    """A cursor on node ``node`` that also works outside the primary component: the bare
    driver (SQLAlchemy's first queries would be refused there) and no causality wait (the
    cluster's ``wsrep_sync_wait = 1`` would fail every read)."""
    connection = pymysql.connect(
        host="127.0.0.1",
        port=GALERA_SQL_BASE_PORT + node,
        user="root",
        connect_timeout=5,
        init_command="SET SESSION wsrep_sync_wait = 0",
    )
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def on_galera(url: str) -> bool:
    """``url`` names a node of the tests' Galera cluster."""
    parsed = sa.make_url(url)
    galera_ports = range(GALERA_SQL_BASE_PORT + 1, GALERA_SQL_BASE_PORT + GALERA_NODES + 1)
    return parsed.get_backend_name() == "mysql" and parsed.port in galera_ports


def backend_options(url: str) -> dict[str, Any]:
    """The ``SqlBackend`` options a test's workers use on ``url``: on a node of the tests'
    Galera cluster, the retries the README advises (``GALERA_MAX_RETRIES``)."""
    return {"max_retries": GALERA_MAX_RETRIES} if on_galera(url) else {}


def again_after_giving_up(url: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, called again while it gives up after its certification
    conflicts on a Galera node, as the ``Worker`` calls again (each attempt was rolled back:
    nothing of it was applied). Under the tests' contention on a loaded machine a claimer can
    lose every one of its attempts. Anywhere else, giving up is raised: a single server's
    locks order the calls, and a deadlock storm there is a bug."""
    while True:
        try:
            return call(*args, **kwargs)
        except BackendUnavailableError as error:
            if not on_galera(url) or not str(error).startswith("gave up after"):
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def server_directory(prefix: str) -> Iterator[Path]:
    """A path (not yet created) for a script's servers, in a fresh folder of ``/tmp`` that the
    ``mysql`` and ``postgres`` users can enter (pytest's own temporary folders are private to
    the user running the tests); the folder is removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        parent.chmod(0o755)
        yield parent / "servers"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def wait_until(check: object, timeout: float, what: str) -> None:
    """Poll ``check()`` every 0.1 s until it is true.

    Raises:
        AssertionError: it is still false after ``timeout`` seconds.
    """
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
