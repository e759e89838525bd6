"""The results file (JSON), the tables printed at the end, and the chart (PNG).

``results["databases"][label]`` holds one list of rows per scenario; :func:`ratios` derives
the ours / ceiling table from the claim-cycle rows (best round of each implementation).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the claim-cycle table when the output is a file or a pipe.
console = Console(width=None if Console().is_terminal else 132)


def _ms(summary: dict[str, float]) -> str:
    return f"{summary['p50_ms']:.2f} / {summary['p99_ms']:.2f}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def best(rows: list[dict[str, Any]], impl: str, threads: int) -> dict[str, Any] | None:
    """The round with the highest throughput (the least disturbed by other load)."""
    mine = [row for row in rows if row["impl"] == impl and row["threads"] == threads]
    return max(mine, key=lambda row: row["tasks_per_s"]) if mine else None


def ratios(cycle_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for threads in sorted({row["threads"] for row in cycle_rows}):
        ours, ceiling = best(cycle_rows, "ours", threads), best(cycle_rows, "ceiling", threads)
        if ours is None or ceiling is None:
            continue
        # Also the median of the ratios of each round (ours and ceiling ran back to back).
        by_round: dict[int, dict[str, float]] = {}
        for row in cycle_rows:
            if row["threads"] == threads:
                by_round.setdefault(row["round"], {})[row["impl"]] = row["tasks_per_s"]
        paired = sorted(
            pair["ours"] / pair["ceiling"] for pair in by_round.values() if len(pair) == 2
        )
        out.append(
            {
                "threads": threads,
                "processes": ours["processes"],
                "ours_tasks_per_s": ours["tasks_per_s"],
                "ceiling_tasks_per_s": ceiling["tasks_per_s"],
                "ratio": ours["tasks_per_s"] / ceiling["tasks_per_s"],
                "ratio_median_of_rounds": statistics.median(paired) if paired else None,
                # Client CPU per task of the same (best) rounds; absent in older results.
                "ours_cpu_ms_per_task": ours.get("client_cpu_ms_per_task"),
                "ceiling_cpu_ms_per_task": ceiling.get("client_cpu_ms_per_task"),
            }
        )
    return out


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def print_tables(results: dict[str, Any]) -> None:
    dbs: dict[str, dict[str, Any]] = results["databases"]
    cycle = Table(title="Claim cycle: tasks/s, latency p50 / p99 ms (best round)")
    for name in ("db", "threads x procs", "impl", "tasks/s", "claim", "save_result", "release"):
        cycle.add_column(name, justify="right" if name not in ("db", "impl") else "left")
    ratio = Table(title="Ours / bare-driver ceiling (claim cycle throughput; target >= 0.8)")
    ratio_columns = (
        "db",
        "threads x procs",
        "ours tasks/s",
        "ceiling tasks/s",
        "ratio",
        "per round",
        "CPU ms/task ours / ceiling",
    )
    for name in ratio_columns:
        ratio.add_column(name, justify="left" if name == "db" else "right")
    contended = Table(title="Contended claim_task: every thread races for the same tasks")
    for name in ("db", "threads x procs", "attempts/s", "p50 / p99 ms", "wins", "duplicates"):
        contended.add_column(name, justify="left" if name == "db" else "right")
    scaling = Table(title="Scaling: p50 / p99 ms at N in-progress workflows (limit 10)")
    for name in ("db", "workflows", "claim_available_tasks", "find_available_tasks"):
        scaling.add_column(name, justify="left" if name == "db" else "right")
    payloads = Table(title="Payloads: p50 / p99 ms")
    for name in ("db", "output", "save_snapshot", "load_snapshot", "save_task_result"):
        payloads.add_column(name, justify="left" if name == "db" else "right")

    for db, scenarios in dbs.items():
        rows = scenarios.get("claim_cycle", []) + scenarios.get("ceiling", [])
        for threads in sorted({row["threads"] for row in rows}):
            for impl in ("ours", "ceiling"):
                row = best(rows, impl, threads)
                if row is None:
                    continue
                calls = row["calls"]
                cycle.add_row(
                    db,
                    f"{threads} x {row['processes']}",
                    impl,
                    f"{row['tasks_per_s']:.0f}",
                    _ms(calls["claim_available_tasks"]),
                    _ms(calls["save_task_result"]),
                    _ms(calls["release_task_claim"]),
                )
        for row in scenarios.get("ratios", []):
            ratio.add_row(
                db,
                f"{row['threads']} x {row['processes']}",
                f"{row['ours_tasks_per_s']:.0f}",
                f"{row['ceiling_tasks_per_s']:.0f}",
                f"{row['ratio']:.2f}",
                "-"
                if row["ratio_median_of_rounds"] is None
                else f"{row['ratio_median_of_rounds']:.2f}",
                f"{_cpu(row.get('ours_cpu_ms_per_task'))} / "
                f"{_cpu(row.get('ceiling_cpu_ms_per_task'))}",
            )
        for row in scenarios.get("contended", []):
            contended.add_row(
                db,
                f"{row['threads']} x {row['processes']}",
                f"{row['attempts_per_s']:.0f}",
                _ms(row["claim_task"]),
                str(row["wins"]),
                str(row["duplicates"]),
            )
        for row in scenarios.get("scaling", []):
            scaling.add_row(
                db,
                f"{row['workflows']:,}",
                _ms(row["claim_available_tasks"]),
                _ms(row["find_available_tasks"]),
            )
        for row in scenarios.get("payloads", []):
            payloads.add_row(
                db,
                _size(row["output_bytes"]),
                _ms(row["save_snapshot"]),
                _ms(row["load_snapshot"]),
                _ms(row["save_task_result"]),
            )
    for table in (cycle, ratio, contended, scaling, payloads):
        if table.row_count:
            console.print(table)


def _size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / 1024 / 1024:g} MB"
    return f"{size / 1024:g} KB" if size >= 1024 else f"{size} B"


def markdown(results: dict[str, Any]) -> str:
    """The headline tables as Markdown (what ``benchmarks/RESULTS.md`` quotes); a table
    without rows is left out."""
    dbs: dict[str, dict[str, Any]] = results["databases"]
    tables: list[list[str]] = []

    def table(header: str, rows: list[str]) -> None:
        if rows:
            columns = header.count("|") - 1
            align = "| --- |" + " ---: |" * (columns - 1)
            tables.append([header, align, *rows])

    table(
        "| Database | Threads x processes | Ours tasks/s | Bare driver tasks/s | Ours / ceiling "
        "| Client CPU ms/task, ours / bare driver |",
        [
            f"| {db} | {row['threads']} x {row['processes']} | {row['ours_tasks_per_s']:.0f}"
            f" | {row['ceiling_tasks_per_s']:.0f} | **{row['ratio']:.2f}** |"
            f" {_cpu(row.get('ours_cpu_ms_per_task'))} /"
            f" {_cpu(row.get('ceiling_cpu_ms_per_task'))} |"
            for db, scenarios in dbs.items()
            for row in scenarios.get("ratios", [])
        ],
    )
    latency_rows = []
    for db, scenarios in dbs.items():
        rows = scenarios.get("claim_cycle", []) + scenarios.get("ceiling", [])
        for threads in sorted({row["threads"] for row in rows}):
            for impl in ("ours", "ceiling"):
                row = best(rows, impl, threads)
                if row is not None:
                    calls = row["calls"]
                    latency_rows.append(
                        f"| {db} | {threads} x {row['processes']} | {impl}"
                        f" | {_ms(calls['claim_available_tasks'])}"
                        f" | {_ms(calls['save_task_result'])}"
                        f" | {_ms(calls['release_task_claim'])} |"
                    )
    table(
        "| Database | Threads x processes | Impl | claim_available_tasks p50 / p99 ms"
        " | save_task_result p50 / p99 ms | release_task_claim p50 / p99 ms |",
        latency_rows,
    )
    table(
        "| Database | Threads x processes | claim_task attempts/s | p50 / p99 ms | Wins"
        " | Duplicates |",
        [
            f"| {db} | {row['threads']} x {row['processes']} | {row['attempts_per_s']:.0f}"
            f" | {_ms(row['claim_task'])} | {row['wins']} | {row['duplicates']} |"
            for db, scenarios in dbs.items()
            for row in scenarios.get("contended", [])
        ],
    )
    table(
        "| Database | In-progress workflows | claim_available_tasks p50 / p99 ms"
        " | find_available_tasks p50 / p99 ms |",
        [
            f"| {db} | {row['workflows']:,} | {_ms(row['claim_available_tasks'])}"
            f" | {_ms(row['find_available_tasks'])} |"
            for db, scenarios in dbs.items()
            for row in scenarios.get("scaling", [])
        ],
    )
    table(
        "| Database | Output | save_snapshot p50 / p99 ms | load_snapshot p50 / p99 ms"
        " | save_task_result p50 / p99 ms |",
        [
            f"| {db} | {_size(row['output_bytes'])} | {_ms(row['save_snapshot'])}"
            f" | {_ms(row['load_snapshot'])} | {_ms(row['save_task_result'])} |"
            for db, scenarios in dbs.items()
            for row in scenarios.get("payloads", [])
        ],
    )
    return "\n\n".join("\n".join(lines) for lines in tables) + "\n"


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """Two panels: claim-cycle throughput by thread count (ours solid, ceiling dashed), and
    p50 of claim/find_available_tasks by table size. ``None`` when matplotlib is missing
    (``pip install -e '.[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"sqlite": "tab:green", "postgres": "tab:blue", "mysql": "tab:orange"}
    for index, (db, scenarios) in enumerate(results["databases"].items()):
        color = colors.get(db, f"C{index + 3}")
        rows = scenarios.get("ratios", [])
        if rows:
            threads = [row["threads"] for row in rows]
            left.plot(
                threads,
                [r["ours_tasks_per_s"] for r in rows],
                "o-",
                color=color,
                label=f"{db} ours",
            )
            left.plot(
                threads,
                [r["ceiling_tasks_per_s"] for r in rows],
                "s--",
                color=color,
                alpha=0.6,
                label=f"{db} bare driver",
            )
        scaling = scenarios.get("scaling", [])
        if scaling:
            sizes = [row["workflows"] for row in scaling]
            right.plot(
                sizes,
                [r["claim_available_tasks"]["p50_ms"] for r in scaling],
                "o-",
                color=color,
                label=f"{db} claim_available_tasks",
            )
            right.plot(
                sizes,
                [r["find_available_tasks"]["p50_ms"] for r in scaling],
                "^:",
                color=color,
                label=f"{db} find_available_tasks",
            )
    processes = results["meta"]["processes"]
    left.set(
        title=f"Claim cycle throughput ({processes} process(es))",
        xlabel="threads per process",
        ylabel="tasks/s (log)",
        xscale="log",
        yscale="log",
    )
    left.set_xticks(results["meta"]["threads"], [str(t) for t in results["meta"]["threads"]])
    right.set(
        title="p50 latency vs in-progress workflows (limit 10)",
        xlabel="in-progress workflows",
        ylabel="ms",
        xscale="log",
    )
    right.set_ylim(bottom=0)
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
    figure.suptitle(
        f"sayiir-persistence benchmarks ({results['meta']['cpus']} shared cores: "
        "read the ratios, not the figures)"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
