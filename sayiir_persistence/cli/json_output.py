"""The ``--json`` output: one JSON object per command, for scripts.

Times are ISO 8601 in UTC; payloads are ``{"size": N, "base64": "..."}`` (whole, lossless).
Positions and signal requests are the objects the store itself keeps
(:func:`~sayiir_persistence.sql.codec.position_to_dict`,
:func:`~sayiir_persistence.sql.codec.request_to_dict`).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from ..inspection import ClaimInfo, WorkflowSummary
from ..model import SignalKind, SignalRequest, WorkflowSnapshot, WorkflowStatus
from ..sql.codec import position_to_dict, request_to_dict


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def listing_json(summaries: list[WorkflowSummary], next_after: str | None) -> dict[str, Any]:
    """``list``: a page of instances and the ``--after`` of the next page (or ``None``);
    a failed instance also carries its ``error`` and ``failed_tasks``."""
    return {
        "instances": [_summary_json(summary) for summary in summaries],
        "next_after": next_after,
    }


def _summary_json(summary: WorkflowSummary) -> dict[str, Any]:
    instance: dict[str, Any] = {
        "instance_id": summary.instance_id,
        "status": summary.status.value,
        "version": summary.version,
        "updated_at": _iso(summary.updated_at),
    }
    if summary.status is WorkflowStatus.FAILED:
        instance["error"] = summary.error
        instance["failed_tasks"] = list(summary.failed_tasks)
    return instance


def snapshot_json(
    snapshot: WorkflowSnapshot,
    claims: list[ClaimInfo],
    signals: dict[SignalKind, SignalRequest],
    now: datetime,
) -> dict[str, Any]:
    """``show``: the whole snapshot (payloads included), its claims and pending signals."""
    return {
        "instance_id": snapshot.instance_id,
        "definition_hash": snapshot.definition_hash,
        "status": snapshot.status.value,
        "position": position_to_dict(snapshot.position),
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
        "trace_context": snapshot.trace_context,
        "claims": [_claim_json(claim) for claim in claims],
        "pending_signals": {
            kind.value: _request_json(request) for kind, request in signals.items()
        },
        "database_time": _iso(now),
    }


def claims_json(now: datetime, claims: list[ClaimInfo]) -> dict[str, Any]:
    """``claims``: the claims and the database time they were judged by."""
    return {"database_time": _iso(now), "claims": [_claim_json(claim) for claim in claims]}


def signal_json(
    instance_id: str,
    verb: str,
    outcome: str,
    before: WorkflowStatus,
    after: WorkflowStatus,
    dropped: list[ClaimInfo],
) -> dict[str, Any]:
    """``cancel`` / ``pause``: what the signal did and the claims it dropped."""
    return {
        "instance_id": instance_id,
        "action": verb,
        "outcome": outcome,
        "previous_status": before.value,
        "status": after.value,
        "claims_dropped": [_claim_json(claim) for claim in dropped],
    }


def resume_json(instance_id: str, outcome: str, snapshot: WorkflowSnapshot) -> dict[str, Any]:
    """``resume``: ``resumed`` or ``pause_withdrawn``, and where the workflow is now."""
    return {
        "instance_id": instance_id,
        "action": "resume",
        "outcome": outcome,
        "status": snapshot.status.value,
        "version": snapshot.version,
    }


def retry_json(snapshot: WorkflowSnapshot, requeued: list[str]) -> dict[str, Any]:
    """``retry``: the workflow re-queued, at which tasks, and its new version."""
    return {
        "instance_id": snapshot.instance_id,
        "action": "retry",
        "outcome": "requeued",
        "previous_status": WorkflowStatus.FAILED.value,
        "status": snapshot.status.value,
        "version": snapshot.version,
        "position": position_to_dict(snapshot.position),
        "requeued_tasks": requeued,
    }


def prune_json(
    status: WorkflowStatus,
    older_than: timedelta,
    cutoff: datetime,
    dry_run: bool,
    batches: list[tuple[int, int]],
    matched: int,
    deleted: int,
) -> dict[str, Any]:
    """``prune``: the selection, each batch's (matched, deleted) counts and the totals."""
    return {
        "status": status.value,
        "older_than_seconds": older_than.total_seconds(),
        "cutoff": _iso(cutoff),
        "dry_run": dry_run,
        "batches": [{"matched": m, "deleted": d} for m, d in batches],
        "matched": matched,
        "deleted": deleted,
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _payload_json(payload: bytes | None) -> dict[str, Any] | None:
    if payload is None:
        return None
    return {"size": len(payload), "base64": base64.b64encode(payload).decode("ascii")}


def _request_json(request: SignalRequest | None) -> dict[str, Any] | None:
    return None if request is None else request_to_dict(request)


def _claim_json(claim: ClaimInfo) -> dict[str, Any]:
    return {
        "instance_id": claim.instance_id,
        "task_id": claim.task_id,
        "worker_id": claim.worker_id,
        "token": claim.token,
        "claimed_at": _iso(claim.claimed_at),
        "expires_at": _iso(claim.expires_at),
        "state": claim.state.value,
        "attempt": claim.attempt,
        "deadline": _iso(claim.deadline),
        "last_error": claim.last_error,
        "waiting_to_retry": claim.waiting_to_retry,
    }
