"""``prune``: delete finished workflows older than a duration, in batches.

A batch is one call of ``PersistentBackend.prune_workflows`` (one transaction, which checks
status and age as it deletes); the command calls it until it returns 0. ``--dry-run`` counts
the same selection with the inspector's read-only candidate query instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime, timedelta

from ...inspection import StoreInspector
from ...model import WorkflowStatus
from ...sql.backend import SqlBackend
from ..database import open_store
from ..json_output import print_json, prune_json
from ..program import EXIT_INTERRUPTED, EXIT_OK, PROG
from ..render import new_console, print_prune_batch, print_prune_result

# One batch done: how many workflows it matched, how many it deleted.
Report = Callable[[int, int], None]


def cmd_prune(args: argparse.Namespace) -> int:
    status = WorkflowStatus(args.status)
    older_than: timedelta = args.older_than
    console = None if args.json else new_console()
    batches: list[tuple[int, int]] = []

    def report(matched: int, deleted: int) -> None:
        batches.append((matched, deleted))
        if console is not None:
            print_prune_batch(console, len(batches), args.dry_run, matched=matched, deleted=deleted)

    with open_store(args.url) as (backend, inspector):
        # One cutoff for the whole run, from the database clock: the clock that set the
        # workflows' updated_at.
        cutoff = inspector.now() - older_than
        try:
            if args.dry_run:
                _count(inspector, status, cutoff, args.batch, report)
            else:
                _prune(backend, status, cutoff, args.batch, report)
        except KeyboardInterrupt:
            deleted_so_far = sum(deleted for _, deleted in batches)
            print(f"{PROG}: interrupted after deleting {deleted_so_far}", file=sys.stderr)
            return EXIT_INTERRUPTED
    matched = sum(count for count, _ in batches)
    deleted_total = sum(deleted for _, deleted in batches)
    if console is None:
        print_json(
            prune_json(status, older_than, cutoff, args.dry_run, batches, matched, deleted_total)
        )
    else:
        print_prune_result(
            console, status, older_than, cutoff, args.dry_run, batches, matched, deleted_total
        )
    return EXIT_OK


def _prune(
    backend: SqlBackend, status: WorkflowStatus, cutoff: datetime, batch: int, report: Report
) -> None:
    # Until 0, not until a short batch: a concurrent pruner may have taken part of one.
    while deleted := backend.prune_workflows(
        finished_before=cutoff, statuses=(status,), batch_size=batch
    ):
        report(deleted, deleted)


def _count(
    inspector: StoreInspector,
    status: WorkflowStatus,
    cutoff: datetime,
    batch: int,
    report: Report,
) -> None:
    after: str | None = None
    while ids := inspector.prune_candidates(status, cutoff, after=after, limit=batch):
        report(len(ids), 0)
        if len(ids) < batch:
            break
        after = ids[-1]
