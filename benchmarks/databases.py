"""The databases a run measures, and how they are emptied and filled.

``--db sqlite|postgres|mysql`` names the benchmark's own databases: ``sayiir_bench`` on the
local servers (created when missing; override with ``SAYIIR_BENCH_POSTGRES_URL`` /
``SAYIIR_BENCH_MYSQL_URL``), and a SQLite file in a temporary directory. ``--url`` takes any
other URL: point it at a scratch database, since every scenario empties the ``sayiir_*``
tables before it starts.

Seeding writes with bulk Core inserts exactly the rows ``save_snapshot`` writes for a new
workflow at ``AtTask("t")`` (``SqlBackend._write_snapshot`` / ``_insert_ready``), as
``tests/databases/test_sql_query_plans.py`` does: 100,000 ``save_snapshot`` calls would take
minutes.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sayiir_persistence import AtTask, WorkflowStatus, migrate
from sayiir_persistence.sql import codec
from sayiir_persistence.sql.schema import metadata, ready_tasks, task_claims, workflows

BENCH_DATABASE = "sayiir_bench"
DEFAULT_URLS = {
    "postgres": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{BENCH_DATABASE}",
    "mysql": f"mysql+pymysql://root@127.0.0.1:3306/{BENCH_DATABASE}?charset=utf8mb4",
}
URL_ENV = {"postgres": "SAYIIR_BENCH_POSTGRES_URL", "mysql": "SAYIIR_BENCH_MYSQL_URL"}
INSERT_BATCH = 10_000
TASK_ID = "t"
DEFINITION = "bench-definition"


@dataclass(frozen=True)
class Target:
    """One database of the run: a short label (``sqlite``, ``postgres``, ``mysql``) and URL."""

    label: str
    url: str
    #: A temporary folder of ours (the SQLite file), removed after the run.
    scratch: Path | None = None

    @property
    def backend_name(self) -> str:
        return make_url(self.url).get_backend_name()


def label_of(url: str) -> str:
    name = make_url(url).get_backend_name()
    return {"postgresql": "postgres", "mariadb": "mysql"}.get(name, name)


def resolve(dbs: list[str], urls: list[str], workdir: Path | None = None) -> list[Target]:
    """The targets named by ``--db`` and ``--url``, in the order given (dbs first)."""
    targets = []
    for db in dbs:
        if db == "sqlite":
            folder = workdir or Path(tempfile.mkdtemp(prefix="sayiir-bench-"))
            scratch = None if workdir else folder
            targets.append(Target("sqlite", f"sqlite:///{folder / 'bench.db'}", scratch))
        else:
            targets.append(Target(db, os.environ.get(URL_ENV[db], DEFAULT_URLS[db])))
    targets.extend(Target(label_of(url), url) for url in urls)
    return targets


def create_and_migrate(url: str) -> None:
    """Create the database when it is missing (servers), then bring it to the head revision."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        admin = sa.create_engine(
            parsed.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            present = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": parsed.database},
            ).first()
            if present is None:
                conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
        admin.dispose()
    elif backend in ("mysql", "mariadb"):
        admin = sa.create_engine(parsed.set(database="information_schema"), poolclass=NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f"CREATE DATABASE IF NOT EXISTS `{parsed.database}` CHARACTER SET utf8mb4"
            )
        admin.dispose()
    migrate(url)


def reset(url: str) -> None:
    """Empty every ``sayiir_*`` table (the schema stays)."""
    engine = sa.create_engine(url, poolclass=NullPool)
    backend = engine.dialect.name
    try:
        with engine.begin() as conn:
            tables = [table.name for table in metadata.sorted_tables]
            if backend == "postgresql":
                conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)}")
            elif backend in ("mysql", "mariadb"):
                for table in tables:
                    conn.exec_driver_sql(f"TRUNCATE TABLE {table}")
            else:
                for table in tables:
                    conn.exec_driver_sql(f"DELETE FROM {table}")
    finally:
        engine.dispose()


def instance_id(number: int) -> str:
    return f"bench-{number:07d}"


def seed(url: str, start: int, stop: int, *, claimed_every: int = 0) -> None:
    """Bulk-insert in-progress workflows ``start..stop-1`` at ``AtTask("t")``, then ANALYZE.

    Priorities are spread over 1..5 (the candidate query has one branch per priority) and
    ``updated_at`` rises with the number. With ``claimed_every=k``, every k-th task also gets
    the live claim ``claim_task`` would write (busy workers), so the claims table is not empty.
    """
    rng = random.Random(start)
    claimed_at = datetime.now(UTC)
    base = claimed_at - timedelta(hours=2)
    position = codec.encode_position(AtTask(TASK_ID))
    no_tags = codec.encode_tags(frozenset())
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        for first in range(start, stop, INSERT_BATCH):
            workflow_rows, ready_rows, claim_rows = [], [], []
            for number in range(first, min(first + INSERT_BATCH, stop)):
                name = instance_id(number)
                priority = rng.randint(1, 5)
                saved_at = base + timedelta(microseconds=10 * number)
                workflow_rows.append(
                    {
                        "instance_id": name,
                        "definition_hash": DEFINITION,
                        "status": WorkflowStatus.IN_PROGRESS.value,
                        "position": position,
                        "last_completed_task_id": None,
                        "input_task_id": None,
                        "initial_input": b"input",
                        "output": None,
                        "error": None,
                        "cancel_request": None,
                        "pause_request": None,
                        "priority": priority,
                        "tags": no_tags,
                        "created_at": saved_at,
                        "updated_at": saved_at,
                        "version": 1,
                    }
                )
                ready_rows.append(
                    {
                        "instance_id": name,
                        "task_id": TASK_ID,
                        "priority": priority,
                        "updated_at": saved_at,
                        "wake_at": None,
                        "has_tags": False,
                    }
                )
                if claimed_every and number % claimed_every == 0:
                    claim_rows.append(
                        {
                            "instance_id": name,
                            "task_id": TASK_ID,
                            "worker_id": "busy-worker",
                            "token": 1,
                            "claimed_at": claimed_at,
                            "expires_at": claimed_at + timedelta(hours=2),
                            "released": False,
                        }
                    )
            with engine.begin() as conn:
                conn.execute(sa.insert(workflows), workflow_rows)
                conn.execute(sa.insert(ready_tasks), ready_rows)
                if claim_rows:
                    conn.execute(sa.insert(task_claims), claim_rows)
        analyze(engine)
    finally:
        engine.dispose()


def analyze(engine: sa.Engine) -> None:
    """Fresh planner statistics, as a database in service would have."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if engine.dialect.name in ("mysql", "mariadb"):
            for table in (workflows, ready_tasks, task_claims):
                conn.exec_driver_sql(f"ANALYZE TABLE {table.name}").fetchall()
        else:
            conn.exec_driver_sql("ANALYZE")


def count(url: str, table: sa.Table) -> int:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
    finally:
        engine.dispose()
