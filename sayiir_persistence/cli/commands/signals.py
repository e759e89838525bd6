"""``cancel`` and ``pause`` (send the signal and apply it at once) and ``resume``."""

from __future__ import annotations

import argparse
import getpass
from datetime import UTC, datetime

from ...errors import CannotCancelError, CannotPauseError
from ...model import SignalKind, SignalRequest, WorkflowStatus
from ..database import open_store
from ..json_output import print_json, resume_json, signal_json
from ..program import EXIT_OK
from ..render import new_console, print_resume_outcome, print_signal_outcome


def cmd_signal(args: argparse.Namespace) -> int:
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
    with open_store(args.url) as (backend, inspector):
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
        print_json(signal_json(instance_id, verb, outcome, before, after, dropped))
    else:
        print_signal_outcome(new_console(), instance_id, outcome, target, before, dropped)
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    instance_id: str = args.instance_id
    with open_store(args.url) as (backend, _):
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
        print_json(resume_json(instance_id, outcome, snapshot))
    else:
        print_resume_outcome(new_console(), instance_id, outcome, snapshot)
    return EXIT_OK


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor the password database
        return None
