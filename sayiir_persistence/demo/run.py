"""A demo run: provision the database, create the orders, start the workers, kill one midway,
wait for every order, stop the workers, verify and print the report."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from sqlalchemy.engine import make_url

from ..model import WorkflowStatus
from ..provisioning import migrate
from ..sql.backend import SqlBackend
from .executions import execution_counts, prepare_executions_table, unsaved_by_worker
from .processes import WorkerPool, WorkerSpec
from .report import DemoReport, Kill, print_summary
from .verify import verify
from .workflow import CONSUMES, DEFINITION_HASH, ORDER_PIPELINE, new_order, run_tags


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
    flaky: float = 0.0,
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
        flaky: the fraction of orders whose payment fails at its first attempt: the
            workers' retry policy runs it again (the summary counts the retries).

    Raises:
        ValueError: a size or fraction out of range.
        PersistenceError: the database cannot be reached or provisioned.
    """
    if instances < 1 or processes < 1 or threads < 1:
        raise ValueError("instances, processes and threads must be at least 1")
    if not 0.0 < kill_after < 1.0:
        raise ValueError(f"kill_after must be a fraction between 0 and 1, got {kill_after}")
    if not 0.0 <= flaky <= 1.0:
        raise ValueError(f"flaky must be a fraction between 0 and 1, got {flaky}")
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
                flaky,
            )
        finally:
            backend.close()
    report.wall_seconds = time.monotonic() - started
    print_summary(report, console)
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
    flaky: float,
) -> DemoReport:
    shown_url = make_url(url).render_as_string(hide_password=True)
    run_id = uuid.uuid4().hex[:8]
    report = DemoReport(url=shown_url, run_id=run_id, instances=instances)
    prepare_executions_table(backend.engine)
    console.print(
        f"[bold]sayiir-persistence demo[/]\n"
        f"  {instances} orders: validate -> (reserve_stock || charge_payment) -> ship\n"
        f"  {processes} worker processes x {threads} threads, claim TTL "
        f"{ttl.total_seconds():g}s; one worker is killed at {kill_after:.0%} of the task runs\n"
        + (f"  {flaky:.0%} of the payments fail once and are retried\n" if flaky else "")
        + f"  database: {shown_url}",
        highlight=False,
    )
    ids = _create_orders(backend, run_id, instances)
    spec = WorkerSpec(url, "", run_id, threads, ttl.total_seconds(), _worker_log_level(), flaky)
    pool = WorkerPool(spec)
    try:
        begun = time.monotonic()
        for _ in range(processes):
            pool.start_one()
        _watch(backend, pool, report, run_id, ids, kill_after, ttl, timeout, console)
        report.processing_seconds = time.monotonic() - begun
    finally:
        report.worker_exit_codes = pool.stop_all()
    verify(report, backend, run_id, ids)
    return report


def _worker_log_level() -> int:
    # The workers write to the terminal the progress bar is drawn on: only errors, unless
    # the caller asked for more (-v).
    level = logging.getLogger().getEffectiveLevel()
    return level if level <= logging.INFO else logging.ERROR


def _create_orders(backend: SqlBackend, run_id: str, count: int) -> list[str]:
    ids = []
    for number in range(1, count + 1):
        instance_id, order = new_order(run_id, number)
        snapshot = ORDER_PIPELINE.start(
            instance_id, DEFINITION_HASH, initial_input=order, tags=run_tags(run_id)
        )
        backend.start_workflow(snapshot)  # IfExists.FAIL: run ids are new, never reused
        ids.append(instance_id)
    return ids


def _watch(
    backend: SqlBackend,
    pool: WorkerPool,
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
    kill_at = max(1, int(len(ids) * len(CONSUMES) * kill_after))
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
            counts = execution_counts(backend.engine, run_id)
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
    pool: WorkerPool,
    report: DemoReport,
    run_id: str,
    ttl: timedelta,
    console: Console,
) -> None:
    """SIGKILL the live worker with the most unsaved running tasks (none: try later)."""
    alive = pool.alive()
    unsaved = unsaved_by_worker(backend, run_id)
    candidates = [(unsaved[wid], wid) for wid in alive if unsaved[wid] > 0]
    if not candidates:
        return
    _, victim = max(candidates)
    process = alive[victim]
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    # Counted again now that it is dead: it may have saved some in the meantime.
    abandoned = unsaved_by_worker(backend, run_id)[victim]
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
