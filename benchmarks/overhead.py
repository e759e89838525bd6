"""Where the time of one call goes: ``release_task_claim`` five ways, interleaved.

``python -m benchmarks.overhead --db postgres`` (or ``--url``) times the same one-statement
transaction (release one claim) through:

1. the library with ``pool_pre_ping=True`` (its default engine before it was dropped: one
   ``SELECT 1`` round trip at every checkout);
2. the library (``SqlBackend``, its default engine, no pre-ping);
3. SQLAlchemy Core, the statement built at each call (as the library once built it), no ping;
4. SQLAlchemy Core, one statement built once with ``bindparam()`` (as the library now does);
5. the bare driver (:class:`benchmarks.ceiling.CeilingClient`).

Each line shows one cost: the ping's round trip (1 vs 2), the library's own wrapper
(validation, error translation, retry loop: 2 vs 4), building the SQL expression and its cache
key at every call (3 vs 4), then SQLAlchemy itself (4 vs 5). Client CPU per call is the
figure to read: on a small shared machine CPU, not the database, is what the claim cycle runs
out of first.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa

from sayiir_persistence import SqlBackend
from sayiir_persistence.sql.schema import task_claims

from . import databases
from .ceiling import CeilingClient

TASK_ID = databases.TASK_ID


def measure(url: str, calls: int) -> dict[str, dict[str, float]]:
    databases.create_and_migrate(url)
    databases.reset(url)
    databases.seed(url, 0, 1)
    pinged = SqlBackend(url, pool_pre_ping=True)
    library = SqlBackend(url)
    bare = CeilingClient(url, threads=1)
    [claimed] = library.claim_available_tasks("w", 1, timedelta(minutes=5))
    instance, token = claimed.claim.instance_id, claimed.claim.token
    engine = library.engine
    prebuilt = (
        sa.update(task_claims)
        .where(
            task_claims.c.instance_id == sa.bindparam("b_instance_id"),
            task_claims.c.task_id == sa.bindparam("b_task_id"),
            task_claims.c.worker_id == sa.bindparam("b_worker_id"),
            task_claims.c.released.is_(False),
            task_claims.c.token == sa.bindparam("b_token"),
        )
        .values(released=True)
    )
    take_back = sa.update(task_claims).values(released=False)

    def core_per_call() -> None:
        with engine.begin() as conn:
            statement = (
                sa.update(task_claims)
                .where(
                    task_claims.c.instance_id == instance,
                    task_claims.c.task_id == TASK_ID,
                    task_claims.c.worker_id == "w",
                    task_claims.c.released.is_(False),
                    task_claims.c.token == token,
                )
                .values(released=True)
            )
            conn.execute(statement)

    def core_prebuilt() -> None:
        with engine.begin() as conn:
            conn.execute(
                prebuilt,
                {
                    "b_instance_id": instance,
                    "b_task_id": TASK_ID,
                    "b_worker_id": "w",
                    "b_token": token,
                },
            )

    ways: dict[str, Callable[[], None]] = {
        "library with pool_pre_ping": lambda: pinged.release_task_claim(
            instance, TASK_ID, "w", token=token
        ),
        "library": lambda: library.release_task_claim(instance, TASK_ID, "w", token=token),
        "Core, built per call, no ping": core_per_call,
        "Core, built once, no ping": core_prebuilt,
        "bare driver": lambda: bare.release_task_claim(instance, TASK_ID, "w", token),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    try:
        for _ in range(calls):
            for name, call in ways.items():
                with engine.begin() as conn:
                    conn.execute(take_back)
                wall, cpu = time.perf_counter(), time.process_time()
                call()
                samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    finally:
        for closeable in (pinged, library, bare):
            closeable.close()
        databases.reset(url)
    return {
        name: {
            "wall_p50_ms": statistics.median(wall for wall, _ in values) * 1000,
            "cpu_mean_ms": statistics.mean(cpu for _, cpu in values) * 1000,
        }
        for name, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    parser.add_argument(
        "--db", action="append", default=[], choices=("sqlite", "postgres", "mysql")
    )
    parser.add_argument("--url", action="append", default=[])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    for target in databases.resolve(args.db or ([] if args.url else ["sqlite"]), args.url):
        print(f"== {target.label}: release_task_claim, {args.calls} calls each, interleaved")
        try:
            figures_by_way = measure(target.url, args.calls)
        finally:
            if target.scratch is not None:
                shutil.rmtree(target.scratch, ignore_errors=True)
        for name, figures in figures_by_way.items():
            print(
                f"  {name:32} wall p50 {figures['wall_p50_ms']:6.3f} ms"
                f"   client CPU {figures['cpu_mean_ms']:6.3f} ms"
            )


if __name__ == "__main__":
    main()
