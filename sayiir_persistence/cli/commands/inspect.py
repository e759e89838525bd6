"""``list``, ``show`` and ``claims``: read the store, change nothing."""

from __future__ import annotations

import argparse

from ...model import SignalKind, WorkflowStatus
from ..database import open_store
from ..json_output import claims_json, listing_json, print_json, snapshot_json
from ..program import EXIT_OK
from ..render import new_console, print_claims, print_listing, print_snapshot


def cmd_list(args: argparse.Namespace) -> int:
    status = None if args.status is None else WorkflowStatus(args.status)
    with open_store(args.url) as (backend, inspector):
        # One more than asked: whether there is a next page.
        ids = backend.list_snapshots(status=status, after=args.after, limit=args.limit + 1)
        page = ids[: args.limit]
        summaries = inspector.summaries(page)
    next_after = page[-1] if len(ids) > args.limit else None
    if args.json:
        print_json(listing_json(summaries, next_after))
    else:
        print_listing(new_console(), summaries, status, next_after)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    instance_id: str = args.instance_id
    with open_store(args.url) as (backend, inspector):
        snapshot = backend.load_snapshot(instance_id)
        now, claims = inspector.claims(instance_id=instance_id, include_inactive=True)
        signals = {
            kind: request
            for kind in SignalKind
            if (request := backend.get_signal(instance_id, kind)) is not None
        }
    if args.json:
        print_json(snapshot_json(snapshot, claims, signals, now))
    else:
        print_snapshot(new_console(), snapshot, claims, signals, now)
    return EXIT_OK


def cmd_claims(args: argparse.Namespace) -> int:
    with open_store(args.url) as (_, inspector):
        now, claims = inspector.claims(
            worker_id=args.worker, include_inactive=args.all, limit=args.limit
        )
    if args.json:
        print_json(claims_json(now, claims))
    else:
        print_claims(new_console(), claims, now, include_inactive=args.all, worker=args.worker)
    return EXIT_OK
