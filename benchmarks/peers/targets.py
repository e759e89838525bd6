"""The databases of a run, made fresh for every run, and the server's counters.

PostgreSQL: the database ``sayiir_bench_peers`` on the local server (``SAYIIR_BENCH_PEERS_URL``
overrides), dropped and created again before every run, so that each contender starts from an
empty database and its counters start at zero. SQLite: a new folder per run.

Transactions are counted with ``pg_stat_database.xact_commit`` of that database (every
committed transaction, read-only ones included; a transaction that ends in ROLLBACK counts in
``xact_rollback`` instead), rows written with ``tup_inserted + tup_updated + tup_deleted``.
A backend reports its counters when it exits (and at most once a second while it runs): the
counters are read once no backend is connected to the database any more, from a connection to
the ``postgres`` database, which therefore adds nothing to them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

BENCH_DATABASE = "sayiir_bench_peers"
DEFAULT_URL = f"postgresql://postgres@127.0.0.1:5432/{BENCH_DATABASE}"
URL_ENV = "SAYIIR_BENCH_PEERS_URL"
#: Other engineers' runs may restart the server for a moment: retry that long.
RETRY_FOR_S = 180.0
COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")

_T = TypeVar("_T")


def postgres_url() -> str:
    """The libpq-style URL (``postgresql://``) every contender is given."""
    return os.environ.get(URL_ENV, DEFAULT_URL)


@dataclass(frozen=True)
class Target:
    """One run's database: ``postgres`` (``url``) or ``sqlite`` (a file in ``folder``)."""

    db: str
    url: str | None = None
    folder: Path | None = None

    def spec(self, contender: str) -> dict[str, str]:
        """What a side is given: the URL, or its own SQLite file."""
        if self.db == "postgres":
            assert self.url is not None
            return {"db": "postgres", "url": self.url}
        assert self.folder is not None
        return {"db": "sqlite", "path": str(self.folder / f"{contender}.db")}

    def probe_url(self, contender: str) -> str:
        """A SQLAlchemy URL for the parent's own queries (psycopg2 / sqlite3)."""
        if self.db == "postgres":
            assert self.url is not None
            return self.url.replace("postgresql://", "postgresql+psycopg2://", 1)
        return f"sqlite:///{self.spec(contender)['path']}"

    def cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def retrying(call: Callable[[], _T], log: Callable[[str], None] = print) -> _T:
    """``call()``, retried while the server refuses connections (restarted meanwhile)."""
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return call()
        except sa_exc.OperationalError as error:
            if time.monotonic() > deadline:
                raise
            log(f"   database unavailable ({str(error).splitlines()[0]}); retrying in 5 s")
            time.sleep(5)


def _admin(url: str) -> sa.Engine:
    parsed = make_url(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    return sa.create_engine(
        parsed.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )


def fresh(db: str) -> Target:
    """An empty database for one run."""
    if db == "sqlite":
        return Target("sqlite", folder=Path(tempfile.mkdtemp(prefix="sayiir-peers-")))
    url = postgres_url()
    name = make_url(url).database

    def recreate() -> None:
        engine = _admin(url)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()

    retrying(recreate)
    return Target("postgres", url=url)


def counters(target: Target, settle_s: float = 15.0) -> dict[str, int] | None:
    """The database's transaction and row counters once no backend is connected to it any
    more (``None`` on SQLite)."""
    if target.db != "postgres":
        return None
    assert target.url is not None
    name = make_url(target.url).database

    def read() -> dict[str, int]:
        engine = _admin(target.url or "")
        try:
            deadline = time.monotonic() + settle_s
            with engine.connect() as conn:
                while time.monotonic() < deadline:
                    connected = conn.execute(
                        sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"),
                        {"name": name},
                    ).scalar_one()
                    if connected == 0:
                        break
                    time.sleep(0.05)
                # A fresh snapshot of the statistics (stats_fetch_consistency = cache).
                conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
                row = conn.execute(
                    sa.text(
                        f"SELECT {', '.join(COUNTERS)} FROM pg_stat_database WHERE datname = :name"
                    ),
                    {"name": name},
                ).one()
            return {column: int(value) for column, value in zip(COUNTERS, row, strict=True)}
        finally:
            engine.dispose()

    return retrying(read)


def difference(after: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int]:
    if after is None or before is None:
        return {}
    return {name: after[name] - before[name] for name in COUNTERS}


def server_version() -> str | None:
    def read() -> Any:
        engine = _admin(postgres_url())
        try:
            with engine.connect() as conn:
                return conn.exec_driver_sql("SHOW server_version").scalar_one()
        finally:
            engine.dispose()

    try:
        return str(retrying(read))
    except sa_exc.SQLAlchemyError:
        return None


def drop(target: Target) -> None:
    """Leave nothing behind: drop the PostgreSQL database, remove the SQLite folder."""
    if target.db == "sqlite":
        target.cleanup()
        return
    engine = _admin(postgres_url())
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(
                f'DROP DATABASE IF EXISTS "{make_url(postgres_url()).database}" WITH (FORCE)'
            )
    finally:
        engine.dispose()
