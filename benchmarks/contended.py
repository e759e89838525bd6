"""Scenario 3: contended ``claim_task``: every thread races for the same tasks.

All W x P workers walk the same list of tasks in the same order and call ``claim_task`` on
each, so every task is attempted by every worker at about the same moment. Exactly one
attempt per task may win: ``duplicates`` (wins beyond the first) must be 0, and every task
must be won once (``unclaimed`` 0).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from sayiir_persistence import SqlBackend

from .databases import TASK_ID, instance_id
from .timing import ThreadResult

TTL = timedelta(minutes=5)
JOB = "benchmarks.contended:ContendedClaims"


class ContendedClaims:
    """One process of the layout (see :mod:`benchmarks.timing`)."""

    def __init__(self, url: str, tasks: int, threads: int, done: Any) -> None:
        self.backend = SqlBackend(url, pool_size=max(10, threads))
        connections = [self.backend.engine.connect() for _ in range(threads)]
        for conn in connections:
            conn.close()
        self.tasks = tasks

    def close(self) -> None:
        self.backend.close()

    def run_thread(self, worker_index: int) -> ThreadResult:
        worker_id = f"racer-{worker_index}"
        result = ThreadResult()
        times = result.calls["claim_task"]
        clock = time.perf_counter
        for number in range(self.tasks):
            name = instance_id(number)
            started = clock()
            claim = self.backend.claim_task(name, TASK_ID, worker_id, TTL)
            times.append(clock() - started)
            result.counters["attempts"] += 1
            if claim is not None:
                result.items.append(name)
        return result


def summarize_wins(won: list[str], tasks: int) -> dict[str, int]:
    """Wins, duplicates (wins beyond one per task) and tasks nobody won."""
    unique = set(won)
    return {
        "wins": len(won),
        "duplicates": len(won) - len(unique),
        "unclaimed": tasks - len(unique),
    }
