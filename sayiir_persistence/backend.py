"""``PersistentBackend``: the contract every store implements.

The public methods validate their arguments (one place for every backend, see
:mod:`sayiir_persistence.validation`) and then call the matching ``_``-prefixed abstract
hook with clean values. A custom backend subclasses this class and implements the hooks;
``sayiir_persistence.testing.BackendContract`` then checks it behaves like the others.
Every backend follows the contract of docs/contract.md, which that suite checks.

Every backend is synchronous and thread-safe: one object is shared by all the threads of
a worker process.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Self

from .attempts import exhausted_error, is_exhausted
from .errors import InvalidInputError, NotFoundError, PersistenceError
from .model import (
    POSITION_TYPES,
    AvailableTask,
    ClaimedTask,
    CompletionResult,
    IfExists,
    SignalKind,
    SignalRequest,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
)
from .retention import (
    DEFAULT_PRUNE_BATCH,
    PRUNABLE_STATUSES,
    check_batch_size,
    check_prunable_statuses,
)
from .stats import StoreStats
from .telemetry.tracing import traced, with_trace_context
from .transitions import is_stalled_fork
from .validation import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    check_aware,
    check_count,
    check_enum,
    check_id,
    check_limit,
    check_optional_aware,
    check_optional_id,
    check_optional_limit,
    check_optional_payload,
    check_optional_traceparent,
    check_payload,
    check_positive_interval,
    check_priority,
    check_tags,
    check_text,
    check_ttl,
    check_version,
)
from .wakeups import LocalWorkWaiter, WorkSignal, WorkWaiter

DEFAULT_AGING_INTERVAL = timedelta(minutes=5)

logger = logging.getLogger(__name__)


class PersistentBackend(ABC):
    """Durable store of workflow snapshots, task claims, signals and events.
    Rules: docs/contract.md (``max_payload_bytes``: docs/contract.md#general-rules).

    Args:
        max_payload_bytes: largest accepted payload (initial input, task output, workflow
            output, event payload), inclusive. Larger ones raise ``InvalidInputError``.
    """

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int):
            raise InvalidInputError("max_payload_bytes must be an int")
        if max_payload_bytes < 1:
            raise InvalidInputError("max_payload_bytes must be positive")
        self.max_payload_bytes = max_payload_bytes
        # Announcements of work within this process (see work_waiter).
        self._work_signal = WorkSignal()

    # -- lifecycle ------------------------------------------------------------------------

    def work_waiter(self) -> WorkWaiter:
        """Something an idle worker can wait on until a task may have become runnable.

        Work is announced by writes that make a task runnable without claiming it (a new
        workflow, a finished step whose next task was not claimed with it, a released claim,
        a resumed workflow); within this process on every backend, and across processes
        where the store can (PostgreSQL). A hint, not a promise: keep polling too, less
        often (an expired claim announces nothing). One waiter per waiting thread; close it
        when done.
        """
        return LocalWorkWaiter(self._work_signal)

    def _announce_work(self) -> None:
        """Wake this process's waiters: call after committing a write that made work."""
        self._work_signal.announce()

    @property
    def _db_system(self) -> str | None:
        """The OpenTelemetry ``db.system`` of the store (``postgresql``, ...), ``None`` when it
        is no database server or file: its calls' spans are ``INTERNAL``, not ``CLIENT``."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing
        """Release resources (connections). The backend must not be used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- snapshots ------------------------------------------------------------------------

    @traced("start_workflow")
    def start_workflow(
        self, snapshot: WorkflowSnapshot, *, if_exists: IfExists = IfExists.FAIL
    ) -> WorkflowSnapshot:
        """Start an instance from a new snapshot, in one atomic step.

        An absent instance is stored as given, at version 1 (as a first save). One that is
        stored already is refused (``FAIL``), returned unchanged if it runs the same
        definition (``USE_EXISTING``), or replaced with everything attached to it
        (``TERMINATE_EXISTING``: the old claims' holders stay fenced off, the new snapshot
        starts at version 1). Returns the stored snapshot; ``snapshot`` itself is not changed.
        Without a ``trace_context``, the snapshot stored carries the ``traceparent`` of this
        call's span when OpenTelemetry traces it (docs/contract.md#trace-context).
        Contract: docs/contract.md#start_workflow.

        Raises:
            ConflictError: ``FAIL`` and the instance exists, or ``USE_EXISTING`` and the
                stored instance has another ``definition_hash``; nothing is written.
            InvalidInputError: the snapshot is malformed or not new (``snapshot.version``
                is not 0), or ``if_exists`` is not an ``IfExists`` (names it).
        """
        self._check_snapshot(snapshot)
        if snapshot.version != 0:
            raise InvalidInputError(
                f"snapshot.version must be 0 (a new snapshot) to start a workflow, got "
                f"{snapshot.version}: build one with WorkflowSnapshot.new"
            )
        policy = check_enum(if_exists, IfExists, "if_exists")
        return self._start_workflow(with_trace_context(snapshot), policy)

    @traced("save_snapshot")
    def save_snapshot(
        self,
        snapshot: WorkflowSnapshot,
        *,
        expected_version: int | None = None,
        write_id: str | None = None,
    ) -> int:
        """Insert or replace the snapshot of ``snapshot.instance_id``.

        Returns the new version (1 on first save, +1 on each save) and sets
        ``snapshot.version``. Task results already stored are kept: a save never removes a
        completed task's output, and an output already stored is not rewritten (use
        :meth:`save_task_result` to replace one).

        With ``write_id`` (an id, unique per workflow instance) the save is applied at most
        once under that id: the id is recorded with the version it got in the same atomic
        step, and a repeat with the same id and snapshot writes nothing and returns that
        version, whatever was written since. So a save whose outcome is unknown
        (``BackendUnavailableError``) is simply repeated: it returns the version if the lost
        call applied it, applies it now if not, or raises ``ConflictError`` if another write
        came first. Write ids live as long as the workflow.
        A snapshot without ``trace_context`` that creates the workflow is stored with the
        ``traceparent`` of this call's span when OpenTelemetry records it;
        ``snapshot.trace_context`` itself is not set (docs/contract.md#trace-context).
        Contract: docs/contract.md#save_snapshot.

        Raises:
            ConflictError: ``expected_version`` is given and differs from the stored version
                (``0`` means "create only if absent"); nothing is written.
            IdempotencyConflictError: ``write_id`` was used for this instance to save
                another snapshot; nothing is written.
            WorkflowTerminalError: the stored workflow is completed, failed or cancelled.
            InvalidInputError: the snapshot is malformed (names the field).
        """
        self._check_snapshot(snapshot)
        if expected_version is not None:
            check_version(expected_version, "expected_version")
        # The trace context of this call, kept by the store only if the save creates the
        # workflow (docs/contract.md#trace-context); not part of a keyed save's identity.
        stored = with_trace_context(snapshot)
        if write_id is None:
            version = self._save_snapshot(stored, expected_version)
        else:
            check_id(write_id, "write_id")
            version = self._save_snapshot_keyed(stored, expected_version, write_id)
        snapshot.version = version
        return version

    @traced("save_snapshot_fenced")
    def save_snapshot_fenced(
        self,
        snapshot: WorkflowSnapshot,
        task_id: str,
        worker_id: str,
        *,
        token: int | None = None,
    ) -> bool:
        """Save only while ``worker_id`` holds a live claim on ``task_id``.

        The claim (and ``token``, when given) is checked in the same atomic step as the
        write. Returns ``False`` and writes nothing when the claim is absent, expired,
        released or held by someone else.
        Contract: docs/contract.md#save_snapshot_fenced.

        Raises:
            WorkflowTerminalError: the stored workflow is completed, failed or cancelled.
            InvalidInputError: bad arguments.
        """
        self._check_snapshot(snapshot)
        check_id(task_id, "task_id")
        check_id(worker_id, "worker_id")
        if token is not None:
            check_version(token, "token")
        version = self._save_snapshot_fenced(snapshot, task_id, worker_id, token)
        if version is None:
            return False
        snapshot.version = version
        return True

    @traced("save_task_result")
    def save_task_result(self, instance_id: str, task_id: str, output: bytes) -> int:
        """Atomically merge one completed task into the stored snapshot.

        Parallel branches never overwrite each other's results. The task becomes the
        snapshot's ``last_completed_task_id`` and is no longer runnable. Returns the new
        version.
        Contract: docs/contract.md#save_task_result.

        Raises:
            NotFoundError: the instance is absent.
            WorkflowTerminalError: the stored workflow is completed, failed or cancelled.
        """
        check_id(instance_id, "instance_id")
        check_id(task_id, "task_id")
        check_payload(output, "output", self.max_payload_bytes)
        return self._save_task_result(instance_id, task_id, output)

    @traced("load_snapshot")
    def load_snapshot(self, instance_id: str) -> WorkflowSnapshot:
        """The stored snapshot. Raises ``NotFoundError`` if absent.
        Contract: docs/contract.md#load_snapshot."""
        check_id(instance_id, "instance_id")
        return self._load_snapshot(instance_id)

    @traced("load_task_result")
    def load_task_result(self, instance_id: str, task_id: str) -> bytes | None:
        """The stored output of ``task_id`` (``None`` if not completed).

        Still answers after the workflow completed or failed. Raises ``NotFoundError`` if
        the instance is absent.
        Contract: docs/contract.md#load_task_result.
        """
        check_id(instance_id, "instance_id")
        check_id(task_id, "task_id")
        return self._load_task_result(instance_id, task_id)

    @traced("delete_snapshot")
    def delete_snapshot(self, instance_id: str) -> None:
        """Remove the instance and everything attached to it (claims, results, signals,
        events). Raises ``NotFoundError`` if absent.
        Contract: docs/contract.md#delete_snapshot."""
        check_id(instance_id, "instance_id")
        self._delete_snapshot(instance_id)

    @traced("list_snapshots")
    def list_snapshots(
        self,
        *,
        status: WorkflowStatus | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Instance ids in ascending order (code point order), keyset-paged.
        Contract: docs/contract.md#list_snapshots.

        Args:
            status: only instances with this status.
            after: only ids strictly greater than this one (the last id of the previous
                page).
            limit: at most this many ids (``None``: all).
        """
        checked_status = None if status is None else check_enum(status, WorkflowStatus, "status")
        check_optional_id(after, "after")
        check_optional_limit(limit)
        return self._list_snapshots(checked_status, after, limit)

    @traced("list_stalled_forks")
    def list_stalled_forks(self, *, limit: int = 100) -> list[str]:
        """Ids (ascending) of in-progress workflows at an ``AtFork`` whose branches are all
        completed, at most ``limit``.

        Such a workflow has no runnable task: it waits for a worker to move it past the join.
        The worker that saves the last branch normally does that at once; a crash between
        that save and the move leaves the workflow here, and ``Worker`` sweeps for it.

        This default pages through :meth:`list_snapshots` and loads every in-progress
        workflow (its cost grows with the store); backends override it with a query.
        Not part of the contract's fixed names: an extension of this library.
        Contract: docs/contract.md#list_stalled_forks.
        """
        check_limit(limit)
        found: list[str] = []
        after: str | None = None
        while len(found) < limit:
            page = self.list_snapshots(status=WorkflowStatus.IN_PROGRESS, after=after, limit=500)
            if not page:
                break
            for instance_id in page:
                try:
                    if is_stalled_fork(self.load_snapshot(instance_id)):
                        found.append(instance_id)
                except NotFoundError:
                    continue  # deleted since the page was read
            after = page[-1]
        return found[:limit]

    @traced("fail_overdue_workflows")
    def fail_overdue_workflows(self, *, limit: int = 100) -> list[str]:
        """Fail the in-progress and paused workflows whose ``deadline`` has passed by the
        store clock, at most ``limit`` (earliest deadline first), in one atomic step; their
        ids. Each is failed as its timeout says: error ``workflow timed out: ...``, version
        +1, its claims dropped (holders fenced off). ``Worker`` calls it every
        ``stall_sweep_every``. Not part of the contract's fixed names: an extension.
        Contract: docs/contract.md#fail_overdue_workflows.

        Raises:
            InvalidInputError: ``limit`` is not a positive int.
        """
        check_limit(limit)
        return self._fail_overdue_workflows(limit)

    # -- claims ---------------------------------------------------------------------------

    @traced("claim_task")
    def claim_task(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        *,
        max_attempts: int | None = None,
        timeout: timedelta | None = None,
    ) -> TaskClaim | None:
        """Claim one task atomically; at most one caller holds a live claim.

        Returns ``None`` when a live claim exists (whoever holds it), when a cancel or
        pause is pending, or when the task is not runnable (workflow not in progress, task
        not among ``runnable_task_ids()`` by the store's clock). An expired claim is taken
        over with a greater fencing token. ``ttl=None``: the claim never expires.
        ``max_attempts`` and ``timeout``: see docs/contract.md#attempts-and-deadlines (an
        attempt past ``max_attempts`` fails the workflow and returns ``None``).
        Contract: docs/contract.md#claim_task.

        Raises:
            NotFoundError: the instance is absent.
        """
        check_id(instance_id, "instance_id")
        check_id(task_id, "task_id")
        check_id(worker_id, "worker_id")
        checked_ttl = check_ttl(ttl)
        checked_max = check_optional_limit(max_attempts, "max_attempts")
        checked_timeout = check_ttl(timeout, "timeout")
        claim = self._claim_task(instance_id, task_id, worker_id, checked_ttl, checked_timeout)
        if claim is None or checked_max is None or not is_exhausted(claim, checked_max):
            return claim
        self._give_up([claim], checked_max)
        return None

    @traced("release_task_claim")
    def release_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, *, token: int | None = None
    ) -> None:
        """Give up a claim (also one that expired but was not taken over).
        Contract: docs/contract.md#release_task_claim.

        Raises:
            NotFoundError: there is no claim on this task.
            ClaimLostError: another worker holds it (or, with ``token``, a newer claim).
        """
        check_id(instance_id, "instance_id")
        check_id(task_id, "task_id")
        check_id(worker_id, "worker_id")
        if token is not None:
            check_version(token, "token")
        self._release_task_claim(instance_id, task_id, worker_id, token)

    @traced("extend_task_claim")
    def extend_task_claim(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        *,
        token: int | None = None,
    ) -> TaskClaim:
        """The heartbeat: set ``expires_at = now + ttl`` (never added to the old expiry).

        Renewing your own claim that expired but was not taken over succeeds. The returned
        claim carries ``pending_signals``.
        Contract: docs/contract.md#extend_task_claim.

        Raises:
            NotFoundError: there is no claim on this task.
            ClaimLostError: another worker holds it (or, with ``token``, a newer claim).
        """
        check_id(instance_id, "instance_id")
        check_id(task_id, "task_id")
        check_id(worker_id, "worker_id")
        checked_ttl = check_ttl(ttl)
        if token is not None:
            check_version(token, "token")
        return self._extend_task_claim(instance_id, task_id, worker_id, checked_ttl, token)

    @traced("find_available_tasks")
    def find_available_tasks(
        self,
        worker_id: str,
        limit: int,
        *,
        tags: Iterable[str] = (),
        aging_interval: timedelta = DEFAULT_AGING_INTERVAL,
    ) -> list[AvailableTask]:
        """Runnable, unclaimed tasks of in-progress workflows with no pending signal.

        A task fits the worker when its workflow's tags are a subset of ``tags``.
        Ordered by effective priority ``priority - waited / aging_interval`` ascending
        (``waited``: time since the snapshot was last saved), then ``updated_at``, then
        ``instance_id`` (then ``task_id``). Does not claim.
        Contract: docs/contract.md#find_available_tasks.
        """
        check_id(worker_id, "worker_id")
        check_limit(limit)
        worker_tags = check_tags(tags)
        check_positive_interval(aging_interval, "aging_interval")
        return self._find_available_tasks(worker_id, limit, worker_tags, aging_interval)

    @traced("claim_available_tasks")
    def claim_available_tasks(
        self,
        worker_id: str,
        limit: int,
        ttl: timedelta | None,
        *,
        tags: Iterable[str] = (),
        aging_interval: timedelta = DEFAULT_AGING_INTERVAL,
        max_attempts: int | None = None,
        timeout: timedelta | None = None,
    ) -> list[ClaimedTask]:
        """Find and claim up to ``limit`` tasks in one atomic step.

        Same selection and order as :meth:`find_available_tasks`. Concurrent callers never
        receive the same task, and a caller is not blocked by rows another caller is
        claiming (it skips them, so it may return fewer than are available).
        ``max_attempts`` and ``timeout``: see docs/contract.md#attempts-and-deadlines (tasks
        past ``max_attempts`` fail their workflows and are left out).
        Contract: docs/contract.md#claim_available_tasks.
        """
        check_id(worker_id, "worker_id")
        check_limit(limit)
        checked_ttl = check_ttl(ttl)
        worker_tags = check_tags(tags)
        check_positive_interval(aging_interval, "aging_interval")
        checked_max = check_optional_limit(max_attempts, "max_attempts")
        checked_timeout = check_ttl(timeout, "timeout")
        claimed = self._claim_available_tasks(
            worker_id, limit, checked_ttl, worker_tags, aging_interval, checked_timeout
        )
        return self._keep_runnable(claimed, checked_max)

    # -- completions ----------------------------------------------------------------------

    @traced("complete_tasks")
    def complete_tasks(
        self,
        completions: Sequence[TaskCompletion],
        *,
        ttl: timedelta | None,
        claim_next: int = 0,
        max_attempts: int | None = None,
        timeout: timedelta | None = None,
    ) -> list[CompletionResult]:
        """Record finished tasks under their claims, in one atomic step.

        Each completion is fenced on its own (docs/contract.md#complete_tasks): while its
        worker holds a live claim with its token, the result is stored (or, with ``error``,
        the workflow is failed), ``advance`` moves the workflow on, and the claim is
        released. With ``claim_next``, up to that many of the completed workflows' newly
        runnable tasks are claimed for the same worker, with ``ttl``, in the same step (and
        ``max_attempts`` and ``timeout``, as :meth:`claim_available_tasks`). A completion with
        ``error`` and ``retry_after`` records a failed attempt instead of failing the
        workflow (docs/contract.md#attempts-and-deadlines).

        Returns one :class:`CompletionResult` per completion, in the order given.

        Raises:
            InvalidInputError: a completion, ``ttl`` or ``claim_next`` is malformed (names
                it); nothing is read or written.
            BackendUnavailableError: the store could not be reached; repeating the call is
                safe (recorded completions released their claims: ``CLAIM_LOST``).
        """
        if isinstance(completions, str | bytes) or not isinstance(completions, Sequence):
            raise InvalidInputError(
                f"completions must be a sequence of TaskCompletion, got "
                f"{type(completions).__name__}"
            )
        items = list(completions)
        for index, completion in enumerate(items):
            self._check_completion(completion, f"completions[{index}]")
        checked_ttl = check_ttl(ttl)
        check_count(claim_next, "claim_next")
        checked_max = check_optional_limit(max_attempts, "max_attempts")
        checked_timeout = check_ttl(timeout, "timeout")
        if not items:
            return []
        results = self._complete_tasks(items, checked_ttl, claim_next, checked_timeout)
        if checked_max is None:
            return results
        return [
            dataclasses.replace(
                result, next_tasks=tuple(self._keep_runnable(list(result.next_tasks), checked_max))
            )
            if result.next_tasks
            else result
            for result in results
        ]

    # -- attempts past the limit -----------------------------------------------------------

    def _keep_runnable(
        self, claimed: list[ClaimedTask], max_attempts: int | None
    ) -> list[ClaimedTask]:
        """The claimed tasks within ``max_attempts``; the others' workflows are failed."""
        exhausted = [c.claim for c in claimed if is_exhausted(c.claim, max_attempts)]
        if not exhausted:
            return claimed
        assert max_attempts is not None
        self._give_up(exhausted, max_attempts)
        return [c for c in claimed if not is_exhausted(c.claim, max_attempts)]

    def _give_up(self, claims: list[TaskClaim], max_attempts: int) -> None:
        """Fail the workflows of tasks past their attempts, under the claims just made.

        Fenced by those claims, so a workflow is failed once however many claimers race; if
        this does not get through, the claim expires and the next claim gives up again.
        """
        failures = [
            TaskCompletion(
                c.instance_id,
                c.task_id,
                c.worker_id,
                c.token,
                error=exhausted_error(c, max_attempts),
            )
            for c in claims
        ]
        for claim in claims:
            logger.warning(
                "task %r of %r: attempt %s is past max_attempts=%s; failing the workflow",
                claim.task_id,
                claim.instance_id,
                claim.attempt,
                max_attempts,
            )
        try:
            self._complete_tasks(failures, None, 0, None)
        except PersistenceError as error:
            logger.warning(
                "could not fail workflows past their attempts (%s): retried at the next claim",
                error,
            )

    # -- retention --------------------------------------------------------------------------

    @traced("prune_workflows")
    def prune_workflows(
        self,
        *,
        finished_before: datetime,
        statuses: Iterable[WorkflowStatus] = PRUNABLE_STATUSES,
        batch_size: int = DEFAULT_PRUNE_BATCH,
    ) -> int:
        """Delete one batch of finished workflows last saved before ``finished_before``.

        Up to ``batch_size`` workflows whose status is one of ``statuses`` (terminal ones
        only: completed, failed, cancelled) and whose ``updated_at`` (the store clock's time
        at which they finished) is strictly before ``finished_before`` are deleted in one
        atomic step, each with its claims, results, signals and events. Status and age are
        checked in that step itself, so a workflow created anew under a pruned id since an
        earlier read is kept. Call again until it returns ``0``; concurrent callers never
        delete a workflow twice and each loop ends with nothing left to prune.
        Not part of the contract's fixed names: an extension of this library.
        Contract: docs/contract.md#prune_workflows.

        Returns:
            How many workflows this call deleted (``0``: none matched).

        Raises:
            InvalidInputError: ``finished_before`` is naive or not a ``datetime``,
                ``statuses`` is empty or holds a status that is not terminal (named), or
                ``batch_size`` is not an int from 1 to ``MAX_PRUNE_BATCH``; nothing is read
                or written.
            BackendUnavailableError: the store could not be reached; the batch was deleted
                whole or not at all, and calling again is safe.
        """
        cutoff = check_aware(finished_before, "finished_before")
        prunable = check_prunable_statuses(statuses)
        size = check_batch_size(batch_size)
        return self._prune_workflows(cutoff, prunable, size)

    # -- observation ------------------------------------------------------------------------

    @traced("store_stats")
    def store_stats(self) -> StoreStats:
        """The queue as an operator sees it, read in one consistent step.

        Workflows by status, runnable tasks by priority (with the oldest one's waiting
        start), unreleased claims by worker (live and expired), scheduled retries waiting,
        and the task results recorded in the last minute and hour, all judged at one moment
        of the store clock (``StoreStats.taken_at``). Reads only. Not part of the contract's
        fixed names: an extension of this library. Contract: docs/contract.md#store_stats.

        Raises:
            BackendUnavailableError: the store could not be reached; nothing was changed.
        """
        return self._store_stats()

    # -- signals and events ---------------------------------------------------------------

    @traced("store_signal")
    def store_signal(self, instance_id: str, kind: SignalKind, request: SignalRequest) -> None:
        """Record a pending cancel or pause request.

        Idempotent: a cancel on a cancelled workflow, a pause on a paused one, or a request
        of a kind already pending succeeds and changes nothing.
        Contract: docs/contract.md#store_signal.

        Raises:
            NotFoundError: the instance is absent.
            CannotCancelError: cancel on a completed or failed workflow.
            CannotPauseError: pause on a completed, failed or cancelled workflow.
            InvalidInputError: ``requested_at`` is naive, or another field is malformed.
        """
        check_id(instance_id, "instance_id")
        checked_kind = check_enum(kind, SignalKind, "kind")
        checked_request = self._check_request(request, "request")
        self._store_signal(instance_id, checked_kind, checked_request)

    @traced("get_signal")
    def get_signal(self, instance_id: str, kind: SignalKind) -> SignalRequest | None:
        """The pending request of that kind, if any. ``NotFoundError`` if absent.
        Contract: docs/contract.md#get_signal."""
        check_id(instance_id, "instance_id")
        return self._get_signal(instance_id, check_enum(kind, SignalKind, "kind"))

    @traced("clear_signal")
    def clear_signal(self, instance_id: str, kind: SignalKind) -> None:
        """Drop a pending request (no error if none). ``NotFoundError`` if absent.
        Contract: docs/contract.md#clear_signal."""
        check_id(instance_id, "instance_id")
        self._clear_signal(instance_id, check_enum(kind, SignalKind, "kind"))

    @traced("check_and_cancel")
    def check_and_cancel(self, instance_id: str) -> bool:
        """Apply a pending cancel atomically.

        On an in-progress or paused workflow with a pending cancel: status becomes
        cancelled, the request is recorded as ``cancel_request``, the instance's claims are
        dropped and the signal is cleared. Returns ``False`` when no cancel is pending or it
        does not apply. ``NotFoundError`` if absent.
        Contract: docs/contract.md#check_and_cancel.
        """
        check_id(instance_id, "instance_id")
        return self._check_and_apply(instance_id, SignalKind.CANCEL)

    @traced("check_and_pause")
    def check_and_pause(self, instance_id: str) -> bool:
        """Apply a pending pause atomically (in-progress workflows only); as
        :meth:`check_and_cancel`, recording ``pause_request``.
        Contract: docs/contract.md#check_and_pause."""
        check_id(instance_id, "instance_id")
        return self._check_and_apply(instance_id, SignalKind.PAUSE)

    @traced("unpause")
    def unpause(self, instance_id: str) -> WorkflowSnapshot:
        """Put a paused workflow back in progress and return the stored snapshot.

        ``pause_request`` is cleared. Raises ``CannotPauseError`` if not paused and
        ``NotFoundError`` if absent.
        Contract: docs/contract.md#unpause.
        """
        check_id(instance_id, "instance_id")
        return self._unpause(instance_id)

    @traced("retry_workflow")
    def retry_workflow(self, instance_id: str) -> WorkflowSnapshot:
        """Re-queue a failed workflow where it failed; return the stored snapshot.

        In one atomic step the workflow is in progress again, its error cleared, its version
        +1; its position and stored results are kept, so the tasks of its position without a
        result (the failed task) are runnable again. Every claim of the instance is dropped
        (an old holder's writes are refused) and attempts are counted anew: each task's next
        claim is attempt 1, with a greater fencing token. Pending signals are cleared.
        Contract: docs/contract.md#retry_workflow.

        Raises:
            InvalidStateError: the workflow is not failed (the message names its status);
                nothing changes.
            NotFoundError: the instance is absent.
            InvalidInputError: ``instance_id`` is malformed.
        """
        check_id(instance_id, "instance_id")
        return self._retry_workflow(instance_id)

    @traced("send_event")
    def send_event(
        self,
        instance_id: str,
        name: str,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
    ) -> None:
        """Deliver an event.

        A workflow in progress at ``AtSignal`` with this ``signal_name`` takes it at once:
        the payload becomes the result of ``signal_id`` and the workflow moves to
        ``AtTask(next_task_id)`` (or completes with the payload as output). Any other event
        is buffered for :meth:`consume_event`. ``NotFoundError`` if absent.

        With ``idempotency_key`` (an id, unique per workflow instance) the event is delivered
        at most once under that key: the key is recorded in the same atomic step as the
        delivery (or buffering), and a repeat with the same key, name and payload does
        nothing and returns as the first did. So a send whose outcome is unknown
        (``BackendUnavailableError``) is simply repeated. Keys live as long as the workflow.
        Contract: docs/contract.md#send_event.

        Raises:
            NotFoundError: the instance is absent.
            IdempotencyConflictError: the key was used for this instance with another
                ``name`` or ``payload``; nothing is written.
            InvalidInputError: bad arguments (``idempotency_key`` is checked as an id).
        """
        check_id(instance_id, "instance_id")
        check_id(name, "name")
        check_payload(payload, "payload", self.max_payload_bytes)
        if idempotency_key is None:
            self._send_event(instance_id, name, payload)
            return
        check_id(idempotency_key, "idempotency_key")
        self._send_event_keyed(instance_id, name, payload, idempotency_key)

    @traced("consume_event")
    def consume_event(
        self, instance_id: str, name: str, *, consumer_key: str | None = None
    ) -> bytes | None:
        """Take the oldest buffered event of that name (FIFO), or ``None``.

        Each event is consumed exactly once across all consumers. With ``consumer_key`` (an
        id, unique per workflow instance) the consumption is recorded under the key in the
        same atomic step as the take, with its payload: a repeat with the same key returns
        that same payload again instead of taking the next event, so a consumer whose call
        had an unknown outcome repeats it and loses nothing. A keyed call that finds no event
        records nothing (a repeat may take an event buffered since). Records live as long as
        the workflow.
        Contract: docs/contract.md#consume_event.

        Raises:
            NotFoundError: the instance is absent.
            IdempotencyConflictError: ``consumer_key`` was used for this instance to consume
                an event of another ``name``; nothing is taken.
            InvalidInputError: bad arguments (``consumer_key`` is checked as an id).
        """
        check_id(instance_id, "instance_id")
        check_id(name, "name")
        if consumer_key is None:
            return self._consume_event(instance_id, name)
        check_id(consumer_key, "consumer_key")
        return self._consume_event_keyed(instance_id, name, consumer_key)

    # -- validation shared by the snapshot-writing methods -----------------------------------

    def _check_completion(self, completion: object, name: str) -> None:
        if not isinstance(completion, TaskCompletion):
            raise InvalidInputError(
                f"{name} must be a TaskCompletion, got {type(completion).__name__}"
            )
        check_id(completion.instance_id, f"{name}.instance_id")
        check_id(completion.task_id, f"{name}.task_id")
        check_id(completion.worker_id, f"{name}.worker_id")
        check_limit(completion.token, f"{name}.token")
        if (completion.output is None) == (completion.error is None):
            raise InvalidInputError(f"{name} must have exactly one of output and error")
        if completion.output is not None:
            check_payload(completion.output, f"{name}.output", self.max_payload_bytes)
        check_text(completion.error, f"{name}.error")
        if completion.retry_after is not None:
            if completion.error is None:
                raise InvalidInputError(f"{name}.retry_after needs an error")
            check_ttl(completion.retry_after, f"{name}.retry_after")
        if completion.advance is not None and not callable(completion.advance):
            raise InvalidInputError(f"{name}.advance must be callable or None")

    def _check_request(self, request: object, name: str) -> SignalRequest:
        if not isinstance(request, SignalRequest):
            raise InvalidInputError(f"{name} must be a SignalRequest, got {type(request).__name__}")
        check_text(request.reason, f"{name}.reason")
        check_text(request.requested_by, f"{name}.requested_by")
        check_aware(request.requested_at, f"{name}.requested_at")
        return request

    def _check_snapshot(self, snapshot: object) -> None:
        if not isinstance(snapshot, WorkflowSnapshot):
            raise InvalidInputError(
                f"snapshot must be a WorkflowSnapshot, got {type(snapshot).__name__}"
            )
        limit = self.max_payload_bytes
        check_id(snapshot.instance_id, "snapshot.instance_id")
        check_id(snapshot.definition_hash, "snapshot.definition_hash")
        check_enum(snapshot.status, WorkflowStatus, "snapshot.status")
        if not isinstance(snapshot.position, POSITION_TYPES):
            raise InvalidInputError(
                f"snapshot.position must be a Position, got {type(snapshot.position).__name__}"
            )
        if not isinstance(snapshot.completed_tasks, dict):
            raise InvalidInputError("snapshot.completed_tasks must be a dict of str to bytes")
        for task_id, output in snapshot.completed_tasks.items():
            check_id(task_id, "snapshot.completed_tasks key")
            check_payload(output, f"snapshot.completed_tasks[{task_id!r}]", limit)
        check_optional_id(snapshot.last_completed_task_id, "snapshot.last_completed_task_id")
        check_optional_id(snapshot.input_task_id, "snapshot.input_task_id")
        check_optional_aware(snapshot.deadline, "snapshot.deadline")
        check_optional_traceparent(snapshot.trace_context, "snapshot.trace_context")
        check_optional_payload(snapshot.initial_input, "snapshot.initial_input", limit)
        check_optional_payload(snapshot.output, "snapshot.output", limit)
        check_text(snapshot.error, "snapshot.error")
        for field_name in ("cancel_request", "pause_request"):
            request = getattr(snapshot, field_name)
            if request is not None:
                self._check_request(request, f"snapshot.{field_name}")
        check_priority(snapshot.priority, "snapshot.priority")
        if not isinstance(snapshot.tags, frozenset | set | tuple | list):
            raise InvalidInputError("snapshot.tags must be a frozenset of str")
        check_tags(snapshot.tags, "snapshot.tags")
        check_aware(snapshot.created_at, "snapshot.created_at")
        check_aware(snapshot.updated_at, "snapshot.updated_at")
        check_version(snapshot.version, "snapshot.version")

    # -- hooks implemented by each backend (arguments already validated) -----------------

    @abstractmethod
    def _start_workflow(self, snapshot: WorkflowSnapshot, if_exists: IfExists) -> WorkflowSnapshot:
        """See :meth:`start_workflow`; return the stored snapshot (a copy of the store's)."""

    @abstractmethod
    def _save_snapshot(self, snapshot: WorkflowSnapshot, expected_version: int | None) -> int:
        """See :meth:`save_snapshot`; return the new version."""

    @abstractmethod
    def _save_snapshot_fenced(
        self, snapshot: WorkflowSnapshot, task_id: str, worker_id: str, token: int | None
    ) -> int | None:
        """See :meth:`save_snapshot_fenced`; return the new version, or ``None`` if the
        claim did not hold (nothing written)."""

    @abstractmethod
    def _save_task_result(self, instance_id: str, task_id: str, output: bytes) -> int:
        """See :meth:`save_task_result`."""

    @abstractmethod
    def _load_snapshot(self, instance_id: str) -> WorkflowSnapshot:
        """See :meth:`load_snapshot`."""

    @abstractmethod
    def _load_task_result(self, instance_id: str, task_id: str) -> bytes | None:
        """See :meth:`load_task_result`."""

    @abstractmethod
    def _delete_snapshot(self, instance_id: str) -> None:
        """See :meth:`delete_snapshot`."""

    @abstractmethod
    def _list_snapshots(
        self, status: WorkflowStatus | None, after: str | None, limit: int | None
    ) -> list[str]:
        """See :meth:`list_snapshots`."""

    @abstractmethod
    def _fail_overdue_workflows(self, limit: int) -> list[str]:
        """See :meth:`fail_overdue_workflows`."""

    @abstractmethod
    def _claim_task(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        timeout: timedelta | None,
    ) -> TaskClaim | None:
        """See :meth:`claim_task` (``max_attempts`` is applied by the caller)."""

    @abstractmethod
    def _release_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, token: int | None
    ) -> None:
        """See :meth:`release_task_claim`."""

    @abstractmethod
    def _extend_task_claim(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: timedelta | None,
        token: int | None,
    ) -> TaskClaim:
        """See :meth:`extend_task_claim`."""

    @abstractmethod
    def _find_available_tasks(
        self, worker_id: str, limit: int, tags: frozenset[str], aging_interval: timedelta
    ) -> list[AvailableTask]:
        """See :meth:`find_available_tasks`."""

    @abstractmethod
    def _claim_available_tasks(
        self,
        worker_id: str,
        limit: int,
        ttl: timedelta | None,
        tags: frozenset[str],
        aging_interval: timedelta,
        timeout: timedelta | None,
    ) -> list[ClaimedTask]:
        """See :meth:`claim_available_tasks` (``max_attempts`` is applied by the caller)."""

    @abstractmethod
    def _complete_tasks(
        self,
        completions: list[TaskCompletion],
        ttl: timedelta | None,
        claim_next: int,
        timeout: timedelta | None,
    ) -> list[CompletionResult]:
        """See :meth:`complete_tasks` (at least one completion; ``max_attempts`` is applied
        by the caller)."""

    @abstractmethod
    def _prune_workflows(
        self, finished_before: datetime, statuses: frozenset[WorkflowStatus], batch_size: int
    ) -> int:
        """See :meth:`prune_workflows` (``finished_before`` in UTC, ``statuses`` terminal)."""

    @abstractmethod
    def _store_stats(self) -> StoreStats:
        """See :meth:`store_stats`."""

    @abstractmethod
    def _store_signal(self, instance_id: str, kind: SignalKind, request: SignalRequest) -> None:
        """See :meth:`store_signal`."""

    @abstractmethod
    def _get_signal(self, instance_id: str, kind: SignalKind) -> SignalRequest | None:
        """See :meth:`get_signal`."""

    @abstractmethod
    def _clear_signal(self, instance_id: str, kind: SignalKind) -> None:
        """See :meth:`clear_signal`."""

    @abstractmethod
    def _check_and_apply(self, instance_id: str, kind: SignalKind) -> bool:
        """See :meth:`check_and_cancel` and :meth:`check_and_pause`."""

    @abstractmethod
    def _unpause(self, instance_id: str) -> WorkflowSnapshot:
        """See :meth:`unpause`."""

    @abstractmethod
    def _retry_workflow(self, instance_id: str) -> WorkflowSnapshot:
        """See :meth:`retry_workflow`."""

    @abstractmethod
    def _send_event(self, instance_id: str, name: str, payload: bytes) -> None:
        """See :meth:`send_event`."""

    @abstractmethod
    def _consume_event(self, instance_id: str, name: str) -> bytes | None:
        """See :meth:`consume_event`."""

    # Keyed saves, sends and consumes: not abstract, so that a backend written before them still
    # loads; one that does not implement them refuses keyed calls (the conformance suite
    # says so) rather than ignoring the key.

    def _save_snapshot_keyed(
        self, snapshot: WorkflowSnapshot, expected_version: int | None, write_id: str
    ) -> int:
        """See :meth:`save_snapshot` with ``write_id``: a recorded ``write_id`` returns its
        version (judged by :func:`~sayiir_persistence.idempotency.check_save_repeat`) before
        ``expected_version`` and the terminal guard are checked; else save as
        :meth:`_save_snapshot` and record the id, the version and
        :func:`~sayiir_persistence.idempotency.snapshot_digest` in the same atomic step."""
        raise NotImplementedError(f"{type(self).__name__} does not support write_id")

    def _send_event_keyed(self, instance_id: str, name: str, payload: bytes, key: str) -> None:
        """See :meth:`send_event` with ``idempotency_key``: record ``key`` (with ``name`` and
        a digest of ``payload``, see :mod:`sayiir_persistence.idempotency`) in the same
        atomic step as the delivery; a repeat is judged by
        :func:`~sayiir_persistence.idempotency.check_send_repeat`."""
        raise NotImplementedError(f"{type(self).__name__} does not support idempotency_key")

    def _consume_event_keyed(self, instance_id: str, name: str, key: str) -> bytes | None:
        """See :meth:`consume_event` with ``consumer_key``: record the consumption (name and
        payload) under ``key`` in the same atomic step as the take; a repeat returns the
        recorded payload (judged by
        :func:`~sayiir_persistence.idempotency.check_consume_repeat`)."""
        raise NotImplementedError(f"{type(self).__name__} does not support consumer_key")
