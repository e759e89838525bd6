"""``prune``: delete finished workflows older than a duration, in batches."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from ...errors import NotFoundError
from ...model import WorkflowStatus
from ...sql.backend import SqlBackend
from ..database import open_store
from ..json_output import print_json, prune_json
from ..program import EXIT_INTERRUPTED, EXIT_OK, PROG
from ..render import new_console, print_prune_batch, print_prune_result


def cmd_prune(args: argparse.Namespace) -> int:
    status = WorkflowStatus(args.status)
    older_than: timedelta = args.older_than
    console = None if args.json else new_console()
    batches: list[tuple[int, int]] = []
    with open_store(args.url) as (backend, inspector):
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
                    print_prune_batch(
                        console, len(batches), args.dry_run, matched=len(ids), deleted=deleted
                    )
                if len(ids) < args.batch:
                    break
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


def _delete_all(backend: SqlBackend, instance_ids: list[str]) -> int:
    deleted = 0
    for instance_id in instance_ids:
        try:
            backend.delete_snapshot(instance_id)  # its results, claims, signals, events too
        except NotFoundError:
            continue  # pruned concurrently by someone else
        deleted += 1
    return deleted
