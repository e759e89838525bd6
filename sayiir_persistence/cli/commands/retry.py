"""``retry``: re-queue a failed workflow where it failed (``PersistentBackend.retry_workflow``)."""

from __future__ import annotations

import argparse

from ...errors import InvalidStateError
from ...transitions import unfinished_tasks
from ..database import open_store
from ..json_output import print_json, retry_json
from ..program import EXIT_OK
from ..render import new_console, print_retry_outcome


def cmd_retry(args: argparse.Namespace) -> int:
    instance_id: str = args.instance_id
    with open_store(args.url) as (backend, _):
        try:
            snapshot = backend.retry_workflow(instance_id)
        except InvalidStateError as exc:
            raise InvalidStateError(f"cannot retry: {exc}") from exc
    requeued = list(unfinished_tasks(snapshot.position, snapshot.completed_tasks))
    if args.json:
        print_json(retry_json(snapshot, requeued))
    else:
        print_retry_outcome(new_console(), snapshot, requeued)
    return EXIT_OK
