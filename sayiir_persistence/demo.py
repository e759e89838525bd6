"""``sayiir-persistence demo``: an order pipeline that survives ``SIGKILL`` of a worker.

What it does, in order:

1. Provisions the database (an SQLite file in a temporary directory unless ``--url`` is given)
   and creates ``instances`` workflows of an order pipeline::

       validate -> (reserve_stock || charge_payment) -> ship

   Each task sleeps 10-60 ms and returns JSON that the next task reads.
2. Starts ``processes`` worker processes, each a :class:`~sayiir_persistence.worker.Worker`
   with ``threads`` threads and a short claim TTL.
3. Once ``kill_after`` of the task runs are done (an order is four tasks; the orders advance
   side by side, so counting finished orders would fire only near the end), sends
   ``SIGKILL`` to the worker process
   running the most tasks whose results are not saved yet, and starts a replacement. The
   killed worker's claims expire after the TTL and the other workers take its tasks over.
   (Should the victim have saved them all in the instant before the kill, one more worker
   is killed later: the demo is about work abandoned mid-task.)
4. Waits until every order completes, stops the workers with ``SIGTERM`` (they release
   their claims and exit 0), and verifies the result (see :class:`DemoReport`).

How "no task's result was recorded twice" is checked, with the public API only:

- Every execution of a task function inserts one row into the demo's own table,
  ``demo_executions`` (execution id, worker, fencing token of its claim), and the worker's
  ``on_outcome`` hook writes how it ended (``recorded``, ``lost``, ...). A process killed
  mid-task leaves rows without an outcome: those whose result is not the stored one are the
  abandoned executions, and each must have been taken over.
- Every task's output carries its execution id and the execution ids of the outputs it
  consumed. The stored results must form one consistent chain (``ship`` consumed exactly the
  ``reserve_stock`` and ``charge_payment`` results that are stored, and so on).
- A *duplicate result* is a task for which more than one execution was accepted by the store
  (reported ``recorded``, or found as the stored result). It must be 0, while re-executions
  of the killed worker's tasks are expected: they show up with a fencing token above 1 and
  are counted as *takeovers*.

The demo's workflows have ids ``order-<run>-<n>`` and the tags ``sayiir-demo`` and
``sayiir-demo-<run>``; its workers run only those, plus untagged workflows of others (the tag
rule: a task fits a worker when the workflow's tags are a subset of the worker's), leaving the
tasks they have no function for to expire. So point ``--url`` at a scratch database.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    case,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy import (
    Table as SqlTable,
)
from sqlalchemy.engine import make_url

from .errors import NotFoundError, PersistenceError
from .model import WorkflowStatus
from .provisioning import migrate
from .sql.backend import SqlBackend
from .worker import Pipeline, TaskContext, TaskFunction, TaskOutcome, Worker

__all__ = [
    "DEFINITION_HASH",
    "ORDER_PIPELINE",
    "DemoReport",
    "Kill",
    "add_demo_arguments",
    "main",
    "run_demo",
    "run_demo_command",
]

logger = logging.getLogger(__name__)

DEFINITION_HASH = "sayiir-demo/order-v1"
DEMO_TAG = "sayiir-demo"
ORDER_PIPELINE = Pipeline("validate", ("reserve_stock", "charge_payment"), "ship")

# The tasks whose output each task consumes (the lineage check follows these links).
_CONSUMES = {
    "validate": (),
    "reserve_stock": ("validate",),
    "charge_payment": ("validate",),
    "ship": ("reserve_stock", "charge_payment"),
}

# --------------------------------------------------------------------------------------------
# The demo's own bookkeeping table (not part of the library's schema)

_metadata = MetaData()
executions = SqlTable(
    "demo_executions",
    _metadata,
    Column("execution_id", String(32), primary_key=True),
    Column("run_id", String(32), nullable=False, index=True),
    Column("instance_id", String(255), nullable=False),
    Column("task_id", String(64), nullable=False),
    Column("worker", String(64), nullable=False),
    Column("token", Integer, nullable=False),
    Column("outcome", String(16), nullable=True),
)


def _prepare_executions_table(engine: Engine) -> None:
    """Create ``demo_executions``; one left by an older demo with other columns is replaced
    (it only ever holds demo bookkeeping)."""
    inspector = inspect(engine)
    if inspector.has_table(executions.name):
        existing = {column["name"] for column in inspector.get_columns(executions.name)}
        if existing != set(executions.columns.keys()):
            executions.drop(engine)
    _metadata.create_all(engine)


class _Recorder:
    """Writes one ``demo_executions`` row per task execution (in the worker processes)."""

    def __init__(self, engine: Engine, run_id: str, worker: str) -> None:
        self._engine = engine
        self._run_id = run_id
        self._worker = worker

    def started(self, ctx: TaskContext) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                insert(executions).values(
                    execution_id=ctx.execution_id,
                    run_id=self._run_id,
                    instance_id=ctx.instance_id,
                    task_id=ctx.task_id,
                    worker=self._worker,
                    token=ctx.claim.token,
                )
            )

    def finished(self, ctx: TaskContext, outcome: TaskOutcome) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(executions)
                .where(executions.c.execution_id == ctx.execution_id)
                .values(outcome=outcome.value)
            )


# --------------------------------------------------------------------------------------------
# The order pipeline's tasks: small, realistic, passing JSON along


def _load(payload: bytes | None) -> dict[str, Any]:
    assert payload is not None
    loaded: dict[str, Any] = json.loads(payload)
    return loaded


def _validate(ctx: TaskContext) -> dict[str, Any]:
    order = _load(ctx.input)
    total = sum(line["qty"] * line["unit_cents"] for line in order["lines"])
    return {
        "order_id": order["order_id"],
        "customer": order["customer"],
        "skus": [line["sku"] for line in order["lines"]],
        "total_cents": total,
        "consumed": {},
    }


def _reserve_stock(ctx: TaskContext) -> dict[str, Any]:
    validated = _load(ctx.input)
    return {
        "reservation_id": f"RSV-{uuid.uuid4().hex[:10].upper()}",
        "skus": validated["skus"],
        "consumed": {"validate": validated["execution"]},
    }


def _charge_payment(ctx: TaskContext) -> dict[str, Any]:
    validated = _load(ctx.input)
    return {
        "payment_id": f"PAY-{uuid.uuid4().hex[:10].upper()}",
        "amount_cents": validated["total_cents"],
        "consumed": {"validate": validated["execution"]},
    }


def _ship(ctx: TaskContext) -> dict[str, Any]:
    # After a join the input is the output of whichever branch finished last; read both.
    reservation = _load(ctx.result_of("reserve_stock"))
    payment = _load(ctx.result_of("charge_payment"))
    return {
        "tracking_number": f"1Z{random.randrange(10**12):012d}",
        "reservation_id": reservation["reservation_id"],
        "payment_id": payment["payment_id"],
        "consumed": {
            "reserve_stock": reservation["execution"],
            "charge_payment": payment["execution"],
        },
    }


def _order_handlers(recorder: _Recorder) -> dict[str, TaskFunction]:
    steps: dict[str, Callable[[TaskContext], dict[str, Any]]] = {
        "validate": _validate,
        "reserve_stock": _reserve_stock,
        "charge_payment": _charge_payment,
        "ship": _ship,
    }

    def task(step: Callable[[TaskContext], dict[str, Any]]) -> TaskFunction:
        def run(ctx: TaskContext) -> bytes:
            recorder.started(ctx)
            time.sleep(random.uniform(0.010, 0.060))  # the "real work"
            body = step(ctx)
            body["execution"] = ctx.execution_id
            return json.dumps(body).encode()

        return run

    return {task_id: task(step) for task_id, step in steps.items()}


def _new_order(run_id: str, number: int) -> tuple[str, bytes]:
    instance_id = f"order-{run_id}-{number:05d}"
    lines = [
        {
            "sku": f"SKU-{random.randrange(1000, 9999)}",
            "qty": random.randint(1, 3),
            "unit_cents": random.randrange(199, 9999),
        }
        for _ in range(random.randint(1, 4))
    ]
    order = {
        "order_id": instance_id,
        "customer": f"customer-{random.randrange(500)}",
        "lines": lines,
    }
    return instance_id, json.dumps(order).encode()


# --------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class _WorkerSpec:
    """What a worker process needs (pickled to the spawned process)."""

    url: str
    name: str
    """``worker-<n>``, as shown to the user; the claims are held as ``demo-<run>-<name>``."""
    run_id: str
    threads: int
    ttl_seconds: float
    log_level: int


def _worker_main(spec: _WorkerSpec, ready: Any) -> None:
    """Entry point of a worker process: run a Worker until SIGTERM.

    ``ready`` (a multiprocessing Event) is set once SIGTERM means "stop cleanly" here: the
    parent waits for it before stopping us, since SIGTERM's default action would kill a
    process that is still starting up.
    """
    # Ctrl-C reaches the whole process group; the parent turns it into an orderly SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())
    ready.set()
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s {spec.name} %(levelname)s %(name)s: %(message)s",
    )
    _stop_when_parent_dies()
    backend = SqlBackend(spec.url)
    try:
        recorder = _Recorder(backend.engine, spec.run_id, spec.name)
        worker = Worker(
            backend,
            _order_handlers(recorder),
            {DEFINITION_HASH: ORDER_PIPELINE},
            # Unique across runs sharing a database: claims are held in this name.
            worker_id=f"demo-{spec.run_id}-{spec.name}",
            threads=spec.threads,
            ttl=timedelta(seconds=spec.ttl_seconds),
            poll_interval=timedelta(milliseconds=50),
            # Fewer, larger claim transactions: on SQLite every writer waits its turn.
            claim_batch_wait=timedelta(milliseconds=100),
            # Only this run's orders (and untagged workflows: use a scratch database).
            tags=_run_tags(spec.run_id),
            shutdown_grace=timedelta(seconds=5),
            # A worker killed between saving a fork's last branch and moving the order on
            # leaves it at the join: the survivors look for such orders this often.
            stall_sweep_every=timedelta(seconds=spec.ttl_seconds),
            on_outcome=recorder.finished,
        )
        with worker:
            # A timeout keeps the main thread returning to the interpreter, which runs
            # signal handlers there.
            while not stop_requested.wait(0.5):
                pass
    finally:
        backend.close()


def _stop_when_parent_dies() -> None:
    """SIGTERM ourselves (a clean stop) if the demo process dies without stopping us."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass
class _Pool:
    """The worker processes of one run."""

    spec: _WorkerSpec
    processes: dict[str, BaseProcess] = field(default_factory=dict)
    ready: dict[str, Any] = field(default_factory=dict)
    started: int = 0

    def start_one(self) -> tuple[str, BaseProcess]:
        self.started += 1
        worker_id = f"worker-{self.started}"
        context = multiprocessing.get_context("spawn")  # no fork: threads and engines
        ready = context.Event()
        process = context.Process(
            target=_worker_main,
            args=(_spec_for(self.spec, worker_id), ready),
            name=worker_id,
            daemon=True,
        )
        process.start()
        self.processes[worker_id] = process
        self.ready[worker_id] = ready
        return worker_id, process

    def alive(self) -> dict[str, BaseProcess]:
        return {wid: p for wid, p in self.processes.items() if p.is_alive()}

    def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every live worker, wait for them; the exit codes by worker id."""
        deadline = time.monotonic() + timeout
        for worker_id, process in self.alive().items():
            # A worker still starting up would die of SIGTERM instead of stopping cleanly.
            self.ready[worker_id].wait(max(deadline - time.monotonic(), 0.1))
            process.terminate()
        for process in self.processes.values():
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
        return {wid: p.exitcode for wid, p in self.processes.items()}


def _run_tags(run_id: str) -> tuple[str, ...]:
    return (DEMO_TAG, f"{DEMO_TAG}-{run_id}")


def _spec_for(spec: _WorkerSpec, worker_id: str) -> _WorkerSpec:
    return _WorkerSpec(
        spec.url, worker_id, spec.run_id, spec.threads, spec.ttl_seconds, spec.log_level
    )


# --------------------------------------------------------------------------------------------
# The report and its verification


@dataclass(frozen=True)
class Kill:
    """One worker process killed with ``SIGKILL``, and the replacement started for it."""

    worker_id: str
    pid: int
    abandoned: int
    """Tasks it was running whose result was not stored: left for others to take over."""
    replacement: str


@dataclass
class DemoReport:
    """What a demo run did and whether it verified.

    ``ok`` is true when every instance completed, no task's result was recorded twice, the
    stored results form consistent chains, every task abandoned by the killed worker was
    taken over, and the surviving workers shut down cleanly.
    """

    url: str
    """The database, password masked."""
    run_id: str
    """Part of every instance id of this run: ``order-<run_id>-<n>``."""
    instances: int
    completed: int = 0
    results: int = 0
    """Task results stored (4 per completed order)."""
    executions: int = 0
    """Task function runs, re-runs included."""
    takeovers: int = 0
    """Executions under a claim taken anew (fencing token above 1)."""
    abandoned: int = 0
    """Executions the killed worker had started and never finished."""
    taken_over: int = 0
    """Of those, tasks whose result was then recorded by another worker."""
    refused: int = 0
    """Executions whose claim was lost, so the store refused (or was never asked for) their
    result."""
    duplicate_results: int = 0
    """Tasks with more than one result accepted by the store. Must be 0."""
    lineage_errors: int = 0
    """Stored results that disagree with what the next task consumed. Must be 0."""
    kills: list[Kill] = field(default_factory=list)
    """The workers killed, in order. Usually one; another is killed only when a kill hit a
    worker just after it had saved every task it was running (nothing to take over)."""
    worker_exit_codes: dict[str, int | None] = field(default_factory=dict)
    processing_seconds: float = 0.0
    """From the first worker's start to the last order's completion."""
    wall_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify(report: DemoReport, backend: SqlBackend, run_id: str, ids: list[str]) -> None:
    """Fill in the counters from the store and the executions table; list the problems."""
    rows = _execution_rows(backend.engine, run_id)
    report.executions = len(rows)
    report.takeovers = sum(1 for row in rows if row["token"] > 1)
    report.refused = sum(1 for row in rows if row["outcome"] == TaskOutcome.LOST.value)
    by_task: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[(row["instance_id"], row["task_id"])].append(row)

    stored: dict[tuple[str, str], str] = {}  # (instance, task) -> execution id of the result
    missing = 0
    for instance_id in ids:
        try:
            snapshot = backend.load_snapshot(instance_id)
        except NotFoundError:
            missing += 1  # deleted by someone else sharing the database
            continue
        if snapshot.status is WorkflowStatus.COMPLETED:
            report.completed += 1
        outputs = {task: _load(out) for task, out in snapshot.completed_tasks.items()}
        report.results += len(outputs)
        for task_id, output in outputs.items():
            stored[(instance_id, task_id)] = output["execution"]
        report.lineage_errors += _lineage_errors(outputs, snapshot.output)

    for key, execution_id in stored.items():
        known = {row["execution_id"] for row in by_task.get(key, [])}
        if execution_id not in known:
            report.lineage_errors += 1  # a result no recorded execution produced
    for key, task_rows in by_task.items():
        accepted = {
            row["execution_id"] for row in task_rows if row["outcome"] == TaskOutcome.RECORDED.value
        }
        if key in stored:
            accepted.add(stored[key])
        if len(accepted) > 1:
            report.duplicate_results += 1

    killed = {kill.worker_id for kill in report.kills}
    if killed:
        abandoned = [
            row
            for row in rows
            if row["worker"] in killed
            and row["outcome"] is None
            and stored.get((row["instance_id"], row["task_id"])) != row["execution_id"]
        ]
        report.abandoned = len(abandoned)
        report.taken_over = sum(
            1
            for row in abandoned
            if any(
                other["token"] > row["token"]
                and other["execution_id"] == stored.get((row["instance_id"], row["task_id"]))
                for other in by_task[(row["instance_id"], row["task_id"])]
            )
        )
    _list_problems(report)
    if missing:
        report.problems.append(f"{missing} orders were deleted from the database during the run")


def _lineage_errors(outputs: dict[str, dict[str, Any]], final: bytes | None) -> int:
    errors = 0
    for task_id, consumed in _CONSUMES.items():
        output = outputs.get(task_id)
        if output is None:
            continue
        for source in consumed:
            if (
                source not in outputs
                or output["consumed"].get(source) != outputs[source]["execution"]
            ):
                errors += 1
    if final is not None and "ship" in outputs:
        errors += _load(final)["execution"] != outputs["ship"]["execution"]
    return errors


def _list_problems(report: DemoReport) -> None:
    problems = report.problems
    if not any(kill.abandoned for kill in report.kills):
        problems.append("no worker was killed while running a task: the run ended first")
    if report.completed != report.instances:
        problems.append(f"{report.instances - report.completed} orders did not complete")
    if report.duplicate_results:
        problems.append(f"{report.duplicate_results} tasks had their result recorded twice")
    if report.lineage_errors:
        problems.append(f"{report.lineage_errors} stored results disagree with their consumers")
    if report.taken_over < report.abandoned:
        problems.append(
            f"{report.abandoned - report.taken_over} tasks of the killed worker were not taken over"
        )
    killed = {kill.worker_id for kill in report.kills}
    for worker_id, code in sorted(report.worker_exit_codes.items()):
        if worker_id not in killed and code != 0:
            problems.append(f"{worker_id} exited with status {code} (expected a clean stop)")


def _execution_rows(engine: Engine, run_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(select(executions).where(executions.c.run_id == run_id))
        return [dict(row._mapping) for row in result]


# --------------------------------------------------------------------------------------------
# The run


def run_demo(
    url: str | None = None,
    *,
    instances: int = 200,
    processes: int = 3,
    threads: int = 4,
    kill_after: float = 0.3,
    ttl: timedelta = timedelta(seconds=2),
    timeout: timedelta = timedelta(minutes=2),
    keep: bool = False,
    console: Console | None = None,
) -> DemoReport:
    """Run the crash-surviving demo and return its verified report (see the module doc).

    Args:
        url: the database; default a fresh SQLite file in a temporary directory, removed
            afterwards unless ``keep``.
        instances: how many order workflows to run.
        processes: how many worker processes (one of them is killed).
        threads: threads per worker process.
        kill_after: kill a worker once this fraction of the task runs is done.
        ttl: the workers' claim TTL: how long the killed worker's tasks wait for takeover.
        timeout: give up (and report it) if the orders have not completed by then.
        keep: keep the temporary SQLite database (its URL is printed).
        console: where to print (default: a new ``rich`` console on stdout).

    Raises:
        ValueError: a size or fraction out of range.
        PersistenceError: the database cannot be reached or provisioned.
    """
    if instances < 1 or processes < 1 or threads < 1:
        raise ValueError("instances, processes and threads must be at least 1")
    if not 0.0 < kill_after < 1.0:
        raise ValueError(f"kill_after must be a fraction between 0 and 1, got {kill_after}")
    console = console or Console()
    started = time.monotonic()
    with _database(url, keep, console) as database_url:
        backend = SqlBackend(_migrated(database_url))
        try:
            report = _run(
                backend,
                database_url,
                instances,
                processes,
                threads,
                kill_after,
                ttl,
                timeout,
                console,
            )
        finally:
            backend.close()
    report.wall_seconds = time.monotonic() - started
    _print_summary(report, console)
    return report


@contextmanager
def _database(url: str | None, keep: bool, console: Console) -> Iterator[str]:
    if url is not None:
        yield url
        return
    directory = Path(tempfile.mkdtemp(prefix="sayiir-demo-"))
    try:
        yield f"sqlite:///{directory / 'demo.db'}"
    finally:
        if keep:
            console.print(f"Database kept: [bold]sqlite:///{directory / 'demo.db'}[/]")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def _migrated(url: str) -> str:
    migrate(url)
    return url


def _run(
    backend: SqlBackend,
    url: str,
    instances: int,
    processes: int,
    threads: int,
    kill_after: float,
    ttl: timedelta,
    timeout: timedelta,
    console: Console,
) -> DemoReport:
    shown_url = make_url(url).render_as_string(hide_password=True)
    run_id = uuid.uuid4().hex[:8]
    report = DemoReport(url=shown_url, run_id=run_id, instances=instances)
    _prepare_executions_table(backend.engine)
    console.print(
        f"[bold]sayiir-persistence demo[/]\n"
        f"  {instances} orders: validate -> (reserve_stock || charge_payment) -> ship\n"
        f"  {processes} worker processes x {threads} threads, claim TTL "
        f"{ttl.total_seconds():g}s; one worker is killed at {kill_after:.0%} of the task runs\n"
        f"  database: {shown_url}",
        highlight=False,
    )
    ids = _create_orders(backend, run_id, instances)
    spec = _WorkerSpec(url, "", run_id, threads, ttl.total_seconds(), _worker_log_level())
    pool = _Pool(spec)
    try:
        begun = time.monotonic()
        for _ in range(processes):
            pool.start_one()
        _watch(backend, pool, report, run_id, ids, kill_after, ttl, timeout, console)
        report.processing_seconds = time.monotonic() - begun
    finally:
        report.worker_exit_codes = pool.stop_all()
    _verify(report, backend, run_id, ids)
    return report


def _worker_log_level() -> int:
    # The workers write to the terminal the progress bar is drawn on: only errors, unless
    # the caller asked for more (-v).
    level = logging.getLogger().getEffectiveLevel()
    return level if level <= logging.INFO else logging.ERROR


def _create_orders(backend: SqlBackend, run_id: str, count: int) -> list[str]:
    ids = []
    for number in range(1, count + 1):
        instance_id, order = _new_order(run_id, number)
        snapshot = ORDER_PIPELINE.start(
            instance_id, DEFINITION_HASH, initial_input=order, tags=_run_tags(run_id)
        )
        backend.save_snapshot(snapshot, expected_version=0)
        ids.append(instance_id)
    return ids


def _watch(
    backend: SqlBackend,
    pool: _Pool,
    report: DemoReport,
    run_id: str,
    ids: list[str],
    kill_after: float,
    ttl: timedelta,
    timeout: timedelta,
    console: Console,
) -> None:
    """Show progress until every order completed; kill a worker on the way."""
    deadline = time.monotonic() + timeout.total_seconds()
    # Counted in task results, not in completed orders: the orders advance side by side
    # (priority aging), so most complete in the last moments of a run.
    kill_at = max(1, int(len(ids) * len(_CONSUMES) * kill_after))
    columns = (
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("orders", total=len(ids), detail="")
        while True:
            completed = _completed_count(backend, run_id, len(ids))
            counts = _execution_counts(backend.engine, run_id)
            progress.update(
                bar,
                completed=completed,
                detail=(
                    f"{counts['executions']} task runs, {counts['takeovers']} takeovers, "
                    f"{len(pool.alive())} workers"
                ),
            )
            if completed >= len(ids):
                return
            if time.monotonic() > deadline:
                report.problems.append(f"timed out after {timeout.total_seconds():g}s")
                return
            if counts["recorded"] >= kill_at and _should_kill(report):
                _kill_one(backend, pool, report, run_id, ttl, progress.console)
            time.sleep(0.1)


def _should_kill(report: DemoReport) -> bool:
    # Until a kill abandoned running work (the first one almost always does); at most 3.
    return len(report.kills) < 3 and not any(kill.abandoned for kill in report.kills)


def _kill_one(
    backend: SqlBackend,
    pool: _Pool,
    report: DemoReport,
    run_id: str,
    ttl: timedelta,
    console: Console,
) -> None:
    """SIGKILL the live worker with the most unsaved running tasks (none: try later)."""
    alive = pool.alive()
    unsaved = _unsaved_by_worker(backend, run_id)
    candidates = [(unsaved[wid], wid) for wid in alive if unsaved[wid] > 0]
    if not candidates:
        return
    _, victim = max(candidates)
    process = alive[victim]
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    # Counted again now that it is dead: it may have saved some in the meantime.
    abandoned = _unsaved_by_worker(backend, run_id)[victim]
    replacement, new_process = pool.start_one()
    report.kills.append(Kill(victim, process.pid, abandoned, replacement))
    console.print(
        f"[bold red]SIGKILL[/] {victim} (pid {process.pid}) while it was running {abandoned} "
        f"task(s): their claims expire within {ttl.total_seconds():g}s, then others take over"
    )
    if not abandoned:
        console.print(f"{victim} had just saved its tasks: another worker will be killed")
    console.print(f"[green]started[/] {replacement} (pid {new_process.pid}) as a replacement")


def _completed_count(backend: SqlBackend, run_id: str, count: int) -> int:
    prefix = f"order-{run_id}-"
    ids = backend.list_snapshots(status=WorkflowStatus.COMPLETED, after=prefix, limit=count)
    return sum(1 for instance_id in ids if instance_id.startswith(prefix))


def _execution_counts(engine: Engine, run_id: str) -> dict[str, int]:
    # COUNT(CASE ...) rather than COUNT(*) FILTER (...), which MySQL lacks.
    takeovers = func.count(case((executions.c.token > 1, 1)))
    recorded = func.count(case((executions.c.outcome == TaskOutcome.RECORDED.value, 1)))
    with engine.connect() as conn:
        row = conn.execute(
            select(
                func.count().label("executions"),
                takeovers.label("takeovers"),
                recorded.label("recorded"),
            ).where(executions.c.run_id == run_id)
        ).one()
    return {"executions": row.executions, "takeovers": row.takeovers, "recorded": row.recorded}


def _unsaved_by_worker(backend: SqlBackend, run_id: str) -> Counter[str]:
    """Per worker, the executions running now whose result is not stored yet: what a kill
    right now would abandon (an execution without outcome may already be saved)."""
    with backend.engine.connect() as conn:
        rows = conn.execute(
            select(executions.c.worker, executions.c.instance_id, executions.c.task_id).where(
                executions.c.run_id == run_id, executions.c.outcome.is_(None)
            )
        ).all()
    return Counter(
        row.worker for row in rows if backend.load_task_result(row.instance_id, row.task_id) is None
    )


def _print_summary(report: DemoReport, console: Console) -> None:
    table = Table(title="Demo summary", show_header=False, title_justify="left")
    table.add_column("what", no_wrap=True)
    table.add_column("value", justify="right")

    def checked(value: object, good: bool) -> str:
        return f"{value} [green]ok[/]" if good else f"{value} [bold red]FAILED[/]"

    table.add_row("Orders", str(report.instances))
    table.add_row("Completed", checked(report.completed, report.completed == report.instances))
    table.add_row("Task results recorded", str(report.results))
    table.add_row("Task executions (re-runs too)", str(report.executions))
    for kill in report.kills:
        table.add_row(
            "Killed with SIGKILL",
            f"{kill.worker_id}, pid {kill.pid}, running {kill.abandoned} task(s)",
        )
    if report.kills:
        table.add_row(
            "Its tasks taken over",
            checked(
                f"{report.taken_over}/{report.abandoned}", report.taken_over == report.abandoned
            ),
        )
    table.add_row("Takeovers (fencing token > 1)", str(report.takeovers))
    table.add_row("Results refused by fencing", str(report.refused))
    table.add_row(
        "Duplicate results", checked(report.duplicate_results, not report.duplicate_results)
    )
    table.add_row("Inconsistent results", checked(report.lineage_errors, not report.lineage_errors))
    killed = {kill.worker_id for kill in report.kills}
    survivors = {wid: code for wid, code in report.worker_exit_codes.items() if wid not in killed}
    clean = sum(1 for code in survivors.values() if code == 0)
    table.add_row(
        "Clean shutdown (SIGTERM)", checked(f"{clean}/{len(survivors)}", clean == len(survivors))
    )
    table.add_row(
        "Wall time", f"{report.wall_seconds:.1f} s (processing {report.processing_seconds:.1f} s)"
    )
    console.print(table)
    if report.ok:
        console.print(
            "[bold green]Verified[/]: every order completed and no task's result was recorded "
            "twice, although a worker was killed mid-task."
        )
    else:
        for problem in report.problems:
            console.print(f"[bold red]Problem[/]: {problem}")


# --------------------------------------------------------------------------------------------
# Command line (wired into `sayiir-persistence demo`; also `python -m sayiir_persistence.demo`)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``demo`` subcommand's)."""
    parser.add_argument(
        "--url",
        default=None,
        help="database URL (default: a fresh SQLite file in a temporary directory). "
        "Use a scratch database: SAYIIR_DATABASE_URL is deliberately not used",
    )
    parser.add_argument(
        "--instances", type=_positive_int, default=200, help="orders to run (default: %(default)s)"
    )
    parser.add_argument(
        "--processes", type=_positive_int, default=3, help="worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=4,
        help="threads per worker process (default: %(default)s)",
    )
    parser.add_argument(
        "--kill-after",
        type=_fraction,
        default=0.3,
        metavar="FRACTION",
        help="SIGKILL a worker once this fraction of the task runs is done (default: %(default)s)",
    )
    parser.add_argument(
        "--ttl",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="claim TTL of the workers (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="give up if the orders have not completed by then (default: %(default)s)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary SQLite database and print its URL (to try the other commands)",
    )


def run_demo_command(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run the demo from parsed :func:`add_demo_arguments` options; 0 if it verified, else 1.

    ``PersistenceError`` (bad URL, unreachable database) propagates to the caller, and so
    does ``KeyboardInterrupt`` (also raised for ``SIGTERM`` while the demo runs, so that its
    worker processes are stopped and its temporary database removed either way).
    """
    with _sigterm_as_interrupt():
        report = run_demo(
            args.url,
            instances=args.instances,
            processes=args.processes,
            threads=args.threads,
            kill_after=args.kill_after,
            ttl=timedelta(seconds=args.ttl),
            timeout=timedelta(seconds=args.timeout),
            keep=args.keep,
            console=console,
        )
    return 0 if report.ok else 1


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m sayiir_persistence.demo [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sayiir_persistence.demo", description="Run the crash-surviving demo."
    )
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_demo_command(args)
    except PersistenceError as error:  # bad URL, database down: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the workers were stopped on the way out
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
