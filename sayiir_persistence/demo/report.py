"""What a demo run did (:class:`DemoReport`), and the summary table printed at its end."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from ..cli.render import record_table


@dataclass(frozen=True)
class Kill:
    """One worker process killed with ``SIGKILL``, and the replacement started for it."""

    worker_id: str
    pid: int
    abandoned: int
    """Tasks it was running whose result was not stored: left for others to take over."""
    replacement: str


@dataclass
class DemoReport:
    """What a demo run did and whether it verified.

    ``ok`` is true when every instance completed, no task's result was recorded twice, the
    stored results form consistent chains, every task abandoned by the killed worker was
    taken over, and the surviving workers shut down cleanly.
    """

    url: str
    """The database, password masked."""
    run_id: str
    """Part of every instance id of this run: ``order-<run_id>-<n>``."""
    instances: int
    completed: int = 0
    results: int = 0
    """Task results stored (4 per completed order)."""
    executions: int = 0
    """Task function runs, re-runs included."""
    takeovers: int = 0
    """Executions under a claim taken anew (fencing token above 1)."""
    abandoned: int = 0
    """Executions the killed worker had started and never finished."""
    taken_over: int = 0
    """Of those, tasks whose result was then recorded by another worker."""
    retried: int = 0
    """Executions that raised and were given another attempt (``--flaky``)."""
    refused: int = 0
    """Executions whose claim was lost, so the store refused (or was never asked for) their
    result."""
    duplicate_results: int = 0
    """Tasks with more than one result accepted by the store. Must be 0."""
    lineage_errors: int = 0
    """Stored results that disagree with what the next task consumed. Must be 0."""
    kills: list[Kill] = field(default_factory=list)
    """The workers killed, in order. Usually one; another is killed only when a kill hit a
    worker just after it had saved every task it was running (nothing to take over)."""
    worker_exit_codes: dict[str, int | None] = field(default_factory=dict)
    processing_seconds: float = 0.0
    """From the first worker's start to the last order's completion."""
    wall_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def print_summary(report: DemoReport, console: Console) -> None:
    table = record_table("Demo summary")
    table.add_column("what", no_wrap=True)
    table.add_column("value", justify="right")

    def checked(value: object, good: bool) -> str:
        return f"{value} [green]ok[/]" if good else f"{value} [bold red]FAILED[/]"

    table.add_row("Orders", str(report.instances))
    table.add_row("Completed", checked(report.completed, report.completed == report.instances))
    table.add_row("Task results recorded", str(report.results))
    table.add_row("Task executions (re-runs too)", str(report.executions))
    for kill in report.kills:
        table.add_row(
            "Killed with SIGKILL",
            f"{kill.worker_id}, pid {kill.pid}, running {kill.abandoned} task(s)",
        )
    if report.kills:
        table.add_row(
            "Its tasks taken over",
            checked(
                f"{report.taken_over}/{report.abandoned}", report.taken_over == report.abandoned
            ),
        )
    table.add_row("Takeovers (fencing token > 1)", str(report.takeovers))
    table.add_row("Attempts failed and retried", str(report.retried))
    table.add_row("Results refused by fencing", str(report.refused))
    table.add_row(
        "Duplicate results", checked(report.duplicate_results, not report.duplicate_results)
    )
    table.add_row("Inconsistent results", checked(report.lineage_errors, not report.lineage_errors))
    killed = {kill.worker_id for kill in report.kills}
    survivors = {wid: code for wid, code in report.worker_exit_codes.items() if wid not in killed}
    clean = sum(1 for code in survivors.values() if code == 0)
    table.add_row(
        "Clean shutdown (SIGTERM)", checked(f"{clean}/{len(survivors)}", clean == len(survivors))
    )
    table.add_row(
        "Wall time", f"{report.wall_seconds:.1f} s (processing {report.processing_seconds:.1f} s)"
    )
    console.print(table)
    if report.ok:
        console.print(
            "[bold green]Verified[/]: every order completed and no task's result was recorded "
            "twice, although a worker was killed mid-task."
        )
    else:
        for problem in report.problems:
            console.print(f"[bold red]Problem[/]: {problem}")
