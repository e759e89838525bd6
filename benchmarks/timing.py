"""Latency summaries and the process layout every throughput scenario runs in.

A layout is P processes (started with ``spawn``: nothing is inherited but the arguments) of W
threads each. Every process builds its job first (engine, connections, warm-up), says it is
ready, and waits for one start signal; the wall time runs from that signal to the end of the
last thread, so process start-up and connection set-up are not measured. The client CPU time
(``time.process_time()`` of each process over the same span, summed) is measured alongside:
on a machine whose cores the database servers share, it is what the client costs them.

A job is named by ``module:Class`` and built in the child as
``Class(**options, threads=W, done=...)``; it has ``run_thread(worker_index) -> ThreadResult``
and ``close()``. ``done`` is a counter shared by every process (a ``multiprocessing.Value``)
that jobs use to know when a backlog is drained.
"""

from __future__ import annotations

import importlib
import multiprocessing
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: How long a layout may take before it is abandoned (a stuck run must not hang the suite).
LAYOUT_TIMEOUT_S = 600.0


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (``fraction`` in 0..1)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summarize(durations_s: Iterable[float]) -> dict[str, float]:
    """``n``, ``p50_ms``, ``p99_ms``, ``mean_ms`` of durations given in seconds."""
    values = sorted(durations_s)
    if not values:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    return {
        "n": len(values),
        "p50_ms": percentile(values, 0.50) * 1000,
        "p99_ms": percentile(values, 0.99) * 1000,
        "mean_ms": sum(values) / len(values) * 1000,
    }


def timed_calls(count: int, call: Any) -> list[float]:
    """Durations in seconds of ``count`` calls of ``call()``."""
    durations = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
    return durations


@dataclass
class ThreadResult:
    """What one thread of a job did: per-call durations (seconds) and counters."""

    calls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: Free-form values the scenario merges itself (e.g. the tasks each worker won).
    items: list[Any] = field(default_factory=list)

    def merge(self, other: ThreadResult) -> None:
        for name, durations in other.calls.items():
            self.calls[name].extend(durations)
        for name, count in other.counters.items():
            self.counters[name] += count
        self.items.extend(other.items)

    def plain(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "counters": dict(self.counters), "items": self.items}


@dataclass
class LayoutResult:
    threads: int
    processes: int
    wall_s: float
    #: CPU time of the client processes (all their threads) while the threads ran.
    cpu_s: float
    result: ThreadResult


def _child(
    job: str,
    options: dict[str, Any],
    threads: int,
    process_index: int,
    done: Any,
    start: Any,
    messages: Any,
) -> None:
    try:
        module_name, class_name = job.split(":")
        instance = getattr(importlib.import_module(module_name), class_name)(
            **options, threads=threads, done=done
        )
    except BaseException as error:  # report, so the parent does not wait for a dead child
        messages.put(("error", process_index, repr(error)))
        raise
    try:
        messages.put(("ready", process_index, None))
        start.wait()
        results = [ThreadResult() for _ in range(threads)]
        errors: list[BaseException] = []

        def run(slot: int) -> None:
            try:
                results[slot] = instance.run_thread(process_index * threads + slot)
            except BaseException as error:
                errors.append(error)

        workers = [threading.Thread(target=run, args=(slot,)) for slot in range(threads)]
        started, cpu_started = time.monotonic(), time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        finished, cpu = time.monotonic(), time.process_time() - cpu_started
        if errors:
            messages.put(("error", process_index, repr(errors[0])))
            return
        merged = ThreadResult()
        for result in results:
            merged.merge(result)
        messages.put(("done", process_index, (started, finished, cpu, merged.plain())))
    finally:
        instance.close()


def run_layout(job: str, options: dict[str, Any], *, threads: int, processes: int) -> LayoutResult:
    """Run ``job`` in ``processes`` x ``threads`` and return the merged result and wall time."""
    context = multiprocessing.get_context("spawn")
    done = context.Value("q", 0)
    start = context.Event()
    messages = context.Queue()
    children = [
        context.Process(
            target=_child,
            args=(job, options, threads, index, done, start, messages),
            daemon=True,
        )
        for index in range(processes)
    ]
    for child in children:
        child.start()
    try:
        spans: list[tuple[float, float]] = []
        cpu_s = 0.0
        merged = ThreadResult()
        ready = 0
        deadline = time.monotonic() + LAYOUT_TIMEOUT_S
        while len(spans) < processes:
            try:
                kind, index, payload = messages.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{job}: no result after {LAYOUT_TIMEOUT_S:.0f} s") from None
            if kind == "error":
                raise RuntimeError(f"{job}: process {index} failed: {payload}")
            if kind == "ready":
                ready += 1
                if ready == processes:
                    start.set()
                continue
            started, finished, cpu, plain = payload
            spans.append((started, finished))
            cpu_s += cpu
            part = ThreadResult()
            for name, durations in plain["calls"].items():
                part.calls[name].extend(durations)
            for name, count in plain["counters"].items():
                part.counters[name] += count
            part.items.extend(plain["items"])
            merged.merge(part)
        wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
        return LayoutResult(threads, processes, wall, cpu_s, merged)
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
