"""``python -m benchmarks.peers``: our reference Worker against Procrastinate, DBOS Transact and
sayiir 1.0.0 on the same workloads, the same machine, in alternating rounds.

Workloads (every contender the same, 8 concurrent executions, task bodies that return a few
bytes): ``one``, N one-task workflows saved first, then drained; ``chain``, M three-task chains
(each task's output the next one's input) drained the same way; ``latency``, L chains started
one at a time while the workers already run idle (PostgreSQL only). Each round runs every
contender once per workload, in an order rotated by round. See ``benchmarks/peers/runs.py``
for what is timed and counted, ``contenders.py`` for how each contender is configured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy

from ..report import write_json
from ..run import _commit, _library
from . import report, runs, targets
from .contenders import CONCURRENCY, CONTENDERS, DEFAULT_CONTENDERS, Contender

FULL = {"workflows": 1500, "chains": 500, "latency_chains": 50, "rounds": 3}
QUICK = {"workflows": 40, "chains": 15, "latency_chains": 5, "rounds": 1}
PACKAGES = ("sqlalchemy", "psycopg2-binary", "psycopg", "psycopg-binary", "psycopg-pool")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description="Our reference Worker vs Procrastinate, DBOS Transact and sayiir 1.0.0: "
        "workflows/s, client CPU and PostgreSQL commits per workflow, chain latency.",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma list among {', '.join(CONTENDERS)} (default {','.join(DEFAULT_CONTENDERS)});"
        " one that is not installed is skipped",
    )
    parser.add_argument(
        "--db",
        default="postgres,sqlite",
        help="comma list among postgres, sqlite (default both). PostgreSQL: the database "
        f"'{targets.BENCH_DATABASE}' on 127.0.0.1:5432, DROPPED and created again for every "
        f"run ({targets.URL_ENV} overrides the URL)",
    )
    parser.add_argument("--workflows", type=int, help=f"one-task workflows (N={FULL['workflows']})")
    parser.add_argument("--chains", type=int, help=f"three-task chains (M={FULL['chains']})")
    parser.add_argument(
        "--latency-chains",
        type=int,
        help=f"chains started one at a time for the latency (L={FULL['latency_chains']}; 0: skip)",
    )
    parser.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']})")
    parser.add_argument(
        "--workloads",
        default="one,chain,latency",
        help="comma list among one, chain, latency (default all)",
    )
    parser.add_argument(
        "--ours-options",
        type=json.loads,
        default={},
        help="JSON object of extra Worker keyword arguments for our contenders, '_ms' suffixed "
        """ones in milliseconds, e.g. '{"claim_batch_wait_ms": 2}'""",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument(
        "--output",
        type=Path,
        help="folder for results.md, results.json and peers.png (e.g. benchmarks/results/peers); "
        "without it the tables are only printed",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw peers.png")
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: derive the tables and chart of an earlier results.json again "
        "(into its folder)",
    )
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    args.db = [name.strip() for name in args.db.split(",") if name.strip()]
    if set(args.db) - {"postgres", "sqlite"}:
        parser.error("--db takes postgres and/or sqlite")
    args.workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    if set(args.workloads) - {"one", "chain", "latency"}:
        parser.error("--workloads takes one, chain and/or latency")
    return args


def log(message: str) -> None:
    print(message, flush=True)


def available(args: argparse.Namespace) -> list[Contender]:
    chosen = []
    for name in args.contenders:
        contender = CONTENDERS[name]
        why = contender.missing()
        if why is not None:
            log(f"skipping {name}: {why}")
            continue
        if contender.family == "ours" and args.ours_options:
            contender = Contender(
                contender.name,
                contender.family,
                contender.distribution,
                contender.databases,
                f"{contender.settings}; plus {args.ours_options}",
                {**contender.options, **args.ours_options},
            )
        chosen.append(contender)
    return chosen


def meta(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in (*PACKAGES, "procrastinate", "dbos", "sayiir"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.peers", *(argv if argv is not None else sys.argv[1:])]
        ),
        "commit": _commit(),
        "library": _library(),
        "python": platform.python_version(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "versions": versions,
        "postgres_server": targets.server_version() if "postgres" in args.db else None,
        "sqlite_library": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "concurrency": CONCURRENCY,
        "sizes": {
            "one": args.workflows,
            "chain": args.chains,
            "latency": args.latency_chains,
        },
        "rounds": args.rounds,
        "probe_interval_s": runs.PROBE_S,
        "latency_idle_s": runs.IDLE_S,
        "latency_pause_s": runs.PAUSE_S,
        "quick": args.quick,
        "note": "shared 2-core machine, database servers included: read medians, ranges and "
        "the per-round ratios, not single figures",
    }


def baselines(contenders: list[Contender], args: argparse.Namespace) -> dict[str, Any]:
    """PostgreSQL counters of a run with no workflow: a worker that starts, finds nothing and
    stops (its start-up, shut-down and idle polls); subtracted from every run's counters."""
    out: dict[str, Any] = {}
    for contender in contenders:
        if "postgres" not in contender.databases:
            continue
        for kind in ("one", "chain"):
            if kind not in args.workloads:
                continue
            row = runs.throughput(contender, "postgres", kind, 0)
            out[f"{contender.name}/{kind}"] = row["run_counters"]
            log(f"  baseline {contender.name:14} {kind:6} {row['run_counters']}")
    return out


def one_run(contender: Contender, db: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "latency":
        return runs.latency(contender, db, args.latency_chains)
    return runs.throughput(contender, db, kind, args.workflows if kind == "one" else args.chains)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        earlier: dict[str, Any] = json.loads(args.replot.read_text())
        report.derive(earlier)
        text = report.markdown(earlier)
        print(text)
        write_json(earlier, args.replot)
        (args.replot.parent / "results.md").write_text(text)
        log(f"chart: {report.chart(earlier, args.replot.parent / 'peers.png')}")
        return 0
    contenders = available(args)
    if not contenders:
        log("no contender to run")
        return 1
    results: dict[str, Any] = {
        "meta": meta(args, argv),
        "contenders": {
            c.name: {
                "settings": c.settings,
                "version": c.version(),
                "databases": list(c.databases),
                "options": c.options,
            }
            for c in contenders
        },
        "runs": [],
    }
    started = time.perf_counter()
    if "postgres" in args.db:
        log("== baselines (PostgreSQL, no workflow)")
        results["baselines"] = baselines(contenders, args)
    for round_index in range(args.rounds):
        for db in args.db:
            here = [c for c in contenders if db in c.databases]
            shift = round_index % max(1, len(here))
            order = here[shift:] + here[:shift]
            for kind in args.workloads:
                if kind == "latency" and (db != "postgres" or args.latency_chains <= 0):
                    continue
                for contender in order:
                    log(f"== round {round_index + 1}/{args.rounds} {db} {kind} {contender.name}")
                    try:
                        row = one_run(contender, db, kind, args)
                    except Exception as error:  # one failed run must not lose the others
                        row = {"contender": contender.name, "db": db, "kind": kind}
                        row["error"] = f"{type(error).__name__}: {error}"
                    row["round"] = round_index
                    results["runs"].append(row)
                    log("   " + report.one_line(row))
    results["meta"]["load_average_after"] = os.getloadavg()
    results["meta"]["elapsed_s"] = time.perf_counter() - started
    report.derive(results)
    text = report.markdown(results)
    print(text)
    if args.output is not None:
        write_json(results, args.output / "results.json")
        (args.output / "results.md").write_text(text)
        log(f"results: {args.output / 'results.json'}")
        if not args.no_chart:
            chart = report.chart(results, args.output / "peers.png")
            log(f"chart: {chart}" if chart else "chart: skipped (matplotlib missing)")
    return 0
