"""What the parent knows of each contender, without importing it.

A :class:`Contender` names the module that drives it in a child process (``side_*.py``, which
imports the peer library), the distribution whose presence and version count, the databases it
runs on, how it is configured (for the report), and the SQL with which the parent sees, from
outside, which workflows are complete: a count while a backlog drains, one instance while a
latency chain runs, and every completion timestamp (epoch seconds, the contender's own record of
the moment it marked the workflow complete) for the latency figures.

The SQL is the contender's own schema as its version here creates it (checked by the smoke runs):
``sayiir_workflows`` (ours), ``procrastinate_jobs`` / ``procrastinate_events``,
``dbos.workflow_status`` (``workflow_status`` on SQLite), ``sayiir_workflow_snapshots``
(sayiir 1.0.0).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field

#: Workloads: N one-task workflows, M three-task chains (drained from a backlog), and chains
#: started one at a time while the workers idle (latency).
KINDS = ("one", "chain", "latency")
#: The name of every DBOS queue and the DBOS application (one per run, in a fresh database).
DBOS_QUEUE = "bench"


@dataclass(frozen=True)
class Contender:
    name: str
    #: Which library: ``ours``, ``procrastinate``, ``dbos`` or ``sayiir``; its side module
    #: ``benchmarks.peers.side_<family>`` builds, starts and stops it in the child process.
    family: str
    #: The distribution that must be installed (``None``: this repository).
    distribution: str | None
    databases: tuple[str, ...]
    #: How it is configured, for the report.
    settings: str
    #: Options handed to its side (e.g. our Worker's keyword arguments).
    options: dict[str, object] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return f"benchmarks.peers.side_{self.family}"

    def missing(self) -> str | None:
        """Why it cannot run here, or ``None``."""
        if self.distribution is None:
            return None
        if importlib.util.find_spec(self.distribution) is None:
            return f"{self.distribution} is not installed (pip install -e '.[peers]')"
        return None

    def version(self) -> str | None:
        if self.distribution is None:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    # -- completion, seen from outside ------------------------------------------------------

    def count_sql(self, db: str, kind: str) -> str:
        """How many workflows of ``kind`` are complete."""
        return f"SELECT count(*) FROM ({self._completed(db, kind)}) AS done"

    def done_sql(self, db: str, kind: str) -> str:
        """1 when the workflow ``:id`` is complete."""
        return f"SELECT 1 FROM ({self._completed(db, kind)}) AS done WHERE done.id = :id"

    def times_sql(self, db: str, kind: str) -> str:
        """``id, completed_at`` (epoch seconds) of every complete workflow."""
        return f"SELECT id, at FROM ({self._completed(db, kind)}) AS done"

    def _completed(self, db: str, kind: str) -> str:
        return COMPLETED[self.family](db, kind)


def _ours(db: str, kind: str) -> str:
    at = "extract(epoch from updated_at)" if db == "postgres" else "NULL"
    return f"SELECT instance_id AS id, {at} AS at FROM sayiir_workflows WHERE status = 'completed'"


def _procrastinate(db: str, kind: str) -> str:
    last = "solo" if kind == "one" else "t3"
    return (
        "SELECT j.args->>'wf' AS id, extract(epoch from e.at) AS at FROM procrastinate_jobs j"
        " JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'succeeded'"
        f" WHERE j.task_name = '{last}' AND j.status = 'succeeded'"
    )


def _dbos(db: str, kind: str) -> str:
    schema = "dbos." if db == "postgres" else ""
    return (
        f"SELECT workflow_uuid AS id, updated_at / 1000.0 AS at FROM {schema}workflow_status"
        f" WHERE status = 'SUCCESS' AND queue_name = '{DBOS_QUEUE}'"
    )


def _sayiir(db: str, kind: str) -> str:
    return (
        "SELECT instance_id AS id, extract(epoch from completed_at) AS at"
        " FROM sayiir_workflow_snapshots WHERE status = 'Completed'"
    )


COMPLETED = {"ours": _ours, "procrastinate": _procrastinate, "dbos": _dbos, "sayiir": _sayiir}

CONCURRENCY = 8
#: Our Worker's poll interval in the main variant: the same 10 ms the peers poll at.
OURS_POLL_MS = 10
PEER_POLL_S = 0.01

CONTENDERS = {
    "ours": Contender(
        "ours",
        "ours",
        None,
        ("postgres", "sqlite"),
        f"sayiir_persistence.worker.Worker(SqlBackend(url), handlers, Pipeline(...), "
        f"threads={CONCURRENCY}, poll_interval={OURS_POLL_MS} ms); workflows started with "
        "Pipeline.start + save_snapshot; PostgreSQL through psycopg 3 (postgresql+psycopg)",
        {"threads": CONCURRENCY, "poll_interval_ms": OURS_POLL_MS},
    ),
    "ours-defaults": Contender(
        "ours-defaults",
        "ours",
        None,
        ("postgres", "sqlite"),
        f"the same Worker with its defaults but threads={CONCURRENCY} (poll_interval 1 s, "
        "woken by LISTEN/NOTIFY on PostgreSQL)",
        {"threads": CONCURRENCY},
    ),
    "ours-psycopg2": Contender(
        "ours-psycopg2",
        "ours",
        None,
        ("postgres",),
        f"as ours (threads={CONCURRENCY}, poll_interval={OURS_POLL_MS} ms) on psycopg2, which "
        "sends every statement to be planned anew (ours uses psycopg 3, which prepares them)",
        {"threads": CONCURRENCY, "poll_interval_ms": OURS_POLL_MS, "driver": "psycopg2"},
    ),
    "procrastinate": Contender(
        "procrastinate",
        "procrastinate",
        "procrastinate",
        ("postgres",),
        f"App(PsycopgConnector(pool min_size=max_size={CONCURRENCY + 2})); async tasks, a chain "
        "is t1 -> t2 -> t3, each task deferring the next with defer_async; "
        f"run_worker_async(concurrency={CONCURRENCY}, listen_notify=True, "
        "fetch_job_polling_interval=5.0 (default: LISTEN/NOTIFY wakes it), delete_jobs=never)",
    ),
    "dbos": Contender(
        "dbos",
        "dbos",
        "dbos",
        ("postgres", "sqlite"),
        f"@DBOS.workflow with one / three @DBOS.step (each step's output the next one's input); "
        f"DBOS.register_queue('{DBOS_QUEUE}', worker_concurrency={CONCURRENCY}, "
        f"polling_interval_sec={PEER_POLL_S}); enqueued with DBOSClient.enqueue; the worker "
        "process is DBOS.launch() (log_level WARNING)",
    ),
    "sayiir": Contender(
        "sayiir",
        "sayiir",
        "sayiir",
        ("postgres",),
        f"Flow('one').then(t1) / Flow('chain').then(t1).then(t2).then(t3); "
        f"WorkflowClient(PostgresBackend(url)).submit; {CONCURRENCY} x "
        f"sayiir.Worker(id, backend, poll_interval={PEER_POLL_S}) in one process (a sayiir "
        "Worker runs one task at a time: concurrency comes from several workers; its "
        "LISTEN/NOTIFY wake-ups do not cover a backlog saved before the workers start, which "
        "its default 5 s fallback poll would drain at 8 tasks per 5 s, hence 10 ms)",
    ),
}
DEFAULT_CONTENDERS = ("ours", "procrastinate", "dbos", "sayiir")
