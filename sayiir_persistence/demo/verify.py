"""The verification of a run, with the public API only: every order completed, no task's
result recorded twice, the stored results chained consistently, the killed worker's tasks taken
over (see the package's documentation)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..errors import NotFoundError
from ..model import WorkflowStatus
from ..sql.backend import SqlBackend
from ..worker import TaskOutcome
from .executions import execution_rows
from .report import DemoReport
from .workflow import CONSUMES, load_json


def verify(report: DemoReport, backend: SqlBackend, run_id: str, ids: list[str]) -> None:
    """Fill in the counters from the store and the executions table; list the problems."""
    rows = execution_rows(backend.engine, run_id)
    report.executions = len(rows)
    report.takeovers = sum(1 for row in rows if row["token"] > 1)
    report.refused = sum(1 for row in rows if row["outcome"] == TaskOutcome.LOST.value)
    report.retried = sum(1 for row in rows if row["outcome"] == TaskOutcome.RETRYING.value)
    by_task: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[(row["instance_id"], row["task_id"])].append(row)

    stored: dict[tuple[str, str], str] = {}  # (instance, task) -> execution id of the result
    missing = 0
    for instance_id in ids:
        try:
            snapshot = backend.load_snapshot(instance_id)
        except NotFoundError:
            missing += 1  # deleted by someone else sharing the database
            continue
        if snapshot.status is WorkflowStatus.COMPLETED:
            report.completed += 1
        outputs = {task: load_json(out) for task, out in snapshot.completed_tasks.items()}
        report.results += len(outputs)
        for task_id, output in outputs.items():
            stored[(instance_id, task_id)] = output["execution"]
        report.lineage_errors += _lineage_errors(outputs, snapshot.output)

    for key, execution_id in stored.items():
        known = {row["execution_id"] for row in by_task.get(key, [])}
        if execution_id not in known:
            report.lineage_errors += 1  # a result no recorded execution produced
    for key, task_rows in by_task.items():
        accepted = {
            row["execution_id"] for row in task_rows if row["outcome"] == TaskOutcome.RECORDED.value
        }
        if key in stored:
            accepted.add(stored[key])
        if len(accepted) > 1:
            report.duplicate_results += 1

    killed = {kill.worker_id for kill in report.kills}
    if killed:
        abandoned = [
            row
            for row in rows
            if row["worker"] in killed
            and row["outcome"] is None
            and stored.get((row["instance_id"], row["task_id"])) != row["execution_id"]
        ]
        report.abandoned = len(abandoned)
        report.taken_over = sum(
            1
            for row in abandoned
            if any(
                other["token"] > row["token"]
                and other["execution_id"] == stored.get((row["instance_id"], row["task_id"]))
                for other in by_task[(row["instance_id"], row["task_id"])]
            )
        )
    _list_problems(report)
    if missing:
        report.problems.append(f"{missing} orders were deleted from the database during the run")


def _lineage_errors(outputs: dict[str, dict[str, Any]], final: bytes | None) -> int:
    errors = 0
    for task_id, consumed in CONSUMES.items():
        output = outputs.get(task_id)
        if output is None:
            continue
        for source in consumed:
            if (
                source not in outputs
                or output["consumed"].get(source) != outputs[source]["execution"]
            ):
                errors += 1
    if final is not None and "ship" in outputs:
        errors += load_json(final)["execution"] != outputs["ship"]["execution"]
    return errors


def _list_problems(report: DemoReport) -> None:
    problems = report.problems
    if not any(kill.abandoned for kill in report.kills):
        problems.append("no worker was killed while running a task: the run ended first")
    if report.completed != report.instances:
        problems.append(f"{report.instances - report.completed} orders did not complete")
    if report.duplicate_results:
        problems.append(f"{report.duplicate_results} tasks had their result recorded twice")
    if report.lineage_errors:
        problems.append(f"{report.lineage_errors} stored results disagree with their consumers")
    if report.taken_over < report.abandoned:
        problems.append(
            f"{report.abandoned - report.taken_over} tasks of the killed worker were not taken over"
        )
    killed = {kill.worker_id for kill in report.kills}
    for worker_id, code in sorted(report.worker_exit_codes.items()):
        if worker_id not in killed and code != 0:
            problems.append(f"{worker_id} exited with status {code} (expected a clean stop)")
