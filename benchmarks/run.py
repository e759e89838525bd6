"""``python -m benchmarks``: run the scenarios on each database, print tables, write JSON + PNG.

Scenarios (``--scenarios``, default all):

- ``claim_cycle``: W threads x P processes drain a backlog through the library;
- ``ceiling``: the same work, same layout, hand-written SQL on the bare DBAPI driver; run
  back to back with ``claim_cycle`` (order alternating by round), giving ours / ceiling;
- ``contended``: W x P workers race ``claim_task`` on the same tasks (duplicates must be 0);
- ``scaling``: p50/p99 of claim/find_available_tasks at growing numbers of workflows;
- ``payloads``: save_snapshot / load_snapshot / save_task_result with large outputs.

Timings on a shared machine are noisy: compare ratios within one run, not figures between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy

from sayiir_persistence.sql.schema import ready_tasks

from . import claim_cycle, contended, databases, payloads, report, scaling
from .databases import Target
from .timing import run_layout, summarize

SCENARIOS = ("claim_cycle", "ceiling", "contended", "scaling", "payloads")
RESULTS_DIR = Path(__file__).parent / "results"
FULL = {
    "threads": "1,4,16",
    "tasks": 2000,
    "rounds": 2,
    "contended_tasks": 300,
    "sizes": "1000,10000,100000",
    "calls": 100,
    "payload_sizes": "1024,102400,5242880",
    "repetitions": 20,
}
QUICK = {
    "threads": "1,4",
    "tasks": 120,
    "rounds": 1,
    "contended_tasks": 40,
    "sizes": "200,1000",
    "calls": 10,
    "payload_sizes": "1024,102400",
    "repetitions": 3,
}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="sayiir-persistence benchmarks: ours vs the bare driver, scaling, payloads.",
    )
    parser.add_argument(
        "--db",
        action="append",
        choices=("sqlite", "postgres", "mysql"),
        default=[],
        help="a database to measure (repeatable): sqlite (a temporary file), or the "
        f"'{databases.BENCH_DATABASE}' database on the local PostgreSQL / MariaDB "
        "(created if missing; SAYIIR_BENCH_POSTGRES_URL / SAYIIR_BENCH_MYSQL_URL override)",
    )
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        help="another database URL (repeatable). Its sayiir_* tables are EMPTIED: use a scratch "
        "database",
    )
    parser.add_argument("--threads", help=f"thread counts per process (default {FULL['threads']})")
    parser.add_argument("--processes", type=int, default=1, help="processes per layout (default 1)")
    parser.add_argument("--tasks", type=int, help=f"claim-cycle backlog (default {FULL['tasks']})")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"claim-cycle rounds of ours + ceiling, the best counts (default {FULL['rounds']})",
    )
    parser.add_argument(
        "--contended-tasks", type=int, help=f"tasks raced for (default {FULL['contended_tasks']})"
    )
    parser.add_argument("--sizes", help=f"scaling: in-progress workflows (default {FULL['sizes']})")
    parser.add_argument(
        "--postgres-sizes",
        help="scaling sizes on PostgreSQL only (default: --sizes), e.g. to add 1000000",
    )
    parser.add_argument(
        "--calls", type=int, help=f"scaling: timed calls per size ({FULL['calls']})"
    )
    parser.add_argument(
        "--payload-sizes", help=f"payloads: output sizes in bytes ({FULL['payload_sizes']})"
    )
    parser.add_argument(
        "--repetitions", type=int, help=f"payloads: repetitions per size ({FULL['repetitions']})"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma list among {', '.join(SCENARIOS)} (default all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--output",
        type=Path,
        help="folder of results.json, results.md (tables) and scaling.png (default "
        "benchmarks/results; with --quick a temporary folder, so a smoke run never overwrites "
        "the committed results)",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: print the tables and redraw the chart of an earlier results.json "
        "(into its folder)",
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = (
            Path(tempfile.gettempdir()) / "sayiir-bench-quick" if args.quick else RESULTS_DIR
        )
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.threads = _ints(args.threads)
    args.sizes = _ints(args.sizes)
    args.postgres_sizes = _ints(args.postgres_sizes) if args.postgres_sizes else args.sizes
    args.payload_sizes = _ints(args.payload_sizes)
    args.scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if not args.db and not args.url:
        args.db = ["sqlite"]
    return args


def log(message: str) -> None:
    print(message, flush=True)


def claim_cycles(target: Target, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Ours and the ceiling back to back for each thread count, order alternating by round."""
    impls = [
        impl
        for impl, name in (("ours", "claim_cycle"), ("ceiling", "ceiling"))
        if name in args.scenarios
    ]
    rows: dict[str, list[dict[str, Any]]] = {"claim_cycle": [], "ceiling": []}
    for threads in args.threads:
        for round_index in range(args.rounds):
            for impl in impls if round_index % 2 == 0 else impls[::-1]:
                databases.reset(target.url)
                databases.seed(target.url, 0, args.tasks)
                layout = run_layout(
                    claim_cycle.JOB,
                    {"impl": impl, "url": target.url, "tasks": args.tasks},
                    threads=threads,
                    processes=args.processes,
                )
                done = layout.result.items
                left = databases.count(target.url, ready_tasks)
                row = {
                    "impl": impl,
                    "round": round_index,
                    "threads": threads,
                    "processes": args.processes,
                    "tasks": args.tasks,
                    "completed": len(done),
                    "duplicates": len(done) - len(set(done)),
                    "drained": left == 0 and len(set(done)) == args.tasks,
                    "wall_s": layout.wall_s,
                    "tasks_per_s": len(done) / layout.wall_s,
                    "client_cpu_ms_per_task": layout.cpu_s / max(1, len(done)) * 1000,
                    "empty_claims": layout.result.counters.get("empty_claims", 0),
                    "calls": {
                        name: summarize(durations)
                        for name, durations in sorted(layout.result.calls.items())
                    },
                }
                rows["claim_cycle" if impl == "ours" else "ceiling"].append(row)
                log(
                    f"  claim cycle {impl:7} {threads:2d} x {args.processes} threads: "
                    f"{row['tasks_per_s']:7.0f} tasks/s, duplicates {row['duplicates']}, "
                    f"drained {row['drained']}"
                )
    return rows


def contended_claims(target: Target, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for threads in args.threads:
        databases.reset(target.url)
        databases.seed(target.url, 0, args.contended_tasks)
        layout = run_layout(
            contended.JOB,
            {"url": target.url, "tasks": args.contended_tasks},
            threads=threads,
            processes=args.processes,
        )
        attempts = layout.result.counters["attempts"]
        row = {
            "threads": threads,
            "processes": args.processes,
            "tasks": args.contended_tasks,
            "attempts": attempts,
            "attempts_per_s": attempts / layout.wall_s,
            "wall_s": layout.wall_s,
            "claim_task": summarize(layout.result.calls["claim_task"]),
            **contended.summarize_wins(layout.result.items, args.contended_tasks),
        }
        rows.append(row)
        log(
            f"  contended {threads:2d} x {args.processes}: {row['attempts_per_s']:.0f} attempts/s,"
            f" duplicates {row['duplicates']}, unclaimed {row['unclaimed']}"
        )
    return rows


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    log(
        f"== {target.label}: {sqlalchemy.make_url(target.url).render_as_string(hide_password=True)}"
    )
    databases.create_and_migrate(target.url)
    out: dict[str, Any] = {
        "url": sqlalchemy.make_url(target.url).render_as_string(hide_password=True)
    }
    started = time.perf_counter()
    if {"claim_cycle", "ceiling"} & set(args.scenarios):
        cycles = claim_cycles(target, args)
        for name in ("claim_cycle", "ceiling"):
            if name in args.scenarios:
                out[name] = cycles[name]
        out["ratios"] = report.ratios(cycles["claim_cycle"] + cycles["ceiling"])
    if "contended" in args.scenarios:
        out["contended"] = contended_claims(target, args)
    if "scaling" in args.scenarios:
        sizes = args.postgres_sizes if target.backend_name == "postgresql" else args.sizes
        out["scaling"] = scaling.run(target.url, sizes, args.calls, log=log)
    if "payloads" in args.scenarios:
        out["payloads"] = payloads.run(target.url, args.payload_sizes, args.repetitions)
    databases.reset(target.url)
    out["elapsed_s"] = time.perf_counter() - started
    log(f"   {target.label} done in {out['elapsed_s']:.0f} s")
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _library() -> dict[str, Any]:
    """Which sayiir_persistence is measured, and whether its sources differ from the commit."""
    import sayiir_persistence

    package = Path(sayiir_persistence.__file__).parent
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            cwd=package,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        status = None
    return {"path": str(package), "uncommitted_changes": None if status is None else bool(status)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        earlier: dict[str, Any] = json.loads(args.replot.read_text())
        report.print_tables(earlier)
        (args.replot.parent / "results.md").write_text(report.markdown(earlier))
        log(f"chart: {report.chart(earlier, args.replot.parent / 'scaling.png')}")
        return 0
    targets = databases.resolve(args.db, args.url)
    results: dict[str, Any] = {
        "meta": {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(
                ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
            ),
            "commit": _commit(),
            "library": _library(),
            "python": platform.python_version(),
            "sqlalchemy": sqlalchemy.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "quick": args.quick,
            "threads": args.threads,
            "processes": args.processes,
            "tasks": args.tasks,
            "rounds": args.rounds,
            "scenarios": args.scenarios,
            "note": "shared, noisy machine: compare ratios within this run, not absolute figures",
        },
        "databases": {},
    }
    for target in targets:
        try:
            results["databases"][target.label] = measure(target, args)
        finally:
            if target.scratch is not None:
                shutil.rmtree(target.scratch, ignore_errors=True)
    json_path = args.output / "results.json"
    report.write_json(results, json_path)
    (args.output / "results.md").write_text(report.markdown(results))
    report.print_tables(results)
    log(f"results: {json_path}")
    if not args.no_chart:
        chart = report.chart(results, args.output / "scaling.png")
        log(
            f"chart: {chart}"
            if chart
            else "chart: skipped (matplotlib missing: pip install -e '.[bench]')"
        )
    return 0
