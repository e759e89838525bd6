"""Scenarios 1 and 2: the claim cycle, through the library and through the bare driver.

W threads x P processes each loop ``claim_available_tasks(limit=1..10)`` ->
``save_task_result`` -> ``release_task_claim`` for every task claimed, until the backlog is
drained. ``impl="ours"`` calls ``SqlBackend``; ``impl="ceiling"`` calls
:class:`benchmarks.ceiling.CeilingClient`, hand-written SQL on the same tables. The limit of
each call is drawn from 1..10 by a generator seeded with the worker's number, so both
implementations draw the same sequence.

A worker stops when a claim comes back empty and every task is done (the shared ``done``
counter); an empty claim while others still hold tasks is counted (``empty_claims``) and
retried after a millisecond.
"""

from __future__ import annotations

import random
import time
from datetime import timedelta
from typing import Any

from sayiir_persistence import SqlBackend

from .ceiling import CeilingClient
from .timing import ThreadResult

TTL = timedelta(minutes=5)
OUTPUT = b"x" * 64
MAX_LIMIT = 10
JOB = "benchmarks.claim_cycle:ClaimCycle"


class _Ours:
    """The library, behind the same three calls as the ceiling."""

    def __init__(self, url: str, threads: int) -> None:
        # The README's advice: a pool at least as large as the threads sharing the backend.
        self.backend = SqlBackend(url, pool_size=max(10, threads))
        # Open one connection per thread now, not in the measured time.
        connections = [self.backend.engine.connect() for _ in range(threads)]
        for conn in connections:
            conn.close()

    def claim_available_tasks(
        self, worker_id: str, limit: int, ttl: timedelta
    ) -> list[tuple[str, str, int, bytes | None]]:
        return [
            (task.claim.instance_id, task.claim.task_id, task.claim.token, task.task.input)
            for task in self.backend.claim_available_tasks(worker_id, limit, ttl)
        ]

    def save_task_result(self, instance_id: str, task_id: str, output: bytes) -> int:
        return self.backend.save_task_result(instance_id, task_id, output)

    def release_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, token: int
    ) -> None:
        self.backend.release_task_claim(instance_id, task_id, worker_id, token=token)

    def close(self) -> None:
        self.backend.close()


class ClaimCycle:
    """One process of the layout (see :mod:`benchmarks.timing`)."""

    def __init__(self, impl: str, url: str, tasks: int, threads: int, done: Any) -> None:
        self.client: Any = _Ours(url, threads) if impl == "ours" else CeilingClient(url, threads)
        self.tasks = tasks
        self.done = done

    def close(self) -> None:
        self.client.close()

    def run_thread(self, worker_index: int) -> ThreadResult:
        worker_id = f"bench-worker-{worker_index}"
        rng = random.Random(worker_index)
        result = ThreadResult()
        claim_times = result.calls["claim_available_tasks"]
        save_times = result.calls["save_task_result"]
        release_times = result.calls["release_task_claim"]
        clock = time.perf_counter
        client = self.client
        while True:
            limit = rng.randint(1, MAX_LIMIT)
            started = clock()
            claimed = client.claim_available_tasks(worker_id, limit, TTL)
            claim_times.append(clock() - started)
            if not claimed:
                if self.done.value >= self.tasks:
                    return result
                result.counters["empty_claims"] += 1
                time.sleep(0.001)
                continue
            result.counters["claimed"] += len(claimed)
            for instance_id, task_id, token, _input in claimed:
                started = clock()
                client.save_task_result(instance_id, task_id, OUTPUT)
                saved = clock()
                client.release_task_claim(instance_id, task_id, worker_id, token)
                released = clock()
                save_times.append(saved - started)
                release_times.append(released - saved)
                result.items.append(instance_id)
            with self.done.get_lock():
                self.done.value += len(claimed)
