"""The claim cycle on a 3-node MariaDB Galera cluster: all workers on one node vs spread over
the three, in the same run, with the plain local MariaDB as the reference.

``python -m benchmarks.replicated`` starts the cluster itself (``scripts/galera-cluster``, SQL
ports 3311-3313; ``--galera-dir DIR`` uses one already running there instead) and measures,
in alternating order each round, these layouts of ``--processes`` x ``--threads`` workers:

- ``local``: the machine's own MariaDB (``--local-url``, database ``sayiir_bench_replicated``);
- ``node1``: every worker on Galera node 1;
- ``spread``: worker n on node n mod 3 + 1;
- ``spread-nosync``: as ``spread``, with the sessions' ``wsrep_sync_wait`` set back to 0
  after the backend's own setting (what the causality checks cost);
- ``spread-noshare``: as ``spread``, without the preference for the node's share of the
  candidates after a conflict (what it saves in conflicts).

Each worker loops ``claim_available_tasks(limit=1..10)`` -> ``complete_tasks`` (every task
claimed, no next claims) until the backlog of ``--tasks`` single-task workflows (seeded in
bulk through node 1) is drained. A call that gives up (``BackendUnavailableError``: a
conflict still lost after the backend's retries) is counted and repeated, as the ``Worker``
would; so are the conflicts the backend retried (its "retrying transaction" log lines).
Printed: tasks/s per layout, median and range over the rounds, with the conflicts; the JSON
of every round goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from sayiir_persistence import BackendUnavailableError, SqlBackend, TaskCompletion
from sayiir_persistence.sql.dialects import mysql
from sayiir_persistence.sql.schema import ready_tasks

from . import databases
from .claim_cycle import MAX_LIMIT, OUTPUT, TTL
from .timing import ThreadResult, run_layout, summarize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.clusters import GaleraCluster

JOB = "benchmarks.replicated:CompletingCycle"
DATABASE = "sayiir_bench_replicated"
LOCAL_URL = f"mysql+pymysql://root@127.0.0.1:3306/{DATABASE}?charset=utf8mb4"
LAYOUTS = ("local", "node1", "spread", "spread-nosync", "spread-noshare")


class _RetryCounter(logging.Handler):
    """Counts the backend's "retrying transaction" lines (conflicts it ran again)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retrying transaction"):
            self.count += 1


def _no_sync_wait(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET SESSION wsrep_sync_wait = 0")
    finally:
        cursor.close()


class CompletingCycle:
    """One process of the layout (see :mod:`benchmarks.timing`): worker n on ``urls[n % len]``."""

    def __init__(
        self,
        urls: list[str],
        sync_wait: bool,
        share: bool,
        tasks: int,
        threads: int,
        done: Any,
    ) -> None:
        if not share:
            mysql._CONTENDED_SECONDS = 0.0  # this process only: claims keep their order
        self.retries = _RetryCounter()
        backend_log = logging.getLogger("sayiir_persistence.sql.backend")
        backend_log.setLevel(logging.INFO)
        backend_log.addHandler(self.retries)
        self.backends = []
        for url in urls:
            backend = SqlBackend(url, pool_size=max(10, threads))
            if not sync_wait:
                event.listen(backend.engine, "connect", _no_sync_wait)
            connections = [backend.engine.connect() for _ in range(threads)]
            for conn in connections:
                conn.close()
            self.backends.append(backend)
        self.tasks = tasks
        self.done = done
        self.threads = threads

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    def run_thread(self, worker_index: int) -> ThreadResult:
        backend = self.backends[worker_index % len(self.backends)]
        worker_id = f"bench-worker-{worker_index}"
        rng = random.Random(worker_index)
        result = ThreadResult()
        clock = time.perf_counter
        while True:
            limit = rng.randint(1, MAX_LIMIT)
            started = clock()
            try:
                claimed = backend.claim_available_tasks(worker_id, limit, TTL)
            except BackendUnavailableError:
                result.counters["gave_up"] += 1
                continue
            result.calls["claim_available_tasks"].append(clock() - started)
            if not claimed:
                if self.done.value >= self.tasks:
                    if worker_index % self.threads == 0:  # the process's count, once
                        result.counters["retried"] = self.retries.count
                    return result
                result.counters["empty_claims"] += 1
                time.sleep(0.001)
                continue
            completions = [
                TaskCompletion(
                    task.claim.instance_id,
                    task.claim.task_id,
                    worker_id,
                    task.claim.token,
                    output=OUTPUT,
                )
                for task in claimed
            ]
            while True:
                started = clock()
                try:
                    outcomes = backend.complete_tasks(completions, ttl=TTL)
                except BackendUnavailableError:
                    result.counters["gave_up"] += 1
                    continue
                result.calls["complete_tasks"].append(clock() - started)
                break
            for completion, outcome in zip(completions, outcomes, strict=True):
                if outcome.outcome.value == "recorded":
                    result.items.append(completion.instance_id)
                else:
                    result.counters["not_recorded"] += 1
            with self.done.get_lock():
                self.done.value += len(claimed)


def _options(layout: str, cluster: GaleraCluster, local_url: str) -> dict[str, Any]:
    nodes = cluster.node_urls(DATABASE)
    urls = [local_url] if layout == "local" else nodes[:1] if layout == "node1" else nodes
    return {
        "urls": urls,
        "sync_wait": layout != "spread-nosync",
        "share": layout != "spread-noshare",
    }


def measure(
    cluster: GaleraCluster, args: argparse.Namespace, log: Any = print
) -> list[dict[str, Any]]:
    cluster.create_database(DATABASE)
    databases.create_and_migrate(cluster.node_url(1, DATABASE))
    databases.create_and_migrate(args.local_url)
    rows = []
    for round_index in range(args.rounds):
        order = list(args.layouts) if round_index % 2 == 0 else list(reversed(args.layouts))
        for layout in order:
            options = _options(layout, cluster, args.local_url)
            urls = options["urls"]
            databases.reset(urls[0])
            databases.seed(urls[0], 0, args.tasks)
            run = run_layout(
                JOB,
                {**options, "tasks": args.tasks},
                threads=args.threads,
                processes=args.processes,
            )
            done = run.result.items
            row = {
                "layout": layout,
                "round": round_index,
                "threads": args.threads,
                "processes": args.processes,
                "tasks": args.tasks,
                "completed": len(done),
                "duplicates": len(done) - len(set(done)),
                "drained": databases.count(urls[0], ready_tasks) == 0
                and len(set(done)) == args.tasks,
                "wall_s": run.wall_s,
                "tasks_per_s": len(done) / run.wall_s,
                "retried_conflicts": run.result.counters.get("retried", 0),
                "gave_up": run.result.counters.get("gave_up", 0),
                "not_recorded": run.result.counters.get("not_recorded", 0),
                "calls": {
                    name: summarize(durations)
                    for name, durations in sorted(run.result.calls.items())
                },
            }
            rows.append(row)
            log(
                f"  round {round_index} {layout:13} {row['tasks_per_s']:7.0f} tasks/s, "
                f"retried conflicts {row['retried_conflicts']}, gave up {row['gave_up']}, "
                f"duplicates {row['duplicates']}, drained {row['drained']}"
            )
    return rows


def report(rows: list[dict[str, Any]], layouts: list[str]) -> str:
    lines = [
        "| layout | tasks/s median | range | retried conflicts (median) | gave up | duplicates |",
        "|---|---|---|---|---|---|",
    ]
    for layout in layouts:
        mine = [row for row in rows if row["layout"] == layout]
        rates = [row["tasks_per_s"] for row in mine]
        lines.append(
            f"| {layout} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} "
            f"| {statistics.median(row['retried_conflicts'] for row in mine):.0f} "
            f"| {sum(row['gave_up'] for row in mine)} "
            f"| {sum(row['duplicates'] for row in mine)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replicated", description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--local-url", default=LOCAL_URL)
    parser.add_argument("--galera-dir", type=Path, help="a cluster already running there")
    parser.add_argument("--out", type=Path, help="write every round's figures (JSON) here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.galera_dir is not None:
        cluster = GaleraCluster(args.galera_dir, owned=False)
        rows = measure(cluster, args)
    else:
        parent = Path(tempfile.mkdtemp(prefix="sayiir-bench-galera-"))
        parent.chmod(0o755)
        print("starting the Galera cluster ...")
        cluster = GaleraCluster.start(parent / "servers", reuse=False)
        try:
            rows = measure(cluster, args)
        finally:
            cluster.stop()
    print(
        f"\n{args.processes} x {args.threads} workers, {args.tasks} tasks, {args.rounds} rounds "
        f"({time.monotonic() - started:.0f} s)\n"
    )
    print(report(rows, args.layouts))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0 if all(row["drained"] and not row["duplicates"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
