"""What OpenTelemetry tracing costs: the claim cycle with tracing off and on, and one span.

``python -m benchmarks.telemetry --db sqlite --db postgres`` runs the claim cycle of
:mod:`benchmarks.claim_cycle` (its job, unchanged: claim 1..10, save each result, release each
claim) in each configuration, alternating their order round by round:

- ``off``: ``opentelemetry-api`` installed, no SDK: the API's no-op tracer (what a program
  that does not set up tracing pays);
- ``on``: an SDK ``TracerProvider`` sampling every span, with a ``BatchSpanProcessor`` to an
  exporter that drops them: the cost of making the spans, not of shipping them.

Each layout runs in freshly spawned processes (:mod:`benchmarks.timing`), which is what lets
the two configurations alternate: the global tracer provider can be set once per process.
It prints the median and range over the rounds of tasks/s and client CPU per task, and the
ratio on/off of the medians.

Then the cost of one span alone, in µs per call of a method that does nothing, wrapped by
:func:`sayiir_persistence.telemetry.tracing.traced` (``bare``: not wrapped, as without
OpenTelemetry installed), each configuration in its own interpreter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from . import databases
from .claim_cycle import ClaimCycle
from .timing import run_layout

JOB = "benchmarks.telemetry:TracedClaimCycle"
CONFIGURATIONS = ("off", "on")


def install_sdk() -> None:
    """Set a global SDK tracer provider that samples every span and drops it when exported."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    trace.set_tracer_provider(provider)


class TracedClaimCycle(ClaimCycle):
    """:class:`benchmarks.claim_cycle.ClaimCycle` in a process with tracing ``off`` or ``on``."""

    def __init__(self, tracing: str, **options: Any) -> None:
        if tracing == "on":
            install_sdk()
        super().__init__(**options)


def _cycle(url: str, tracing: str, tasks: int, threads: int, processes: int) -> dict[str, float]:
    databases.reset(url)
    databases.seed(url, 0, tasks)
    layout = run_layout(
        JOB,
        {"tracing": tracing, "impl": "ours", "url": url, "tasks": tasks},
        threads=threads,
        processes=processes,
    )
    done = len(layout.result.items)
    if done != tasks or len(set(layout.result.items)) != tasks:
        raise RuntimeError(f"{tracing}: {done} tasks done of {tasks}")
    claims = sorted(layout.result.calls["claim_available_tasks"])
    return {
        "tasks_per_s": done / layout.wall_s,
        "client_cpu_ms_per_task": layout.cpu_s / done * 1000,
        "claim_p50_ms": claims[len(claims) // 2] * 1000,
    }


_SPAN_COST = """
import time
from sayiir_persistence.telemetry.tracing import traced
import benchmarks.telemetry as bench

if {tracing!r} == "on":
    bench.install_sdk()

class Store:
    _db_system = "postgresql"

    def call(self, instance_id, task_id, worker_id):
        return None

store = Store()
if {tracing!r} != "bare":
    Store.call = traced("call")(Store.call)
for _ in range(2000):
    store.call("instance", "task", "worker")
best = float("inf")
for _ in range(7):
    started = time.process_time()
    for _ in range({calls}):
        store.call("instance", "task", "worker")
    best = min(best, (time.process_time() - started) / {calls})
print(best * 1e6)
"""


def span_cost_us(tracing: str, calls: int) -> float:
    """µs of CPU per call of a traced no-op method (best of 7 loops), in a fresh interpreter
    (CPU time, not wall time: the machine's other load does not count; the "on" SDK's
    export thread does, as it runs in the process)."""
    script = textwrap.dedent(_SPAN_COST.format(tracing=tracing, calls=calls))
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return float(output.strip())


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} [{min(values):.2f}..{max(values):.2f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.telemetry", description=__doc__)
    parser.add_argument(
        "--db", action="append", default=[], choices=("sqlite", "postgres", "mysql")
    )
    parser.add_argument("--url", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--span-calls", type=int, default=20000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"cycle": {}, "span_us": {}}
    for target in databases.resolve(args.db or ["sqlite"], args.url):
        databases.create_and_migrate(target.url)
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGURATIONS}
        for round_index in range(args.rounds):
            order = CONFIGURATIONS if round_index % 2 == 0 else CONFIGURATIONS[::-1]
            for tracing in order:
                rows[tracing].append(
                    _cycle(target.url, tracing, args.tasks, args.threads, args.processes)
                )
        print(
            f"{target.label}: claim cycle, {args.tasks} tasks, {args.threads} threads x "
            f"{args.processes} process(es), {args.rounds} rounds: median [min..max]"
        )
        for tracing in CONFIGURATIONS:
            rate = [row["tasks_per_s"] for row in rows[tracing]]
            cpu = [row["client_cpu_ms_per_task"] for row in rows[tracing]]
            claim = [row["claim_p50_ms"] for row in rows[tracing]]
            print(
                f"  tracing {tracing:3}: {_summary(rate)} tasks/s, {_summary(cpu)} client CPU "
                f"ms/task, claim p50 {_summary(claim)} ms"
            )
        median = {
            key: {t: statistics.median(r[key] for r in rows[t]) for t in CONFIGURATIONS}
            for key in ("tasks_per_s", "client_cpu_ms_per_task")
        }
        rate_ratio = median["tasks_per_s"]["on"] / median["tasks_per_s"]["off"]
        cpu_ratio = median["client_cpu_ms_per_task"]["on"] / median["client_cpu_ms_per_task"]["off"]
        print(f"  on/off: throughput x{rate_ratio:.3f}, client CPU per task x{cpu_ratio:.3f}")
        results["cycle"][target.label] = {
            "rows": rows,
            "rate_ratio": rate_ratio,
            "cpu_ratio": cpu_ratio,
        }
        if target.scratch is not None:
            shutil.rmtree(target.scratch, ignore_errors=True)
    for tracing in ("bare", "off", "on"):
        results["span_us"][tracing] = span_cost_us(tracing, args.span_calls)
    spans = results["span_us"]
    print(
        f"one call of a no-op method: bare {spans['bare']:.2f} µs, traced with tracing off "
        f"{spans['off']:.2f} µs (+{spans['off'] - spans['bare']:.2f}), on "
        f"{spans['on']:.2f} µs (+{spans['on'] - spans['bare']:.2f})"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
