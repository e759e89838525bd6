"""The ``sayiir-persistence`` command (also ``python -m sayiir_persistence``).

Subcommands:

- ``migrate [--url URL] [--revision REV]``: provision or upgrade the ``sayiir_*`` tables.
- ``demo [--url URL] [...]``: the crash-surviving demo (SQLite by default; see ``demo.py``).
- Operator commands, each with ``--url`` (default ``$SAYIIR_DATABASE_URL``) and ``--json``:

  - ``list [--status S] [--after ID] [--limit N]``: workflow instances, a page at a time;
  - ``show ID``: one workflow: snapshot, claims and pending signals;
  - ``claims [--all] [--worker W] [--limit N]``: live claims (``--all``: expired and
    released ones too), judged by the database clock;
  - ``cancel ID`` / ``pause ID`` ``[--reason R] [--by WHO]``: request it and apply it at once;
  - ``resume ID``: put a paused workflow back in progress;
  - ``prune --status S --older-than 7d [--batch N] [--dry-run]``: delete finished workflows.

People get ``rich`` tables; ``--json`` prints one JSON object on stdout for scripts. Payloads
in ``show --json`` are ``{"size": N, "base64": "..."}`` (whole, lossless).

Exit status: 0 on success, 1 on failure or refusal (unknown id, a workflow that cannot be
paused, a database that is unreachable or not provisioned: one line on stderr, password
masked, never a traceback), 2 on a usage error. Each subcommand is one ``_cmd_*`` function
registered in :func:`_parser`.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import (
    CannotCancelError,
    CannotPauseError,
    InvalidInputError,
    NotFoundError,
    PersistenceError,
    SchemaError,
)
from .inspection import ClaimInfo, ClaimState, StoreInspector
from .model import (
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
from .provisioning import URL_ENV_VAR, mask_url, redact_passwords, upgrade
from .sql.backend import SqlBackend

__all__ = ["main", "parse_duration"]

PROG = "sayiir-persistence"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by SIGINT"

DEFAULT_LIST_LIMIT = 100
DEFAULT_PRUNE_BATCH = 500
# Only finished workflows may be pruned: they can no longer change (a save over them is
# refused), so a candidate selected a moment ago is still one when it is deleted.
PRUNABLE_STATUSES = (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED)
PREVIEW_CHARS = 40

logger = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    command: Command = args.command
    try:
        return command(args)
    except PersistenceError as exc:
        _fail(str(exc))
    except BrokenPipeError:
        # The reader went away (`sayiir-persistence list | head`): nothing left to say.
        # Point stdout at devnull so that the interpreter's final flush does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception as exc:  # last resort: one line; the traceback is logged with -vv
        logger.debug("unexpected error", exc_info=True)
        _fail(f"unexpected {type(exc).__name__}: {exc}")
    return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the database of sayiir-persistence.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log progress to stderr (-vv for debug output)",
    )
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    migrate = subcommands.add_parser(
        "migrate",
        help="create or upgrade the sayiir_* tables",
        description="Create the sayiir_* tables, or upgrade them to the newest revision. "
        "Safe to run repeatedly and concurrently.",
    )
    _add_url_argument(migrate)
    migrate.add_argument(
        "--revision",
        default="head",
        help="the revision to upgrade to (default: %(default)s, the newest)",
    )
    migrate.set_defaults(command=_cmd_migrate)

    demo = subcommands.add_parser(
        "demo",
        help="run the crash-surviving demo (an embedded SQLite file by default)",
        description="Run order workflows across several worker processes, SIGKILL one "
        "midway, and verify every order completed with no result recorded twice.",
    )
    # Imported here: the demo pulls in multiprocessing and the worker, which others do not need.
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(command=_cmd_demo)

    _add_operator_commands(subcommands)
    return parser


def _add_operator_commands(subcommands: Any) -> None:
    # Options every operator command shares.
    store = argparse.ArgumentParser(add_help=False)
    _add_url_argument(store)
    store.add_argument(
        "--json", action="store_true", help="print one JSON object for scripts, not tables"
    )

    listing = subcommands.add_parser(
        "list",
        parents=[store],
        help="list workflow instances (a page at a time)",
        description="List workflow instances in id order, with status, version and last save. "
        "Page with --after (the last id of the previous page).",
    )
    listing.add_argument("--status", type=str.lower, choices=[s.value for s in WorkflowStatus])
    listing.add_argument("--after", metavar="ID", help="only ids after this one (paging)")
    listing.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help="at most N instances (default: %(default)s)",
    )
    listing.set_defaults(command=_cmd_list)

    show = subcommands.add_parser(
        "show",
        parents=[store],
        help="show one workflow: snapshot, claims and pending signals",
        description="Show a workflow instance: status, position, completed tasks (size and "
        "preview of each output), input, timestamps, its task claims and pending signals. "
        'With --json, payloads are {"size": N, "base64": "..."}.',
    )
    show.add_argument("instance_id", metavar="ID")
    show.set_defaults(command=_cmd_show)

    claims = subcommands.add_parser(
        "claims",
        parents=[store],
        help="list live task claims (--all: expired and released too)",
        description="List task claims: worker, fencing token, claimed and expiry times. "
        "Live or expired is judged by the database clock, as workers are.",
    )
    claims.add_argument(
        "--all", action="store_true", help="also expired and released claims (default: live)"
    )
    claims.add_argument("--worker", metavar="WORKER", help="only claims of this worker")
    claims.add_argument("--limit", type=_positive_int, metavar="N", help="at most N claims")
    claims.set_defaults(command=_cmd_claims)

    for kind, verb in ((SignalKind.CANCEL, "cancel"), (SignalKind.PAUSE, "pause")):
        signal = subcommands.add_parser(
            verb,
            parents=[store],
            help=f"{verb} a workflow now (via a {verb} signal)",
            description=f"Send a {verb} signal to a workflow and apply it at once: its status "
            f"becomes {'cancelled' if kind is SignalKind.CANCEL else 'paused'} and the claims "
            "of its running tasks are dropped (their workers' next heartbeat or save fails, "
            f"so they stop). Idempotent: {verb}ing a workflow twice succeeds.",
        )
        signal.add_argument("instance_id", metavar="ID")
        signal.add_argument("--reason", help="why (recorded with the request)")
        signal.add_argument(
            "--by", metavar="WHO", help="who asks (recorded; default: your login name)"
        )
        signal.set_defaults(command=_cmd_signal, kind=kind)

    resume = subcommands.add_parser(
        "resume",
        parents=[store],
        help="put a paused workflow back in progress",
        description="Unpause a workflow: it is in progress again and workers pick up its "
        "runnable tasks. A pause requested but not yet applied is withdrawn.",
    )
    resume.add_argument("instance_id", metavar="ID")
    resume.set_defaults(command=_cmd_resume)

    prune = subcommands.add_parser(
        "prune",
        parents=[store],
        help="delete finished workflows older than a duration, in batches",
        description="Delete the workflows with a finished status whose last save is older "
        "than a duration (by the database clock), with their results, claims, signals and "
        "events, in batches; print the count of each batch and the total.",
    )
    prune.add_argument(
        "--status",
        type=str.lower,
        required=True,
        choices=[s.value for s in PRUNABLE_STATUSES],
        help="which finished workflows",
    )
    prune.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="DURATION",
        help="last saved longer ago than this: 30s, 15m, 12h, 7d (or 1d12h)",
    )
    prune.add_argument(
        "--batch",
        type=_positive_int,
        default=DEFAULT_PRUNE_BATCH,
        metavar="N",
        help="workflows selected per batch (default: %(default)s)",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
    )
    prune.set_defaults(command=_cmd_prune)


def _add_url_argument(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(URL_ENV_VAR) or None
    parser.add_argument(
        "--url",
        default=default,
        required=default is None,
        help=f"SQLAlchemy database URL (default: ${URL_ENV_VAR})",
    )


# --------------------------------------------------------------------------------------------
# migrate, demo


def _cmd_migrate(args: argparse.Namespace) -> int:
    result = upgrade(args.url, args.revision)
    if result.changed:
        print(f"migrated {result.url} from {result.from_revision} to {result.to_revision}")
    else:
        print(f"{result.url} is already at {result.to_revision}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo_command

    try:
        return run_demo_command(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# --------------------------------------------------------------------------------------------
# Operator commands


@contextmanager
def _store(url: str) -> Iterator[tuple[SqlBackend, StoreInspector]]:
    """The backend (schema checked) and a read-only inspector on the same engine."""
    _check_url(url)
    backend = SqlBackend(url)
    try:
        yield backend, StoreInspector(backend.engine)
    finally:
        backend.close()


def _check_url(url: str) -> None:
    """Refuse what SqlBackend would take badly: a malformed URL, a SQLite file that is not there.

    SQLite creates a missing file on connect: a typo in a read-only command would leave an
    empty database behind. An in-memory SQLite database would always be empty.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidInputError(f"not a valid database URL: {mask_url(url)}") from None
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database
    if not database or database == ":memory:":
        raise InvalidInputError(
            "an in-memory SQLite database is empty in every new process: "
            "give the URL of a database file (sqlite:///path/to/file.db)"
        )
    if not database.startswith("file:") and not Path(database).exists():
        raise SchemaError(
            f"no SQLite database at {database}: check --url, or create one with "
            f"`{PROG} migrate --url {mask_url(url)}`"
        )


def _cmd_list(args: argparse.Namespace) -> int:
    status = None if args.status is None else WorkflowStatus(args.status)
    with _store(args.url) as (backend, inspector):
        # One more than asked: whether there is a next page.
        ids = backend.list_snapshots(status=status, after=args.after, limit=args.limit + 1)
        page = ids[: args.limit]
        summaries = inspector.summaries(page)
    next_after = page[-1] if len(ids) > args.limit else None
    if args.json:
        _print_json(
            {
                "instances": [
                    {
                        "instance_id": summary.instance_id,
                        "status": summary.status.value,
                        "version": summary.version,
                        "updated_at": _iso(summary.updated_at),
                    }
                    for summary in summaries
                ],
                "next_after": next_after,
            }
        )
        return EXIT_OK
    console = _console()
    where = f" with status {status.value}" if status else ""
    if not summaries:
        console.print(Text(f"no workflow instances{where}"))
        return EXIT_OK
    table = _listing(f"Workflow instances{where}")
    table.add_column("Instance", overflow="fold")  # ids wrap, never cut: people copy them
    table.add_column("Status")
    table.add_column("Version", justify="right")
    table.add_column("Updated (UTC)", no_wrap=True)
    for summary in summaries:
        table.add_row(
            Text(summary.instance_id),
            _status_text(summary.status),
            str(summary.version),
            _time(summary.updated_at),
        )
    console.print(table)
    if next_after is not None:
        console.print(Text(f"more: --after {_shell_word(next_after)}"))
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    instance_id: str = args.instance_id
    with _store(args.url) as (backend, inspector):
        snapshot = backend.load_snapshot(instance_id)
        now, claims = inspector.claims(instance_id=instance_id, include_inactive=True)
        signals = {
            kind: request
            for kind in SignalKind
            if (request := backend.get_signal(instance_id, kind)) is not None
        }
    if args.json:
        _print_json(_snapshot_json(snapshot, claims, signals, now))
    else:
        _print_snapshot(_console(), snapshot, claims, signals, now)
    return EXIT_OK


def _cmd_claims(args: argparse.Namespace) -> int:
    with _store(args.url) as (_, inspector):
        now, claims = inspector.claims(
            worker_id=args.worker, include_inactive=args.all, limit=args.limit
        )
    if args.json:
        _print_json(
            {"database_time": _iso(now), "claims": [_claim_json(claim) for claim in claims]}
        )
        return EXIT_OK
    console = _console()
    which = "Claims" if args.all else "Live claims"
    if args.worker is not None:
        which += f" of {args.worker}"
    if not claims:
        console.print(Text(f"no {which[0].lower()}{which[1:]} (database time {_time(now)} UTC)"))
        return EXIT_OK
    counts = {state: sum(claim.state is state for claim in claims) for state in ClaimState}
    detail = ", ".join(f"{n} {state.value}" for state, n in counts.items() if n)
    table = _claims_table(
        f"{which}: {detail} (times UTC; database time {_time(now)})",
        claims,
        now,
        with_instance=True,
    )
    console.print(table)
    return EXIT_OK


def _cmd_signal(args: argparse.Namespace) -> int:
    kind: SignalKind = args.kind
    instance_id: str = args.instance_id
    verb = kind.value
    target = WorkflowStatus.CANCELLED if kind is SignalKind.CANCEL else WorkflowStatus.PAUSED
    refused = CannotCancelError if kind is SignalKind.CANCEL else CannotPauseError
    request = SignalRequest(
        reason=args.reason,
        requested_by=args.by if args.by is not None else _login_name(),
        requested_at=datetime.now(UTC),
    )
    with _store(args.url) as (backend, inspector):
        before = backend.load_snapshot(instance_id).status
        try:
            backend.store_signal(instance_id, kind, request)
        except refused as exc:
            raise refused(f"cannot {verb}: {exc}") from exc
        # No task of the instance can be claimed anew while the signal is pending, so these
        # are the claims that applying it drops.
        _, running = inspector.claims(instance_id=instance_id)
        if kind is SignalKind.CANCEL:
            applied = backend.check_and_cancel(instance_id)
        else:
            applied = backend.check_and_pause(instance_id)
        after = backend.load_snapshot(instance_id).status
        if not applied and after is not target:
            # It finished (or its request was withdrawn) between our two calls.
            if after.is_terminal:
                backend.clear_signal(instance_id, kind)  # it could never apply now
            raise refused(f"cannot {verb}: workflow {instance_id!r} is {after.value} now")
    # "unchanged": already cancelled / paused (or a worker applied our request first).
    outcome = "applied" if applied else "unchanged"
    dropped = running if applied else []
    if args.json:
        _print_json(
            {
                "instance_id": instance_id,
                "action": verb,
                "outcome": outcome,
                "previous_status": before.value,
                "status": after.value,
                "claims_dropped": [_claim_json(claim) for claim in dropped],
            }
        )
        return EXIT_OK
    if outcome == "applied":
        message = f"{target.value} {instance_id!r} (was {before.value})"
        if dropped:
            held = ", ".join(f"{claim.task_id} by {claim.worker_id}" for claim in dropped)
            message += f"; dropped {len(dropped)} claim(s) of running tasks: {held}"
    else:
        message = f"{instance_id!r} is already {target.value}"
    _console().print(Text(message))
    return EXIT_OK


def _cmd_resume(args: argparse.Namespace) -> int:
    instance_id: str = args.instance_id
    with _store(args.url) as (backend, _):
        try:
            snapshot = backend.unpause(instance_id)
            outcome = "resumed"
        except CannotPauseError as exc:
            # Requested but not applied yet (by another client of the library): withdraw it.
            if backend.get_signal(instance_id, SignalKind.PAUSE) is None:
                raise CannotPauseError(f"cannot resume: {exc}") from exc
            backend.clear_signal(instance_id, SignalKind.PAUSE)
            snapshot = backend.load_snapshot(instance_id)
            outcome = "pause_withdrawn"
    if args.json:
        _print_json(
            {
                "instance_id": instance_id,
                "action": "resume",
                "outcome": outcome,
                "status": snapshot.status.value,
                "version": snapshot.version,
            }
        )
    elif outcome == "resumed":
        _console().print(
            Text(f"resumed {instance_id!r}: in progress, {_position(snapshot.position)}")
        )
    else:
        _console().print(Text(f"withdrew the pending pause of {instance_id!r}"))
    return EXIT_OK


def _cmd_prune(args: argparse.Namespace) -> int:
    status = WorkflowStatus(args.status)
    older_than: timedelta = args.older_than
    console = None if args.json else _console()
    batches: list[tuple[int, int]] = []
    with _store(args.url) as (backend, inspector):
        # One cutoff for the whole run, from the database clock.
        cutoff = inspector.now() - older_than
        after: str | None = None
        try:
            while True:
                ids = inspector.prune_candidates(status, cutoff, after=after, limit=args.batch)
                if not ids:
                    break
                after = ids[-1]
                deleted = 0 if args.dry_run else _delete_all(backend, ids)
                batches.append((len(ids), deleted))
                if console is not None:
                    done = "would delete" if args.dry_run else "deleted"
                    count = len(ids) if args.dry_run else deleted
                    console.print(Text(f"batch {len(batches)}: {done} {count}"))
                if len(ids) < args.batch:
                    break
        except KeyboardInterrupt:
            deleted_so_far = sum(deleted for _, deleted in batches)
            print(f"{PROG}: interrupted after deleting {deleted_so_far}", file=sys.stderr)
            return EXIT_INTERRUPTED
    matched = sum(count for count, _ in batches)
    deleted_total = sum(deleted for _, deleted in batches)
    if console is None:
        _print_json(
            {
                "status": status.value,
                "older_than_seconds": older_than.total_seconds(),
                "cutoff": _iso(cutoff),
                "dry_run": args.dry_run,
                "batches": [{"matched": m, "deleted": d} for m, d in batches],
                "matched": matched,
                "deleted": deleted_total,
            }
        )
        return EXIT_OK
    which = (
        f"{status.value} workflow(s) last saved before {_time(cutoff)} UTC "
        f"(older than {format_duration(older_than)})"
    )
    if args.dry_run:
        console.print(Text(f"would delete {matched} {which}; dry run, nothing deleted"))
    else:
        console.print(Text(f"deleted {deleted_total} {which} in {len(batches)} batch(es)"))
        if deleted_total < matched:
            console.print(Text(f"{matched - deleted_total} were deleted meanwhile by others"))
    return EXIT_OK


def _delete_all(backend: SqlBackend, instance_ids: list[str]) -> int:
    deleted = 0
    for instance_id in instance_ids:
        try:
            backend.delete_snapshot(instance_id)  # its results, claims, signals, events too
        except NotFoundError:
            continue  # pruned concurrently by someone else
        deleted += 1
    return deleted


# --------------------------------------------------------------------------------------------
# Rendering


def _console() -> Console:
    # soft_wrap: a message line stays one line (for grep), whatever the terminal's width;
    # tables still fit the width.
    return Console(highlight=False, soft_wrap=True)


def _listing(title: str) -> Table:
    """A table of rows: rules under the header only, so that more columns fit 80 characters."""
    return Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _print_snapshot(
    console: Console,
    snapshot: WorkflowSnapshot,
    claims: list[ClaimInfo],
    signals: dict[SignalKind, SignalRequest],
    now: datetime,
) -> None:
    table = Table(
        title=Text(f"Workflow {snapshot.instance_id}"),
        title_justify="left",
        show_header=False,
    )
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


def _claims_table(
    title: str, claims: list[ClaimInfo], now: datetime, *, with_instance: bool
) -> Table:
    table = _listing(title)
    if with_instance:
        table.add_column("Instance", overflow="fold")
    table.add_column("Task", overflow="fold")
    table.add_column("Worker", overflow="fold")
    table.add_column("Token", justify="right")
    table.add_column("Claimed")
    table.add_column("Expires")
    table.add_column("State")
    for claim in claims:
        expires = (
            "never"
            if claim.expires_at is None
            else f"{_clock(claim.expires_at, now)} ({_ago(claim.expires_at, now)})"
        )
        cells: list[Text | str] = [Text(claim.instance_id)] if with_instance else []
        cells += [
            Text(claim.task_id),
            Text(claim.worker_id),
            str(claim.token),
            _clock(claim.claimed_at, now),
            expires,
            Text(claim.state.value, style=_CLAIM_STYLES[claim.state]),
        ]
        table.add_row(*cells)
    return table


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
        (unit, size) for unit, size in _UNIT_SECONDS.items() if abs(seconds) >= size or size == 1
    )
    span = f"{abs(seconds) // size}{unit}"
    return f"in {span}" if seconds > 0 else f"{span} ago"


def _shell_word(text: str) -> str:
    return text if re.fullmatch(r"[\w.:@/+-]+", text) else "'" + text.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------
# JSON


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _payload_json(payload: bytes | None) -> dict[str, Any] | None:
    if payload is None:
        return None
    return {"size": len(payload), "base64": base64.b64encode(payload).decode("ascii")}


def _request_json(request: SignalRequest | None) -> dict[str, Any] | None:
    if request is None:
        return None
    return {
        "reason": request.reason,
        "requested_by": request.requested_by,
        "requested_at": _iso(request.requested_at),
    }


def _position_json(position: Position) -> dict[str, Any]:
    match position:
        case NotStarted():
            return {"kind": "not_started"}
        case AtTask(task_id=task_id):
            return {"kind": "task", "task_id": task_id}
        case AtFork(fork_id=fork_id, branch_task_ids=branches):
            return {"kind": "fork", "fork_id": fork_id, "branch_task_ids": list(branches)}
        case AtDelay(delay_id=delay_id, wake_at=wake_at, next_task_id=next_task_id):
            return {
                "kind": "delay",
                "delay_id": delay_id,
                "wake_at": _iso(wake_at),
                "next_task_id": next_task_id,
            }
        case AtSignal():
            return {
                "kind": "signal",
                "signal_id": position.signal_id,
                "signal_name": position.signal_name,
                "wake_at": _iso(position.wake_at),
                "next_task_id": position.next_task_id,
            }
    raise AssertionError(f"unknown position {position!r}")  # pragma: no cover


def _claim_json(claim: ClaimInfo) -> dict[str, Any]:
    return {
        "instance_id": claim.instance_id,
        "task_id": claim.task_id,
        "worker_id": claim.worker_id,
        "token": claim.token,
        "claimed_at": _iso(claim.claimed_at),
        "expires_at": _iso(claim.expires_at),
        "state": claim.state.value,
    }


def _snapshot_json(
    snapshot: WorkflowSnapshot,
    claims: list[ClaimInfo],
    signals: dict[SignalKind, SignalRequest],
    now: datetime,
) -> dict[str, Any]:
    return {
        "instance_id": snapshot.instance_id,
        "definition_hash": snapshot.definition_hash,
        "status": snapshot.status.value,
        "position": _position_json(snapshot.position),
        "version": snapshot.version,
        "priority": snapshot.priority,
        "tags": sorted(snapshot.tags),
        "created_at": _iso(snapshot.created_at),
        "updated_at": _iso(snapshot.updated_at),
        "initial_input": _payload_json(snapshot.initial_input),
        "output": _payload_json(snapshot.output),
        "error": snapshot.error,
        "last_completed_task_id": snapshot.last_completed_task_id,
        "completed_tasks": {
            task_id: _payload_json(output)
            for task_id, output in sorted(snapshot.completed_tasks.items())
        },
        "cancel_request": _request_json(snapshot.cancel_request),
        "pause_request": _request_json(snapshot.pause_request),
        "claims": [_claim_json(claim) for claim in claims],
        "pending_signals": {
            kind.value: _request_json(request) for kind, request in signals.items()
        },
        "database_time": _iso(now),
    }


# --------------------------------------------------------------------------------------------
# Arguments


_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}  # largest first


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``15m``, ``12h``, ``7d`` or a sum of them (``1d12h``).

    Raises ``argparse.ArgumentTypeError`` (a usage error) for anything else.
    """
    compact = text.strip().lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 30s, 15m, 12h, 7d or 1d12h)"
        )
    return timedelta(seconds=sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts))


def format_duration(duration: timedelta) -> str:
    """The inverse of :func:`parse_duration`, whole seconds, largest units first (``1d12h``)."""
    seconds = int(duration.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor the password database
        return None


# --------------------------------------------------------------------------------------------
# Errors and logging


def _fail(message: str) -> None:
    # Library messages mask passwords already; this also covers a URL inside a driver message.
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def _one_line(message: str) -> str:
    return redact_passwords(" ".join(message.split()))


def _configure_logging(verbosity: int) -> None:
    if verbosity <= 0:
        return
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 1 else logging.INFO,
        format="%(levelname)s [%(name)s] %(message)s",
        stream=sys.stderr,
    )
