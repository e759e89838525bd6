"""``stats``: the figures of ``store_stats`` as ``rich`` tables, as JSON, and as the
Prometheus text exposition format (through ``prometheus-client``, the ``prometheus`` extra).

The JSON object (``stats --json``; one per line with ``--watch``)::

    {
      "taken_at": "2026-11-30T19:40:00.123456+00:00",   # the store clock (UTC)
      "workflows": {"in_progress": 12, "completed": 340, "failed": 1, ...},  # every status
      "runnable": {
        "total": 7,
        "by_priority": [
          {"priority": 1, "count": 2, "oldest_waiting_since": "...", "oldest_wait_seconds": 3.2}
        ]
      },
      "claims": {
        "live": 4, "expired": 1,
        "by_worker": [{"worker_id": "host-1:123", "live": 4, "expired": 1}]
      },
      "retry_waits": 1,
      "completed": {"last_minute": 20, "last_hour": 1100}
    }
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..stats import StoreStats
from .arguments import UNIT_SECONDS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "PROMETHEUS_MISSING",
    "prometheus_available",
    "stats_json",
    "stats_prometheus",
    "stats_renderable",
]

PROMETHEUS_MISSING = (
    "--prometheus needs prometheus-client: pip install 'sayiir-persistence[prometheus]'"
)


# -- JSON ----------------------------------------------------------------------------------


def stats_json(stats: StoreStats) -> dict[str, Any]:
    """The ``--json`` object (its shape: this module's docstring)."""
    return {
        "taken_at": _iso(stats.taken_at),
        "workflows": {status.value: count for status, count in stats.workflows.items()},
        "runnable": {
            "total": stats.runnable_total,
            "by_priority": [
                {
                    "priority": backlog.priority,
                    "count": backlog.count,
                    "oldest_waiting_since": _iso(backlog.oldest_waiting_since),
                    "oldest_wait_seconds": stats.oldest_wait(backlog).total_seconds(),
                }
                for backlog in stats.runnable
            ],
        },
        "claims": {
            "live": sum(claims.live for claims in stats.claims),
            "expired": sum(claims.expired for claims in stats.claims),
            "by_worker": [
                {"worker_id": claims.worker_id, "live": claims.live, "expired": claims.expired}
                for claims in stats.claims
            ],
        },
        "retry_waits": stats.retry_waits,
        "completed": {
            "last_minute": stats.completed_last_minute,
            "last_hour": stats.completed_last_hour,
        },
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


# -- tables --------------------------------------------------------------------------------


def stats_renderable(stats: StoreStats) -> Group:
    """The tables of ``stats``: workflows, runnable tasks, claims, completions."""
    taken_at = stats.taken_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    header = Text(f"Store at {taken_at} UTC (database clock)", style="bold")

    workflows = _table("Workflows", "Status", "Count")
    for status, count in stats.workflows.items():
        workflows.add_row(status.value, str(count))
    workflows.add_section()
    workflows.add_row("total", str(sum(stats.workflows.values())))

    runnable = _table("Runnable tasks", "Priority", "Tasks", "Oldest waiting")
    for backlog in stats.runnable:
        runnable.add_row(
            str(backlog.priority), str(backlog.count), _age(stats.oldest_wait(backlog))
        )
    runnable.add_section()
    runnable.add_row("total", str(stats.runnable_total), "")

    claims = _table("Claims", "Worker", "Live", "Expired")
    for worker in stats.claims:
        expired = Text(str(worker.expired), style="yellow" if worker.expired else "")
        claims.add_row(Text(worker.worker_id), str(worker.live), expired)
    if not stats.claims:
        claims.add_row(Text("(none)", style="dim"), "0", "0")
    claims.add_section()
    claims.add_row("retry waits", str(stats.retry_waits), "")

    completed = _table("Completed tasks", "Window", "Tasks")
    completed.add_row("last minute", str(stats.completed_last_minute))
    completed.add_row("last hour", str(stats.completed_last_hour))
    return Group(header, workflows, runnable, claims, completed)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", overflow="fold")
    return table


def _age(waited: timedelta) -> str:
    """``42s``, ``3m12s``, ``2h5m``: the two largest units."""
    seconds = int(waited.total_seconds())
    parts: list[str] = []
    for unit, size in UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count or (unit == "s" and not parts):
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])


# -- Prometheus ----------------------------------------------------------------------------


def prometheus_available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def stats_prometheus(stats: StoreStats) -> str:
    """The figures in the Prometheus text exposition format (``prometheus-client`` renders
    it: a collector of the figures on a registry of its own).

    Raises:
        ImportError: ``prometheus-client`` is not installed (check
            :func:`prometheus_available` first).
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))
    return generate_latest(registry).decode("utf-8")


class _StatsCollector:
    """A ``prometheus-client`` custom collector yielding the figures of one ``StoreStats``."""

    def __init__(self, stats: StoreStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        stats = self._stats
        workflows = GaugeMetricFamily("sayiir_workflows", "Workflows by status.", labels=["status"])
        for status, count in stats.workflows.items():
            workflows.add_metric([status.value], count)
        yield workflows

        runnable = GaugeMetricFamily(
            "sayiir_runnable_tasks",
            "Tasks a worker would be handed now, by priority.",
            labels=["priority"],
        )
        oldest = GaugeMetricFamily(
            "sayiir_oldest_runnable_age_seconds",
            "How long the oldest runnable task of each priority has waited.",
            labels=["priority"],
        )
        for backlog in stats.runnable:
            runnable.add_metric([str(backlog.priority)], backlog.count)
            oldest.add_metric([str(backlog.priority)], stats.oldest_wait(backlog).total_seconds())
        yield runnable
        yield oldest

        claims = GaugeMetricFamily(
            "sayiir_claims",
            "Unreleased task claims by worker, live or expired (not yet taken over).",
            labels=["worker_id", "state"],
        )
        for worker in stats.claims:
            claims.add_metric([worker.worker_id, "live"], worker.live)
            claims.add_metric([worker.worker_id, "expired"], worker.expired)
        yield claims

        yield GaugeMetricFamily(
            "sayiir_retry_waits",
            "Failed attempts waiting for their retry.",
            value=stats.retry_waits,
        )
        yield GaugeMetricFamily(
            "sayiir_tasks_completed_last_minute",
            "Task results recorded in the last 60 s of the database clock.",
            value=stats.completed_last_minute,
        )
        yield GaugeMetricFamily(
            "sayiir_tasks_completed_last_hour",
            "Task results recorded in the last 3600 s of the database clock.",
            value=stats.completed_last_hour,
        )
        yield GaugeMetricFamily(
            "sayiir_stats_taken_at_seconds",
            "When these figures were read, by the database clock (Unix time).",
            value=stats.taken_at.timestamp(),
        )
