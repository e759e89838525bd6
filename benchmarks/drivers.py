"""``python -m benchmarks.drivers``: the reference Worker on psycopg 3 against psycopg2.

Each pair drains the same backlog of one-task workflows with the Worker (8 threads) through
``postgresql+psycopg://`` and ``postgresql+psycopg2://``, in alternating order, on the local
server's ``sayiir_bench`` database. Reported per drain: workflows/s, the client's CPU per task
(``time.process_time`` of this process) and the **server's** CPU per task: the user and system
time of every ``postgres`` process of this machine, read from ``/proc``, the postmaster's
reaped children included (a backend that exits moves its time there), so run it on a machine
where nothing else uses that server. Then the median and range of each, and of the ratio
psycopg 3 / psycopg2 per pair.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path

from sayiir_persistence import SqlBackend
from sayiir_persistence.worker import Pipeline, TaskContext, TaskOutcome, Worker

from .databases import DEFAULT_URLS, create_and_migrate, reset

PIPELINE = Pipeline("t")
DRIVERS = ("psycopg", "psycopg2")


def server_cpu_seconds() -> float:
    """User + system CPU of every live ``postgres`` process and of their reaped children."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            data = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        if data[data.index("(") + 1 : data.rindex(")")] != "postgres":
            continue
        fields = data[data.rindex(")") + 2 :].split()
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def drain(url: str, workflows: int) -> dict[str, float]:
    reset(url)
    backend = SqlBackend(url)
    for number in range(workflows):
        backend.save_snapshot(PIPELINE.start(f"wf-{number:06d}", "drivers", initial_input=b"x"))
    finished = threading.Semaphore(0)

    def on_outcome(ctx: TaskContext, outcome: TaskOutcome) -> None:
        finished.release()

    worker = Worker(
        backend,
        lambda ctx: b"out",
        PIPELINE,
        threads=8,
        poll_interval=timedelta(milliseconds=10),
        on_outcome=on_outcome,
    )
    server, client, started = server_cpu_seconds(), time.process_time(), time.monotonic()
    with worker:
        for _ in range(workflows):
            finished.acquire()
        elapsed = time.monotonic() - started
        client = time.process_time() - client
        server = server_cpu_seconds() - server
    backend.close()
    return {
        "workflows_per_s": workflows / elapsed,
        "client_ms_per_task": client * 1000 / workflows,
        "server_ms_per_task": server * 1000 / workflows,
    }


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drivers", description=__doc__)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--workflows", type=int, default=1500)
    args = parser.parse_args()
    base = os.environ.get("SAYIIR_BENCH_POSTGRES_URL", DEFAULT_URLS["postgres"])
    urls = {driver: base.replace("+psycopg2://", f"+{driver}://", 1) for driver in DRIVERS}
    create_and_migrate(urls["psycopg2"])
    runs: dict[str, list[dict[str, float]]] = {driver: [] for driver in DRIVERS}
    for pair in range(args.pairs):
        order = DRIVERS if pair % 2 == 0 else DRIVERS[::-1]
        for driver in order:
            result = drain(urls[driver], args.workflows)
            runs[driver].append(result)
            print(
                f"pair {pair + 1} {driver:9} "
                + ", ".join(f"{k} {v:.2f}" for k, v in result.items())
            )
    print(f"\n{args.workflows} one-task workflows, Worker(threads=8), {args.pairs} pairs:")
    for metric in ("workflows_per_s", "client_ms_per_task", "server_ms_per_task"):
        cells = [_summary([run[metric] for run in runs[driver]]) for driver in DRIVERS]
        ratios = [
            a[metric] / b[metric] for a, b in zip(runs["psycopg"], runs["psycopg2"], strict=True)
        ]
        print(f"  {metric:20} psycopg {cells[0]}, psycopg2 {cells[1]}, ratio {_summary(ratios)}")


if __name__ == "__main__":
    main()
