"""Scenario 4: latency of ``claim_available_tasks`` and ``find_available_tasks`` as the number
of in-progress workflows grows (1,000 -> 100,000, and 1,000,000 on PostgreSQL).

The table is filled in steps (each size adds to the previous one, see
:func:`benchmarks.databases.seed`); every tenth task is held by a live claim of a busy
worker. At each size, one thread alternates a timed ``find_available_tasks(limit=10)`` and a
timed ``claim_available_tasks(limit=10)``; the claimed tasks are released untimed, so the
backlog stays the same size. An index serves both queries: the p50 should stay flat.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from sayiir_persistence import SqlBackend

from . import databases
from .timing import summarize

TTL = timedelta(minutes=5)
LIMIT = 10
WARM_UP_CALLS = 3


def run(url: str, sizes: list[int], calls: int, log: Any = print) -> list[dict[str, Any]]:
    databases.reset(url)
    rows = []
    seeded = 0
    for size in sorted(sizes):
        started = time.perf_counter()
        databases.seed(url, seeded, size, claimed_every=10)
        seeded = size
        log(f"  seeded {size:,} workflows in {time.perf_counter() - started:.1f} s")
        find_times, claim_times = [], []
        with SqlBackend(url) as backend:
            for _ in range(WARM_UP_CALLS):
                _one_round(backend)
            for _ in range(calls):
                find_s, claim_s = _one_round(backend)
                find_times.append(find_s)
                claim_times.append(claim_s)
        rows.append(
            {
                "workflows": size,
                "claim_available_tasks": summarize(claim_times),
                "find_available_tasks": summarize(find_times),
            }
        )
    return rows


def _one_round(backend: SqlBackend) -> tuple[float, float]:
    """Time one find and one claim (limit 10), then release what was claimed (untimed)."""
    began = time.perf_counter()
    found = backend.find_available_tasks("scale-worker", LIMIT)
    middle = time.perf_counter()
    claimed = backend.claim_available_tasks("scale-worker", LIMIT, TTL)
    ended = time.perf_counter()
    if len(found) != LIMIT or len(claimed) != LIMIT:
        raise RuntimeError(f"expected {LIMIT} tasks, got {len(found)} / {len(claimed)}")
    for task in claimed:
        backend.release_task_claim(
            task.claim.instance_id, task.claim.task_id, "scale-worker", token=task.claim.token
        )
    return middle - began, ended - middle
