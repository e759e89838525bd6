"""``InMemoryBackend``: the whole contract in process memory, for tests and prototypes.

All state sits behind one ``threading.Lock``: every public call is one critical section,
which makes each call atomic exactly as the SQL backend's transactions are. Nothing
survives the process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from . import transitions
from .attempts import RETRY_WAIT_WORKER, claim_times, past_deadline
from .backend import PersistentBackend
from .completions import apply_completion
from .errors import (
    CannotPauseError,
    ClaimLostError,
    ConflictError,
    NotFoundError,
    WorkflowTerminalError,
)
from .idempotency import (
    check_consume_repeat,
    check_save_repeat,
    check_send_repeat,
    payload_digest,
    snapshot_digest,
)
from .model import (
    AvailableTask,
    ClaimedTask,
    CompletionOutcome,
    CompletionResult,
    IfExists,
    SignalKind,
    SignalRequest,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    utc_now,
)
from .ordering import availability_key
from .stats import (
    LAST_HOUR,
    LAST_MINUTE,
    PriorityBacklog,
    StoreStats,
    WorkerClaims,
    all_statuses,
)
from .telemetry.tracing import traced
from .validation import DEFAULT_MAX_PAYLOAD_BYTES, check_aware, check_limit

Clock = Callable[[], datetime]


@dataclass
class _Claim:
    worker_id: str
    token: int
    claimed_at: datetime
    expires_at: datetime | None
    # Released (or dropped) claims are kept so the next claim's token keeps increasing.
    released: bool = False
    deadline: datetime | None = None
    last_error: str | None = None
    # Tokens handed out before attempts were last counted anew (attempt = token - this).
    attempt_offset: int = 0

    def is_live(self, now: datetime) -> bool:
        return not self.released and (self.expires_at is None or now < self.expires_at)


@dataclass
class _Instance:
    snapshot: WorkflowSnapshot
    claims: dict[str, _Claim] = field(default_factory=dict)
    signals: dict[SignalKind, SignalRequest] = field(default_factory=dict)
    events: dict[str, deque[bytes]] = field(default_factory=dict)
    # Keyed sends (key -> event name, payload digest) and keyed consumptions (key -> event
    # name, payload): they live and go with the instance (see docs/contract.md#send_event).
    sent_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    consumed: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    # Keyed saves: write id -> the version it got, the snapshot's digest.
    writes: dict[str, tuple[int, str]] = field(default_factory=dict)
    # When each result was recorded (the completed_at of SQL's result rows), for store_stats.
    completed_at: dict[str, datetime] = field(default_factory=dict)

    def stamp_results(self, now: datetime) -> None:
        """Record ``now`` for the results that have no recording time yet."""
        for task_id in self.snapshot.completed_tasks:
            self.completed_at.setdefault(task_id, now)


def _copy(snapshot: WorkflowSnapshot) -> WorkflowSnapshot:
    # Payloads are immutable bytes; only the results dict needs its own copy.
    return dataclasses.replace(snapshot, completed_tasks=dict(snapshot.completed_tasks))


def _request_in_utc(request: SignalRequest | None) -> SignalRequest | None:
    if request is None:
        return None
    return dataclasses.replace(request, requested_at=request.requested_at.astimezone(UTC))


def _stored_copy(snapshot: WorkflowSnapshot) -> WorkflowSnapshot:
    """The copy kept by the store: timestamps in UTC and tags frozen, as SQL returns them."""
    return dataclasses.replace(
        snapshot,
        completed_tasks=dict(snapshot.completed_tasks),
        tags=frozenset(snapshot.tags),
        created_at=snapshot.created_at.astimezone(UTC),
        deadline=None if snapshot.deadline is None else snapshot.deadline.astimezone(UTC),
        cancel_request=_request_in_utc(snapshot.cancel_request),
        pause_request=_request_in_utc(snapshot.pause_request),
    )


class InMemoryBackend(PersistentBackend):
    """Dicts guarded by a ``threading`` lock; thread-safe, not shared across processes.

    Args:
        clock: returns the current aware UTC time; expiry and aging are judged by it.
            Tests pass a controllable clock (``sayiir_persistence.testing.ManualClock``)
            and advance it instead of sleeping. Defaults to the system clock.
        max_payload_bytes: see :class:`PersistentBackend`.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes)
        self._clock: Clock = clock or utc_now
        self._lock = threading.Lock()
        self._instances: dict[str, _Instance] = {}
        # Token floors of deleted instances (docs/contract.md#claims): the greatest token
        # their claims reached, which the id's first claims go on from. Never removed.
        self._token_floors: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"InMemoryBackend(instances={len(self._instances)})"

    # -- helpers (call with the lock held) --------------------------------------------------

    def _now(self) -> datetime:
        return check_aware(self._clock(), "clock()")

    def _get(self, instance_id: str) -> _Instance:
        instance = self._instances.get(instance_id)
        if instance is None:
            raise NotFoundError(f"workflow instance {instance_id!r} not found")
        return instance

    @staticmethod
    def _bump(instance: _Instance, now: datetime) -> int:
        instance.snapshot.version += 1
        instance.snapshot.updated_at = now
        instance.stamp_results(now)
        return instance.snapshot.version

    def _write_snapshot(
        self, snapshot: WorkflowSnapshot, existing: _Instance | None, now: datetime
    ) -> int:
        if existing is not None and existing.snapshot.status.is_terminal:
            raise WorkflowTerminalError(
                f"workflow {snapshot.instance_id!r} is {existing.snapshot.status.value}"
            )
        stored = _stored_copy(snapshot)
        if existing is None:
            stored.version = 1
            self._instances[snapshot.instance_id] = _Instance(stored)
        else:
            # A save never removes nor rewrites a stored result (see save_snapshot).
            stored.completed_tasks = {
                **snapshot.completed_tasks,
                **existing.snapshot.completed_tasks,
            }
            # Set when the run began, kept by later saves (docs/contract.md#trace-context).
            stored.created_at = existing.snapshot.created_at
            stored.trace_context = existing.snapshot.trace_context
            stored.version = existing.snapshot.version + 1
            existing.snapshot = stored
        stored.updated_at = now
        self._instances[snapshot.instance_id].stamp_results(now)
        if stored.status is WorkflowStatus.IN_PROGRESS:
            self._announce_work()
        return stored.version

    def _available(
        self, now: datetime, worker_tags: frozenset[str], aging_interval: timedelta
    ) -> Iterator[tuple[tuple[int, int, str, str], _Instance, str]]:
        for instance in self._instances.values():
            snapshot = instance.snapshot
            if instance.signals or not snapshot.tags <= worker_tags:
                continue
            for task_id in snapshot.runnable_task_ids(now):
                claim = instance.claims.get(task_id)
                if claim is not None and claim.is_live(now):
                    continue
                key = availability_key(
                    snapshot.priority,
                    snapshot.updated_at,
                    snapshot.instance_id,
                    task_id,
                    aging_interval,
                )
                yield key, instance, task_id

    @staticmethod
    def _available_task(instance: _Instance, task_id: str) -> AvailableTask:
        snapshot = instance.snapshot
        return AvailableTask(
            instance_id=snapshot.instance_id,
            task_id=task_id,
            definition_hash=snapshot.definition_hash,
            input=snapshot.input_for_position,
            priority=snapshot.priority,
            tags=snapshot.tags,
            snapshot_version=snapshot.version,
            trace_context=snapshot.trace_context,
        )

    def _take_claim(
        self,
        instance: _Instance,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        timeout: timedelta | None,
        now: datetime,
    ) -> TaskClaim:
        previous = instance.claims.get(task_id)
        expires_at, deadline = claim_times(now, ttl, timeout)
        floor = self._token_floors.get(instance.snapshot.instance_id, 0)
        claim = _Claim(
            worker_id=worker_id,
            token=floor + 1 if previous is None else previous.token + 1,
            claimed_at=now,
            expires_at=expires_at,
            deadline=deadline,
            last_error=None if previous is None else previous.last_error,
            attempt_offset=floor if previous is None else previous.attempt_offset,
        )
        instance.claims[task_id] = claim
        return self._to_task_claim(instance, task_id, claim)

    @staticmethod
    def _to_task_claim(instance: _Instance, task_id: str, claim: _Claim) -> TaskClaim:
        return TaskClaim(
            instance_id=instance.snapshot.instance_id,
            task_id=task_id,
            worker_id=claim.worker_id,
            claimed_at=claim.claimed_at,
            expires_at=claim.expires_at,
            token=claim.token,
            pending_signals=frozenset(instance.signals),
            attempt=claim.token - claim.attempt_offset,
            deadline=claim.deadline,
            last_error=claim.last_error,
        )

    def _held_claim(
        self, instance_id: str, task_id: str, worker_id: str, token: int | None
    ) -> tuple[_Instance, _Claim]:
        instance = self._instances.get(instance_id)
        claim = None if instance is None else instance.claims.get(task_id)
        if instance is None or claim is None or claim.released:
            raise NotFoundError(f"no claim on task {task_id!r} of {instance_id!r}")
        if claim.worker_id != worker_id:
            raise ClaimLostError(
                f"task {task_id!r} of {instance_id!r} is claimed by another worker"
            )
        if token is not None and token != claim.token:
            raise ClaimLostError(
                f"task {task_id!r} of {instance_id!r} was claimed anew "
                f"(token {claim.token}, yours {token})"
            )
        return instance, claim

    # -- snapshots ---------------------------------------------------------------------------

    def _start_workflow(self, snapshot: WorkflowSnapshot, if_exists: IfExists) -> WorkflowSnapshot:
        instance_id = snapshot.instance_id
        with self._lock:
            existing = self._instances.get(instance_id)
            dropped: dict[str, _Claim] = {}
            if existing is not None:
                stored = existing.snapshot
                if if_exists is IfExists.FAIL:
                    raise ConflictError(f"workflow {instance_id!r} exists already")
                if if_exists is IfExists.USE_EXISTING:
                    if stored.definition_hash != snapshot.definition_hash:
                        raise ConflictError(
                            f"workflow {instance_id!r} exists with definition "
                            f"{stored.definition_hash!r}, not {snapshot.definition_hash!r}"
                        )
                    return _copy(stored)
                # Replaced: the old claims are dropped but kept, so that the new run's
                # tokens go on from theirs and a holder of an old token stays fenced off;
                # its attempts are counted anew.
                dropped = existing.claims
                for claim in dropped.values():
                    claim.released = True
                    claim.attempt_offset = claim.token
                    claim.last_error = claim.deadline = None
                del self._instances[instance_id]
            self._write_snapshot(snapshot, None, self._now())
            started = self._instances[instance_id]
            started.claims = dropped
            return _copy(started.snapshot)

    def _save_snapshot(self, snapshot: WorkflowSnapshot, expected_version: int | None) -> int:
        with self._lock:
            return self._save_versioned(snapshot, expected_version)

    def _save_snapshot_keyed(
        self, snapshot: WorkflowSnapshot, expected_version: int | None, write_id: str
    ) -> int:
        instance_id = snapshot.instance_id
        with self._lock:
            existing = self._instances.get(instance_id)
            recorded = None if existing is None else existing.writes.get(write_id)
            if recorded is not None:
                check_save_repeat(instance_id, write_id, recorded[1], snapshot)
                return recorded[0]  # saved once already: the version it got
            version = self._save_versioned(snapshot, expected_version)
            self._instances[instance_id].writes[write_id] = (version, snapshot_digest(snapshot))
            return version

    def _save_versioned(self, snapshot: WorkflowSnapshot, expected_version: int | None) -> int:
        existing = self._instances.get(snapshot.instance_id)
        stored_version = 0 if existing is None else existing.snapshot.version
        if expected_version is not None and expected_version != stored_version:
            raise ConflictError(
                f"workflow {snapshot.instance_id!r} is at version {stored_version}, "
                f"expected {expected_version}"
            )
        return self._write_snapshot(snapshot, existing, self._now())

    def _save_snapshot_fenced(
        self, snapshot: WorkflowSnapshot, task_id: str, worker_id: str, token: int | None
    ) -> int | None:
        with self._lock:
            now = self._now()
            existing = self._instances.get(snapshot.instance_id)
            claim = None if existing is None else existing.claims.get(task_id)
            if (
                claim is None
                or not claim.is_live(now)
                or claim.worker_id != worker_id
                or (token is not None and token != claim.token)
            ):
                return None
            return self._write_snapshot(snapshot, existing, now)

    def _save_task_result(self, instance_id: str, task_id: str, output: bytes) -> int:
        with self._lock:
            instance = self._get(instance_id)
            snapshot = instance.snapshot
            if snapshot.status.is_terminal:
                raise WorkflowTerminalError(f"workflow {instance_id!r} is {snapshot.status.value}")
            snapshot.completed_tasks[task_id] = output
            snapshot.last_completed_task_id = task_id
            now = self._now()
            instance.completed_at[task_id] = now  # rewritten: recorded anew, as SQL's upsert
            return self._bump(instance, now)

    def _load_snapshot(self, instance_id: str) -> WorkflowSnapshot:
        with self._lock:
            return _copy(self._get(instance_id).snapshot)

    def _load_task_result(self, instance_id: str, task_id: str) -> bytes | None:
        with self._lock:
            return self._get(instance_id).snapshot.completed_tasks.get(task_id)

    def _delete_snapshot(self, instance_id: str) -> None:
        with self._lock:
            self._get(instance_id)
            self._delete(instance_id)

    def _delete(self, instance_id: str) -> None:
        """Delete an instance and everything attached, keeping its token floor (with the
        lock held)."""
        tokens = [claim.token for claim in self._instances.pop(instance_id).claims.values()]
        if tokens:
            floor = max(max(tokens), self._token_floors.get(instance_id, 0))
            self._token_floors[instance_id] = floor

    def _list_snapshots(
        self, status: WorkflowStatus | None, after: str | None, limit: int | None
    ) -> list[str]:
        with self._lock:
            ids = sorted(
                instance_id
                for instance_id, instance in self._instances.items()
                if (status is None or instance.snapshot.status is status)
                and (after is None or instance_id > after)
            )
        return ids if limit is None else ids[:limit]

    @traced("list_stalled_forks")
    def list_stalled_forks(self, *, limit: int = 100) -> list[str]:
        check_limit(limit)
        with self._lock:
            stalled = sorted(
                instance_id
                for instance_id, instance in self._instances.items()
                if transitions.is_stalled_fork(instance.snapshot)
            )
        return stalled[:limit]

    # -- retention ---------------------------------------------------------------------------

    def _prune_workflows(
        self, finished_before: datetime, statuses: frozenset[WorkflowStatus], batch_size: int
    ) -> int:
        with self._lock:  # chosen and deleted in one critical section: nothing changes between
            doomed = sorted(
                instance_id
                for instance_id, instance in self._instances.items()
                if instance.snapshot.status in statuses
                and instance.snapshot.updated_at < finished_before
            )[:batch_size]
            for instance_id in doomed:
                self._delete(instance_id)  # its claims, signals and events with it
            return len(doomed)

    def _fail_overdue_workflows(self, limit: int) -> list[str]:
        with self._lock:
            now = self._now()
            overdue = sorted(
                (instance.snapshot.deadline, instance_id)
                for instance_id, instance in self._instances.items()
                if instance.snapshot.deadline is not None
                and now >= instance.snapshot.deadline
                and not instance.snapshot.status.is_terminal
            )[:limit]
            for deadline, instance_id in overdue:
                instance = self._instances[instance_id]
                instance.snapshot.status = WorkflowStatus.FAILED
                instance.snapshot.error = transitions.timed_out_error(deadline)
                for claim in instance.claims.values():
                    claim.released = True
                self._bump(instance, now)
            return [instance_id for _, instance_id in overdue]

    # -- claims ------------------------------------------------------------------------------

    def _claim_task(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        timeout: timedelta | None,
    ) -> TaskClaim | None:
        with self._lock:
            instance = self._get(instance_id)
            now = self._now()
            if instance.signals or task_id not in instance.snapshot.runnable_task_ids(now):
                return None
            claim = instance.claims.get(task_id)
            if claim is not None and claim.is_live(now):
                return None
            return self._take_claim(instance, task_id, worker_id, ttl, timeout, now)

    def _release_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, token: int | None
    ) -> None:
        with self._lock:
            _, claim = self._held_claim(instance_id, task_id, worker_id, token)
            claim.released = True
            self._announce_work()

    def _extend_task_claim(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        token: int | None,
    ) -> TaskClaim:
        with self._lock:
            instance, claim = self._held_claim(instance_id, task_id, worker_id, token)
            now = self._now()
            if claim.deadline is not None and now >= claim.deadline:
                raise ClaimLostError(past_deadline(instance_id, task_id, claim.deadline))
            expires_at = None if ttl is None else now + ttl
            if claim.deadline is not None and (expires_at is None or expires_at > claim.deadline):
                expires_at = claim.deadline
            claim.expires_at = expires_at
            return self._to_task_claim(instance, task_id, claim)

    def _find_available_tasks(
        self, worker_id: str, limit: int, tags: frozenset[str], aging_interval: timedelta
    ) -> list[AvailableTask]:
        with self._lock:
            chosen = sorted(self._available(self._now(), tags, aging_interval))[:limit]
            return [self._available_task(instance, task_id) for _, instance, task_id in chosen]

    def _claim_available_tasks(
        self,
        worker_id: str,
        limit: int,
        ttl: timedelta | None,
        tags: frozenset[str],
        aging_interval: timedelta,
        timeout: timedelta | None,
    ) -> list[ClaimedTask]:
        with self._lock:
            now = self._now()
            chosen = sorted(self._available(now, tags, aging_interval))[:limit]
            return [
                ClaimedTask(
                    claim=self._take_claim(instance, task_id, worker_id, ttl, timeout, now),
                    task=self._available_task(instance, task_id),
                )
                for _, instance, task_id in chosen
            ]

    # -- completions -------------------------------------------------------------------------

    def _complete_tasks(
        self,
        completions: list[TaskCompletion],
        ttl: timedelta | None,
        claim_next: int,
        timeout: timedelta | None,
    ) -> list[CompletionResult]:
        with self._lock:
            now = self._now()
            results = []
            for completion in completions:
                result = self._complete(completion, now)
                if result.outcome is CompletionOutcome.RECORDED and claim_next > 0:
                    instance = self._instances[completion.instance_id]
                    next_tasks = self._claim_next(
                        instance, completion.worker_id, ttl, timeout, now, claim_next
                    )
                    claim_next -= len(next_tasks)
                    result = dataclasses.replace(result, next_tasks=next_tasks)
                results.append(result)
            return results

    def _complete(self, completion: TaskCompletion, now: datetime) -> CompletionResult:
        instance = self._instances.get(completion.instance_id)
        claim = None if instance is None else instance.claims.get(completion.task_id)
        held = (
            claim is not None
            and claim.is_live(now)
            and claim.worker_id == completion.worker_id
            and claim.token == completion.token
        )
        applied = apply_completion(
            None if instance is None else instance.snapshot,
            completion,
            claim_held=held,
            check_snapshot=self._check_snapshot,
        )
        if isinstance(applied, CompletionResult):
            if applied.outcome is CompletionOutcome.RETRY_SCHEDULED:
                assert claim is not None and completion.retry_after is not None
                # The claim becomes the wait: held by no worker until the retry is due.
                claim.worker_id = RETRY_WAIT_WORKER
                claim.expires_at = now + completion.retry_after
                claim.deadline = None
                claim.last_error = completion.error
            return applied
        assert instance is not None and claim is not None
        version = self._write_snapshot(applied, instance, now)
        claim.released = True
        return CompletionResult(CompletionOutcome.RECORDED, version=version)

    def _claim_next(
        self,
        instance: _Instance,
        worker_id: str,
        ttl: timedelta | None,
        timeout: timedelta | None,
        now: datetime,
        limit: int,
    ) -> tuple[ClaimedTask, ...]:
        if instance.signals:
            return ()
        claimed: list[ClaimedTask] = []
        for task_id in instance.snapshot.runnable_task_ids(now):
            claim = instance.claims.get(task_id)
            if claim is not None and claim.is_live(now):
                continue
            if len(claimed) == limit:
                break
            claimed.append(
                ClaimedTask(
                    claim=self._take_claim(instance, task_id, worker_id, ttl, timeout, now),
                    task=self._available_task(instance, task_id),
                )
            )
        return tuple(claimed)

    # -- observation -------------------------------------------------------------------------

    def _store_stats(self) -> StoreStats:
        with self._lock:
            now = self._now()
            statuses: dict[WorkflowStatus, int] = {}
            backlog: dict[int, tuple[int, datetime]] = {}  # priority -> count, oldest
            claims: dict[str, list[int]] = {}
            retry_waits = last_minute = last_hour = 0
            for instance in self._instances.values():
                snapshot = instance.snapshot
                statuses[snapshot.status] = statuses.get(snapshot.status, 0) + 1
                # As _available with every tag: the tag rule is the only one left out.
                if not instance.signals:
                    for task_id in snapshot.runnable_task_ids(now):
                        claim = instance.claims.get(task_id)
                        if claim is not None and claim.is_live(now):
                            continue
                        self._add_runnable(backlog, snapshot.priority, snapshot.updated_at)
                for claim in instance.claims.values():
                    if claim.released:
                        continue
                    live = claim.is_live(now)
                    if claim.worker_id == RETRY_WAIT_WORKER:
                        retry_waits += live
                        continue
                    counts = claims.setdefault(claim.worker_id, [0, 0])
                    counts[0 if live else 1] += 1
                for task_id in snapshot.completed_tasks:
                    completed_at = instance.completed_at[task_id]
                    last_minute += now - LAST_MINUTE < completed_at <= now
                    last_hour += now - LAST_HOUR < completed_at <= now
            return StoreStats(
                taken_at=now.astimezone(UTC),
                workflows=all_statuses(statuses),
                runnable=tuple(
                    PriorityBacklog(priority, count, oldest.astimezone(UTC))
                    for priority, (count, oldest) in sorted(backlog.items())
                ),
                claims=tuple(
                    WorkerClaims(worker_id, live, expired)
                    for worker_id, (live, expired) in sorted(claims.items())
                ),
                retry_waits=retry_waits,
                completed_last_minute=last_minute,
                completed_last_hour=last_hour,
            )

    @staticmethod
    def _add_runnable(
        backlog: dict[int, tuple[int, datetime]], priority: int, waiting_since: datetime
    ) -> None:
        count, oldest = backlog.get(priority, (0, waiting_since))
        backlog[priority] = (count + 1, min(oldest, waiting_since))

    # -- signals and events ------------------------------------------------------------------

    def _store_signal(self, instance_id: str, kind: SignalKind, request: SignalRequest) -> None:
        with self._lock:
            instance = self._get(instance_id)
            already = transitions.signal_already_applied(
                instance_id, instance.snapshot.status, kind
            )
            if not already:
                instance.signals.setdefault(kind, _request_in_utc(request) or request)

    def _get_signal(self, instance_id: str, kind: SignalKind) -> SignalRequest | None:
        with self._lock:
            return self._get(instance_id).signals.get(kind)

    def _clear_signal(self, instance_id: str, kind: SignalKind) -> None:
        with self._lock:
            self._get(instance_id).signals.pop(kind, None)

    def _check_and_apply(self, instance_id: str, kind: SignalKind) -> bool:
        with self._lock:
            instance = self._get(instance_id)
            request = instance.signals.get(kind)
            if request is None or not transitions.is_signal_applicable(
                instance.snapshot.status, kind
            ):
                return False
            transitions.apply_signal(instance.snapshot, kind, request)
            for claim in instance.claims.values():
                claim.released = True
            del instance.signals[kind]
            self._bump(instance, self._now())
            return True

    def _unpause(self, instance_id: str) -> WorkflowSnapshot:
        with self._lock:
            instance = self._get(instance_id)
            if instance.snapshot.status is not WorkflowStatus.PAUSED:
                raise CannotPauseError(
                    f"workflow {instance_id!r} is {instance.snapshot.status.value}, not paused"
                )
            transitions.unpause(instance.snapshot)
            self._bump(instance, self._now())
            self._announce_work()
            return _copy(instance.snapshot)

    def _retry_workflow(self, instance_id: str) -> WorkflowSnapshot:
        with self._lock:
            instance = self._get(instance_id)
            transitions.retry(instance.snapshot)
            for claim in instance.claims.values():
                # Dropped as a cancel drops them, and counted anew from the next claim.
                claim.released = True
                claim.attempt_offset = claim.token
                claim.last_error = None
            instance.signals.clear()  # requests made before the failure (see the contract)
            self._bump(instance, self._now())
            retried = _copy(instance.snapshot)
        self._announce_work()
        return retried

    def _send_event(self, instance_id: str, name: str, payload: bytes) -> None:
        with self._lock:
            self._deliver_or_buffer(self._get(instance_id), name, payload)

    def _send_event_keyed(self, instance_id: str, name: str, payload: bytes, key: str) -> None:
        with self._lock:
            instance = self._get(instance_id)
            recorded = instance.sent_keys.get(key)
            if recorded is not None:
                check_send_repeat(instance_id, key, recorded, name, payload)
                return  # sent once already: nothing to do
            self._deliver_or_buffer(instance, name, payload)
            instance.sent_keys[key] = (name, payload_digest(payload))

    def _deliver_or_buffer(self, instance: _Instance, name: str, payload: bytes) -> None:
        if transitions.waits_for_event(instance.snapshot, name):
            transitions.deliver_event(instance.snapshot, payload)
            self._bump(instance, self._now())
            self._announce_work()
        else:
            instance.events.setdefault(name, deque()).append(payload)

    def _consume_event(self, instance_id: str, name: str) -> bytes | None:
        with self._lock:
            queue = self._get(instance_id).events.get(name)
            return queue.popleft() if queue else None

    def _consume_event_keyed(self, instance_id: str, name: str, key: str) -> bytes | None:
        with self._lock:
            instance = self._get(instance_id)
            recorded = instance.consumed.get(key)
            if recorded is not None:
                check_consume_repeat(instance_id, key, recorded[0], name)
                return recorded[1]  # the same event again, not the next one
            queue = instance.events.get(name)
            if not queue:
                return None  # nothing taken, nothing recorded
            payload = queue.popleft()
            instance.consumed[key] = (name, payload)
            return payload
