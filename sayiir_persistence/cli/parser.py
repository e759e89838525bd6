"""The parser of ``sayiir-persistence``: the subcommands, their options, and the ``cmd_*``
function that runs each (``args.command``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..model import SignalKind, WorkflowStatus
from ..provisioning import URL_ENV_VAR
from ..retention import DEFAULT_PRUNE_BATCH, MAX_PRUNE_BATCH, PRUNABLE_STATUSES
from .arguments import parse_duration, positive_int, positive_int_at_most, positive_seconds
from .commands.inspect import cmd_claims, cmd_list, cmd_show
from .commands.migrate import cmd_demo, cmd_migrate
from .commands.prune import cmd_prune
from .commands.retry import cmd_retry
from .commands.signals import cmd_resume, cmd_signal
from .commands.stats import cmd_stats
from .program import PROG

DEFAULT_LIST_LIMIT = 100


def build_parser() -> argparse.ArgumentParser:
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
    migrate.set_defaults(command=cmd_migrate)

    demo = subcommands.add_parser(
        "demo",
        help="run the crash-surviving demo (an embedded SQLite file by default)",
        description="Run order workflows across several worker processes, SIGKILL one "
        "midway, and verify every order completed with no result recorded twice.",
    )
    # Imported here: the demo pulls in multiprocessing and the worker, which others do not need.
    from ..demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(command=cmd_demo)

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
        type=positive_int,
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help="at most N instances (default: %(default)s)",
    )
    listing.set_defaults(command=cmd_list)

    show = subcommands.add_parser(
        "show",
        parents=[store],
        help="show one workflow: snapshot, claims and pending signals",
        description="Show a workflow instance: status, position, completed tasks (size and "
        "preview of each output), input, timestamps, its task claims and pending signals. "
        'With --json, payloads are {"size": N, "base64": "..."}.',
    )
    show.add_argument("instance_id", metavar="ID")
    show.set_defaults(command=cmd_show)

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
    claims.add_argument("--limit", type=positive_int, metavar="N", help="at most N claims")
    claims.set_defaults(command=cmd_claims)

    stats = subcommands.add_parser(
        "stats",
        parents=[store],
        help="the queue at a glance: workflows, runnable tasks, claims, completions",
        description="Show workflows by status, runnable tasks by priority (with how long the "
        "oldest has waited), live and expired claims by worker, retries waiting, and the "
        "tasks completed in the last minute and hour, all judged by the database clock. "
        "Reads only.",
    )
    stats.add_argument(
        "--watch",
        type=positive_seconds,
        metavar="SECONDS",
        help="refresh every SECONDS until Ctrl-C (with --json: one object a line)",
    )
    stats.add_argument(
        "--prometheus",
        action="store_true",
        help="print the Prometheus text exposition format (needs the 'prometheus' extra)",
    )
    stats.set_defaults(command=cmd_stats)

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
        signal.set_defaults(command=cmd_signal, kind=kind)

    resume = subcommands.add_parser(
        "resume",
        parents=[store],
        help="put a paused workflow back in progress",
        description="Unpause a workflow: it is in progress again and workers pick up its "
        "runnable tasks. A pause requested but not yet applied is withdrawn.",
    )
    resume.add_argument("instance_id", metavar="ID")
    resume.set_defaults(command=cmd_resume)

    retry = subcommands.add_parser(
        "retry",
        parents=[store],
        help="re-queue a failed workflow at the task(s) it failed at",
        description="Put a failed workflow back in progress where it failed: its error is "
        "cleared, its completed tasks are kept, and the tasks of its position without a "
        "result are runnable again, each counting its attempts anew (attempt 1 next). Claims "
        "still held on it are dropped. Refused for a workflow that is not failed.",
    )
    retry.add_argument("instance_id", metavar="ID")
    retry.set_defaults(command=cmd_retry)

    prune = subcommands.add_parser(
        "prune",
        parents=[store],
        help="delete finished workflows older than a duration, in batches",
        description="Delete the workflows with a finished status whose last save is older "
        "than a duration (by the database clock), with their results, claims, signals and "
        "events, in batches of one transaction each; print the count of each batch and the "
        "total. Safe to run while workers run, and from several places at once.",
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
        type=positive_int_at_most(MAX_PRUNE_BATCH),
        default=DEFAULT_PRUNE_BATCH,
        metavar="N",
        help=f"workflows deleted per batch, one transaction each (default: %(default)s, "
        f"at most {MAX_PRUNE_BATCH})",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
    )
    prune.set_defaults(command=cmd_prune)


def _add_url_argument(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(URL_ENV_VAR) or None
    parser.add_argument(
        "--url",
        default=default,
        required=default is None,
        help=f"SQLAlchemy database URL (default: ${URL_ENV_VAR})",
    )
