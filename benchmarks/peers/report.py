"""Per-workflow figures, medians and ranges over the rounds, ours / peer ratios, the Markdown
tables and the chart of ``python -m benchmarks.peers``.

``derive`` adds to every throughput run on PostgreSQL: commits per workflow while the workers
ran (``xact_commit`` minus that of the contender's no-workflow baseline run, divided by N),
commits per workflow to start the workflows (the ``enqueue`` child: one start call per
workflow, plus the few transactions of its own start-up), and rows written per workflow (the
database's ``tup_inserted + tup_updated + tup_deleted``, minus the baseline's). Then
``summary`` (median, min, max of each metric over the rounds) and ``ratios`` (ours / peer,
computed within each round, where both ran back to back, then median, min, max).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

THROUGHPUT_METRICS = (
    ("workflows_per_s", "workflows/s", 0),
    ("cpu_ms_per_workflow", "client CPU ms/workflow", 2),
    ("commits_per_workflow", "commits/workflow (run)", 2),
    ("start_commits_per_workflow", "commits/workflow (start)", 2),
    ("rows_per_workflow", "rows written/workflow", 1),
)
LATENCY_METRICS = (("p50_ms", "p50 ms", 1), ("p99_ms", "p99 ms", 1))
RATIO_METRICS = (
    ("workflows_per_s", "workflows/s"),
    ("cpu_ms_per_workflow", "CPU/workflow"),
    ("commits_per_workflow", "commits/workflow (run)"),
    ("p50_ms", "p50 latency"),
)
KIND_TITLES = {"one": "one-task workflows", "chain": "3-task chains", "latency": "latency"}
REFERENCE = ("ours", "ours-defaults")


def _rows(counters: dict[str, int]) -> int:
    return counters["tup_inserted"] + counters["tup_updated"] + counters["tup_deleted"]


def derive(results: dict[str, Any]) -> None:
    baselines: dict[str, dict[str, int]] = results.get("baselines", {})
    for row in results["runs"]:
        if "error" in row:
            continue
        if row["kind"] == "latency":
            row["p50_ms"] = row["latency"]["p50_ms"]
            row["p99_ms"] = row["latency"]["p99_ms"]
            continue
        count = row["workflows"]
        run, start = row.get("run_counters"), row.get("start_counters")
        if not run or not count:
            continue
        base = baselines.get(f"{row['contender']}/{row['kind']}")
        if base:
            row["commits_per_workflow"] = (run["xact_commit"] - base["xact_commit"]) / count
            row["rollbacks_per_workflow"] = (run["xact_rollback"] - base["xact_rollback"]) / count
            row["rows_per_workflow"] = (_rows(run) - _rows(base)) / count
        if start:
            row["start_commits_per_workflow"] = start["xact_commit"] / count
    results["summary"] = summary(results["runs"])
    results["ratios"] = ratios(results["runs"])


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = [name for name, _, _ in THROUGHPUT_METRICS + LATENCY_METRICS]
    for row in rows:
        if "error" in row:
            continue
        slot = out.setdefault(row["db"], {}).setdefault(row["kind"], {})
        metrics = slot.setdefault(row["contender"], {})
        for name in names:
            if row.get(name) is not None:
                metrics.setdefault(name, []).append(row[name])
    for kinds in out.values():
        for contenders in kinds.values():
            for name, metrics in contenders.items():
                contenders[name] = {metric: _spread(v) for metric, v in metrics.items()}
    return out


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """ours / peer of each metric, per round (both ran in it), then median and range."""
    by_key: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if "error" not in row:
            by_key.setdefault((row["db"], row["kind"], row["round"]), {})[row["contender"]] = row
    paired: dict[str, Any] = {}
    order = {kind: index for index, kind in enumerate(KIND_TITLES)}
    for (db, kind, _), contenders in sorted(by_key.items(), key=lambda item: order[item[0][1]]):
        reference = next((contenders[name] for name in REFERENCE if name in contenders), None)
        if reference is None:
            continue
        for name, peer in contenders.items():
            if name in REFERENCE:
                continue
            slot = paired.setdefault(db, {}).setdefault(kind, {}).setdefault(name, {})
            for metric, _ in RATIO_METRICS:
                ours_value, peer_value = reference.get(metric), peer.get(metric)
                if ours_value is not None and peer_value:
                    slot.setdefault(metric, []).append(ours_value / peer_value)
    for kinds in paired.values():
        for peers in kinds.values():
            for name, metrics in peers.items():
                peers[name] = {metric: _spread(values) for metric, values in metrics.items()}
    return paired


def _cell(spread: dict[str, float] | None, decimals: int) -> str:
    if spread is None:
        return "-"
    if spread["n"] == 1:
        return f"{spread['median']:.{decimals}f}"
    return (
        f"{spread['median']:.{decimals}f} "
        f"({spread['min']:.{decimals}f}-{spread['max']:.{decimals}f})"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- " * 3 + "| ---: " * (len(header) - 3) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    rounds = meta["rounds"]
    parts = [
        f"Median (min-max) of {rounds} round(s); {meta['concurrency']} concurrent executions; "
        f"N={meta['sizes']['one']} one-task workflows, M={meta['sizes']['chain']} chains, "
        f"L={meta['sizes']['latency']} latency chains; {meta['cpus']} cores, load average "
        f"{meta['load_average_before'][0]:.2f} before, {meta['load_average_after'][0]:.2f} after."
    ]
    rows = []
    for db, kinds in results["summary"].items():
        for kind, contenders in kinds.items():
            if kind == "latency":
                continue
            for name, metrics in contenders.items():
                rows.append(
                    [db, KIND_TITLES[kind], name]
                    + [_cell(metrics.get(metric), d) for metric, _, d in THROUGHPUT_METRICS]
                )
    if rows:
        parts.append(
            "### Throughput (backlog drained)\n\n"
            + _table(
                ["Database", "Workload", "Contender"] + [t for _, t, _ in THROUGHPUT_METRICS], rows
            )
        )
    rows = [
        [db, "3-task chain", name]
        + [_cell(metrics.get(metric), d) for metric, _, d in LATENCY_METRICS]
        for db, kinds in results["summary"].items()
        for name, metrics in kinds.get("latency", {}).items()
    ]
    if rows:
        parts.append(
            "### Latency (chain started while the workers idle, start to completion)\n\n"
            + _table(
                ["Database", "Workload", "Contender"] + [t for _, t, _ in LATENCY_METRICS], rows
            )
        )
    rows = [
        [db, KIND_TITLES[kind], peer]
        + [_cell(metrics.get(metric), 2) for metric, _ in RATIO_METRICS]
        for db, kinds in results["ratios"].items()
        for kind, peers in kinds.items()
        for peer, metrics in peers.items()
    ]
    if rows:
        parts.append(
            "### Ours / peer, per round (workflows/s: > 1 is ours faster; CPU, commits, "
            "latency: < 1 is ours cheaper / faster)\n\n"
            + _table(["Database", "Workload", "Peer"] + [t for _, t in RATIO_METRICS], rows)
        )
    failed = [row for row in results["runs"] if "error" in row]
    if failed:
        parts.append(
            "### Failed runs\n\n"
            + "\n".join(
                f"- round {row['round'] + 1} {row['db']} {row['kind']} {row['contender']}: "
                f"{row['error'].splitlines()[0]}"
                for row in failed
            )
        )
    parts.append(
        "### Contenders\n\n"
        + "\n".join(
            f"- **{name}** {info['version'] or '(this tree)'}: {info['settings']}"
            for name, info in results["contenders"].items()
        )
    )
    return "\n\n".join(parts) + "\n"


def one_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"FAILED: {row['error'].splitlines()[0]}"
    if row["kind"] == "latency":
        latency = row["latency"]
        return (
            f"{row['completed']}/{row['workflows']} chains, p50 {latency['p50_ms']:.1f} ms, "
            f"p99 {latency['p99_ms']:.1f} ms"
        )
    commits = row.get("run_counters", {}).get("xact_commit")
    return (
        f"{row['workflows_per_s']:.0f} workflows/s, CPU {row['cpu_ms_per_workflow']:.2f} ms/wf, "
        f"start-up {row['startup_s']:.2f} s, commits {commits}, load {row['load_before']:.1f}"
    )


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """Bars of median workflows/s per workload and contender (whiskers: min-max), and of the
    p50 / p99 latency. ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = [
        (db, kind, contenders)
        for db, kinds in results["summary"].items()
        for kind, contenders in kinds.items()
        if kind != "latency"
    ]
    latency = [
        (db, kinds["latency"]) for db, kinds in results["summary"].items() if "latency" in kinds
    ]
    names = list(results["contenders"])
    colors = {name: f"C{index}" for index, name in enumerate(names)}
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(1, len(names))
    for panel, data, metric, title in (
        (axes[0], groups, "workflows_per_s", "workflows/s (median, whiskers min-max)"),
        (axes[1], [(db, "latency", c) for db, c in latency], "p50_ms", "chain p50 ms (log)"),
    ):
        for index, name in enumerate(names):
            xs, ys, low, high = [], [], [], []
            for position, (_, _, contenders) in enumerate(data):
                spread = contenders.get(name, {}).get(metric)
                if spread:
                    xs.append(position + (index - (len(names) - 1) / 2) * width)
                    ys.append(spread["median"])
                    low.append(spread["median"] - spread["min"])
                    high.append(spread["max"] - spread["median"])
            if xs:
                panel.bar(xs, ys, width, yerr=[low, high], color=colors[name], label=name)
        panel.set_xticks(
            range(len(data)), [f"{db}\n{KIND_TITLES[kind]}" for db, kind, _ in data], fontsize=8
        )
        panel.set_title(title, fontsize=10)
        if metric == "p50_ms":
            panel.set_yscale("log")
        panel.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(
        f"Ours vs peers, {results['meta']['concurrency']} concurrent executions "
        f"({results['meta']['cpus']} shared cores: read the ratios)",
        fontsize=11,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
