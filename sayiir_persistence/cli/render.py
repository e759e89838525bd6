"""What people see: ``rich`` tables and one-line messages of the commands (times in UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..inspection import ClaimInfo, ClaimState, WorkflowSummary
from ..model import (
    AtDelay,
    AtFork,
    AtSignal,
    AtTask,
    NotStarted,
    Position,
    SignalKind,
    SignalRequest,
    WorkflowSnapshot,
    WorkflowStatus,
)
from .arguments import UNIT_SECONDS, format_duration

PREVIEW_CHARS = 40
ERROR_CHARS = 60  # of an error in a table cell: its first characters, on one line


def new_console() -> Console:
    # soft_wrap: a message line stays one line (for grep), whatever the terminal's width;
    # tables still fit the width.
    return Console(highlight=False, soft_wrap=True)


def _listing(title: str) -> Table:
    """A table of rows: rules under the header only, so that more columns fit 80 characters."""
    return Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)


def record_table(title: str | Text) -> Table:
    """A table of one record, a field a row (the caller adds a label and a value column).

    ``title`` is passed on as is: a ``str`` is read as console markup and styled as a title,
    a ``Text`` is printed as it stands.
    """
    return Table(title=title, title_justify="left", show_header=False)


def print_listing(
    console: Console,
    summaries: list[WorkflowSummary],
    status: WorkflowStatus | None,
    next_after: str | None,
) -> None:
    """``list``: a table of instances and, if there is a next page, how to ask for it."""
    where = f" with status {status.value}" if status else ""
    if not summaries:
        console.print(Text(f"no workflow instances{where}"))
        return
    table = _listing(f"Workflow instances{where}")
    table.add_column("Instance", overflow="fold")  # ids wrap, never cut: people copy them
    table.add_column("Status")
    table.add_column("Version", justify="right")
    table.add_column("Updated (UTC)", no_wrap=True)
    # Why the failed ones failed, and where (what `retry` would re-queue).
    failures = any(summary.status is WorkflowStatus.FAILED for summary in summaries)
    if failures:
        table.add_column("Failed at", overflow="fold")
        table.add_column("Error")
    for summary in summaries:
        cells: list[Text | str] = [
            Text(summary.instance_id),
            _status_text(summary.status),
            str(summary.version),
            _time(summary.updated_at),
        ]
        if failures:
            cells += [
                Text(", ".join(summary.failed_tasks) or "-"),
                Text(_one_line(summary.error or "-", ERROR_CHARS), style="red"),
            ]
        table.add_row(*cells)
    console.print(table)
    if next_after is not None:
        console.print(Text(f"more: --after {_shell_word(next_after)}"))


def print_snapshot(
    console: Console,
    snapshot: WorkflowSnapshot,
    claims: list[ClaimInfo],
    signals: dict[SignalKind, SignalRequest],
    now: datetime,
) -> None:
    """``show``: the snapshot's fields, then its completed tasks, claims and pending signals."""
    table = record_table(Text(f"Workflow {snapshot.instance_id}"))
    table.add_column("field", no_wrap=True, style="bold")
    table.add_column("value")
    table.add_row("Status", _status_text(snapshot.status))
    table.add_row("Position", Text(_position(snapshot.position)))
    table.add_row("Definition", Text(snapshot.definition_hash))
    table.add_row("Version", str(snapshot.version))
    table.add_row("Priority", str(snapshot.priority))
    table.add_row("Tags", Text(", ".join(sorted(snapshot.tags)) or "-"))
    table.add_row("Created", f"{_time(snapshot.created_at)} UTC")
    table.add_row("Updated", f"{_time(snapshot.updated_at)} UTC ({_ago(snapshot.updated_at, now)})")
    table.add_row("Input", _payload_text(snapshot.initial_input))
    if snapshot.output is not None:
        table.add_row("Output", _payload_text(snapshot.output))
    if snapshot.error is not None:
        table.add_row("Error", Text(snapshot.error, style="red"))
    if snapshot.last_completed_task_id is not None:
        table.add_row("Last completed", Text(snapshot.last_completed_task_id))
    if snapshot.trace_context is not None:
        # The trace id alone: what a tracing UI searches by.
        table.add_row("Trace", Text(snapshot.trace_context.split("-")[1]))
    for label, request in (
        ("Cancelled", snapshot.cancel_request),
        ("Paused", snapshot.pause_request),
    ):
        if request is not None:
            table.add_row(label, Text(_request(request)))
    console.print(table)

    tasks = _listing(f"Completed tasks ({len(snapshot.completed_tasks)})")
    tasks.add_column("Task", overflow="fold")
    tasks.add_column("Size", justify="right", no_wrap=True)
    tasks.add_column("Preview")
    for task_id, output in sorted(snapshot.completed_tasks.items()):
        tasks.add_row(Text(task_id), _size(len(output)), Text(_preview(output)))
    if snapshot.completed_tasks:
        console.print(tasks)
    else:
        console.print("Completed tasks: none")

    if claims:
        title = f"Claims ({len(claims)}; times UTC)"
        console.print(_claims_table(title, claims, now, with_instance=False))
    else:
        console.print("Claims: none")

    if signals:
        pending = _listing(f"Pending signals ({len(signals)})")
        pending.add_column("Signal")
        pending.add_column("Requested")
        for kind, request in signals.items():
            pending.add_row(kind.value, Text(_request(request)))
        console.print(pending)
    else:
        console.print("Pending signals: none")


def print_claims(
    console: Console,
    claims: list[ClaimInfo],
    now: datetime,
    *,
    include_inactive: bool,
    worker: str | None,
) -> None:
    """``claims``: a table of claims, counted by state, or a line saying there are none."""
    which = "Claims" if include_inactive else "Live claims"
    if worker is not None:
        which += f" of {worker}"
    if not claims:
        console.print(Text(f"no {which[0].lower()}{which[1:]} (database time {_time(now)} UTC)"))
        return
    counts = {state: sum(claim.state is state for claim in claims) for state in ClaimState}
    detail = ", ".join(f"{n} {state.value}" for state, n in counts.items() if n)
    table = _claims_table(
        f"{which}: {detail} (times UTC; database time {_time(now)})",
        claims,
        now,
        with_instance=True,
    )
    console.print(table)


def print_signal_outcome(
    console: Console,
    instance_id: str,
    outcome: str,
    target: WorkflowStatus,
    before: WorkflowStatus,
    dropped: list[ClaimInfo],
) -> None:
    """``cancel`` / ``pause``: what changed (and whose claims were dropped), or nothing did."""
    if outcome == "applied":
        message = f"{target.value} {instance_id!r} (was {before.value})"
        if dropped:
            held = ", ".join(f"{claim.task_id} by {claim.worker_id}" for claim in dropped)
            message += f"; dropped {len(dropped)} claim(s) of running tasks: {held}"
    else:
        message = f"{instance_id!r} is already {target.value}"
    console.print(Text(message))


def print_resume_outcome(
    console: Console, instance_id: str, outcome: str, snapshot: WorkflowSnapshot
) -> None:
    """``resume``: resumed (and where the workflow is), or a pending pause withdrawn."""
    if outcome == "resumed":
        console.print(Text(f"resumed {instance_id!r}: in progress, {_position(snapshot.position)}"))
    else:
        console.print(Text(f"withdrew the pending pause of {instance_id!r}"))


def print_retry_outcome(console: Console, snapshot: WorkflowSnapshot, requeued: list[str]) -> None:
    """``retry``: at which task(s) the workflow was re-queued, and its new version."""
    where = (
        f"at task{'s' if len(requeued) > 1 else ''} {', '.join(requeued)}"
        if requeued
        else f"with no task to run yet ({_position(snapshot.position)})"
    )
    console.print(
        Text(f"re-queued {snapshot.instance_id!r} {where}: in progress, version {snapshot.version}")
    )


def print_prune_batch(
    console: Console, number: int, dry_run: bool, *, matched: int, deleted: int
) -> None:
    """``prune``: one batch done (what it would delete, on a dry run)."""
    done = "would delete" if dry_run else "deleted"
    count = matched if dry_run else deleted
    console.print(Text(f"batch {number}: {done} {count}"))


def print_prune_result(
    console: Console,
    status: WorkflowStatus,
    older_than: timedelta,
    cutoff: datetime,
    dry_run: bool,
    batches: list[tuple[int, int]],
    matched: int,
    deleted: int,
) -> None:
    """``prune``: the totals (what would be deleted, on a dry run)."""
    which = (
        f"{status.value} workflow(s) last saved before {_time(cutoff)} UTC "
        f"(older than {format_duration(older_than)})"
    )
    if dry_run:
        console.print(Text(f"would delete {matched} {which}; dry run, nothing deleted"))
    else:
        console.print(Text(f"deleted {deleted} {which} in {len(batches)} batch(es)"))


def _claims_table(
    title: str, claims: list[ClaimInfo], now: datetime, *, with_instance: bool
) -> Table:
    table = _listing(title)
    # Deadlines and errors only where some claim has one: most stores use neither.
    deadlines = any(claim.deadline is not None for claim in claims)
    errors = any(claim.last_error is not None for claim in claims)
    if with_instance:
        table.add_column("Instance", overflow="fold")
    table.add_column("Task", overflow="fold")
    table.add_column("Worker", overflow="fold")
    table.add_column("Token", justify="right")
    table.add_column("Attempt", justify="right")
    table.add_column("Claimed")
    table.add_column("Expires")
    if deadlines:
        table.add_column("Deadline")
    table.add_column("State")
    if errors:
        table.add_column("Last error")
    for claim in claims:
        expires = (
            "never"
            if claim.expires_at is None
            else f"{_clock(claim.expires_at, now)} ({_ago(claim.expires_at, now)})"
        )
        cells: list[Text | str] = [Text(claim.instance_id)] if with_instance else []
        cells += [
            Text(claim.task_id),
            _holder(claim, now),
            str(claim.token),
            str(claim.attempt) if claim.attempt else "-",  # 0: none since a retry
            _clock(claim.claimed_at, now),
            expires,
        ]
        if deadlines:
            cells.append("-" if claim.deadline is None else _clock(claim.deadline, now))
        cells.append(Text(claim.state.value, style=_CLAIM_STYLES[claim.state]))
        if errors:
            cells.append(Text(_one_line(claim.last_error or "-", ERROR_CHARS)))
        table.add_row(*cells)
    return table


def _holder(claim: ClaimInfo, now: datetime) -> Text:
    """Who holds the claim: a worker, or nobody while a failed attempt waits for its retry."""
    if not claim.waiting_to_retry:
        return Text(claim.worker_id)
    due = "" if claim.expires_at is None else _clock(claim.expires_at, now)
    if claim.state is ClaimState.RELEASED:
        return Text("retry wait, dropped", style="dim")
    if claim.state is ClaimState.EXPIRED:
        return Text(f"retry due since {due}", style="yellow")
    return Text(f"waiting to retry until {due}", style="yellow")


_STATUS_STYLES = {
    WorkflowStatus.IN_PROGRESS: "cyan",
    WorkflowStatus.COMPLETED: "green",
    WorkflowStatus.FAILED: "bold red",
    WorkflowStatus.CANCELLED: "magenta",
    WorkflowStatus.PAUSED: "yellow",
}
_CLAIM_STYLES = {ClaimState.LIVE: "green", ClaimState.EXPIRED: "yellow", ClaimState.RELEASED: "dim"}


def _status_text(status: WorkflowStatus) -> Text:
    return Text(status.value, style=_STATUS_STYLES[status])


def _position(position: Position) -> str:
    match position:
        case NotStarted():
            return "not started"
        case AtTask(task_id=task_id):
            return f"at task {task_id}"
        case AtFork(fork_id=fork_id, branch_task_ids=branches):
            return f"at fork {fork_id}: {', '.join(branches)}"
        case AtDelay(delay_id=delay_id, wake_at=wake_at, next_task_id=next_task_id):
            then = f", then {next_task_id}" if next_task_id is not None else ""
            return f"delay {delay_id} until {_time(wake_at)} UTC{then}"
        case AtSignal():
            until = f" until {_time(position.wake_at)} UTC" if position.wake_at else ""
            then = f", then {position.next_task_id}" if position.next_task_id else ""
            return (
                f"waiting for event {position.signal_name!r} "
                f"(signal {position.signal_id}){until}{then}"
            )
    return repr(position)  # pragma: no cover - every position is matched above


def _request(request: SignalRequest) -> str:
    text = f"at {_time(request.requested_at)} UTC"
    if request.requested_by:
        text += f" by {request.requested_by}"
    if request.reason:
        text += f": {request.reason}"
    return text


def _one_line(text: str, width: int) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``width`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def _payload_text(payload: bytes | None) -> Text:
    if payload is None:
        return Text("-")
    return Text(f"{_size(len(payload))}  {_preview(payload)}")


def _preview(payload: bytes) -> str:
    """The start of a payload: text with control characters escaped, else hex."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        head = payload[: PREVIEW_CHARS // 3].hex(" ")
        return f"hex {head}{' ...' if len(payload) > PREVIEW_CHARS // 3 else ''}"
    shown = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text[: PREVIEW_CHARS + 1]
    )
    return shown if len(shown) <= PREVIEW_CHARS else shown[: PREVIEW_CHARS - 3] + "..."


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clock(moment: datetime, now: datetime) -> str:
    """Time of day only when on the database's current day: claims live for minutes."""
    if moment.astimezone(UTC).date() == now.astimezone(UTC).date():
        return moment.astimezone(UTC).strftime("%H:%M:%S")
    return _time(moment)


def _ago(moment: datetime, now: datetime) -> str:
    """``in 12s``, ``3m ago``: seconds below a minute, else the largest unit only."""
    seconds = round((moment - now).total_seconds())
    unit, size = next(
        (unit, size) for unit, size in UNIT_SECONDS.items() if abs(seconds) >= size or size == 1
    )
    span = f"{abs(seconds) // size}{unit}"
    return f"in {span}" if seconds > 0 else f"{span} ago"


def _shell_word(text: str) -> str:
    return text if re.fullmatch(r"[\w.:@/+-]+", text) else "'" + text.replace("'", "'\\''") + "'"
