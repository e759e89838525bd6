"""What the call timeout costs, and how long a call takes to fail on a silent network.

``python -m benchmarks.timeouts overhead`` times, interleaved, the same read
(``load_snapshot`` of a small workflow) through two backends on the same database, one with
the default ``call_timeout`` (each call armed and disarmed on the watchdog) and one with
``call_timeout=None`` (no watchdog, no server-side timeouts), and the arming and disarming
alone, without a database. Client CPU per call is the figure to read.

``python -m benchmarks.timeouts silent`` measures, with the DEFAULT settings (not the tests'
short ones), how long a call takes to raise ``BackendUnavailableError`` when the network
goes silent (``TcpProxy.blackhole``, from the test helpers): a call on a pooled connection,
and the first call of a fresh backend (which must open a connection). About 75 s per driver.

Both take ``--db postgres`` / ``--db mysql`` (default both); PostgreSQL runs through
psycopg2 and psycopg 3. The databases are ``sayiir_bench_timeouts`` on the local servers
(``--postgres-url`` / ``--mysql-url`` for others), created when missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url

from sayiir_persistence import BackendUnavailableError, SqlBackend, WorkflowSnapshot
from sayiir_persistence.sql.watchdog import CallWatchdog

from . import databases

# The fault-injection proxy lives with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.tcp_proxy import TcpProxy

DATABASE = "sayiir_bench_timeouts"
URLS = {
    "postgres": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DATABASE}",
    "mysql": f"mysql+pymysql://root@127.0.0.1:3306/{DATABASE}?charset=utf8mb4",
}
DRIVERS = {"postgres": ("psycopg2", "psycopg"), "mysql": ("pymysql",)}
INSTANCE = "timeouts-bench"


def driver_urls(dbs: list[str], urls: dict[str, str]) -> list[str]:
    """One URL per driver of the chosen databases."""
    chosen = []
    for db in dbs:
        url = make_url(urls[db])
        for driver in DRIVERS[db]:
            chosen.append(
                url.set(drivername=f"{url.get_backend_name()}+{driver}").render_as_string(
                    hide_password=False
                )
            )
    return chosen


def prepare(url: str) -> None:
    databases.create_and_migrate(url)
    databases.reset(url)
    backend = SqlBackend(url)
    try:
        backend.save_snapshot(WorkflowSnapshot.new(INSTANCE, "bench", first_task="t"))
    finally:
        backend.close()


def cpu_per_call(call: Callable[[], object], calls: int) -> tuple[float, float]:
    """Microseconds of wall time and of this process's CPU per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call()
    return (
        (time.perf_counter() - wall) / calls * 1e6,
        (time.process_time() - cpu) / calls * 1e6,
    )


def watch_alone(calls: int) -> float:
    """Microseconds to arm and disarm one watch (no database; a socket pair's end)."""
    import socket

    left, right = socket.socketpair()
    watchdog = CallWatchdog(60.0, "bench")
    try:
        fd = left.fileno()
        started = time.perf_counter()
        for _ in range(calls):
            with watchdog.watch(fd, time.monotonic() + 60.0):
                pass
        return (time.perf_counter() - started) / calls * 1e6
    finally:
        watchdog.close()
        left.close()
        right.close()


def overhead(dbs: list[str], urls: dict[str, str], calls: int, rounds: int) -> None:
    alone = statistics.median(watch_alone(calls * 10) for _ in range(rounds))
    print(f"arm + disarm alone: {alone:.2f} us per call (median of {rounds})")
    for url in driver_urls(dbs, urls):
        prepare(url)
        bounded = SqlBackend(url)  # the default call_timeout
        unbounded = SqlBackend(url, call_timeout=None)
        try:
            results: dict[str, list[tuple[float, float]]] = {"bounded": [], "unbounded": []}
            for backend in (bounded, unbounded):  # warm the pools and caches
                cpu_per_call(lambda b=backend: b.load_snapshot(INSTANCE), calls // 10)
            for _ in range(rounds):
                for name, backend in (("bounded", bounded), ("unbounded", unbounded)):
                    results[name].append(
                        cpu_per_call(lambda b=backend: b.load_snapshot(INSTANCE), calls)
                    )
            line = []
            for name, samples in results.items():
                wall = statistics.median(sample[0] for sample in samples)
                cpu = statistics.median(sample[1] for sample in samples)
                line.append(f"{name} {wall:.0f} us wall, {cpu:.0f} us CPU")
            print(f"{make_url(url).drivername}: load_snapshot: {'; '.join(line)}")
        finally:
            bounded.close()
            unbounded.close()


def seconds_to_fail(call: Callable[[], object]) -> str:
    started = time.monotonic()
    try:
        call()
    except BackendUnavailableError as error:
        return f"{time.monotonic() - started:.1f} s ({str(error)[:80]}...)"
    return "did not fail"


def time_to_fail_silently(url: str) -> tuple[str, str]:
    """With every default: a call on a pooled connection, then a fresh backend's start, on a
    network gone silent."""
    prepare(url)
    with TcpProxy.for_url(url) as proxy:
        proxied = proxy.proxied_url(url)
        backend = SqlBackend(proxied)
        try:
            backend.load_snapshot(INSTANCE)  # a pooled connection, ready
            proxy.blackhole()
            pooled = seconds_to_fail(lambda: backend.load_snapshot(INSTANCE))
            fresh = seconds_to_fail(lambda: SqlBackend(proxied).close())
            proxy.restore()
            backend.load_snapshot(INSTANCE)  # and it works again
        finally:
            proxy.restore()
            backend.close()
    return pooled, fresh


def silent(dbs: list[str], urls: dict[str, str]) -> None:
    for url in driver_urls(dbs, urls):
        pooled, fresh = time_to_fail_silently(url)
        print(f"{make_url(url).drivername}: a call on a pooled connection failed after {pooled}")
        print(f"{make_url(url).drivername}: a fresh backend's start failed after {fresh}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.timeouts", description=__doc__)
    parser.add_argument("what", choices=("overhead", "silent"))
    parser.add_argument("--db", action="append", choices=sorted(URLS), dest="dbs")
    parser.add_argument("--postgres-url", default=os.environ.get("SAYIIR_BENCH_POSTGRES_URL"))
    parser.add_argument("--mysql-url", default=os.environ.get("SAYIIR_BENCH_MYSQL_URL"))
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (overhead)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (overhead)")
    args = parser.parse_args(argv)
    urls = dict(URLS)
    if args.postgres_url:
        urls["postgres"] = args.postgres_url
    if args.mysql_url:
        urls["mysql"] = args.mysql_url
    dbs = args.dbs or sorted(URLS, reverse=True)
    if args.what == "overhead":
        overhead(dbs, urls, args.calls, args.rounds)
    else:
        silent(dbs, urls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
