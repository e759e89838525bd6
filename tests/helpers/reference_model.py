"""A small reference model of the store contract (docs/contract.md), for the model-based tests.

Plain dictionaries, written from the contract and nothing else (no code of the library's
backends): each method does what docs/contract.md says the matching ``PersistentBackend``
method does, raising the library's error classes, and leaves the model untouched when it raises.

What is left out on purpose:

- Time is an integer count of seconds since the start of a run ("virtual time"). The model
  never sees a ``datetime`` of the store's clock; the test converts (see
  ``test_model_based.py``), so delays here carry their wake time in virtual seconds
  (:class:`Delay`) instead of an ``AtDelay`` with a ``datetime``.
- Fencing tokens: the contract only says a new claim's token is greater than every earlier
  token of that task, those of deleted instances of the same id included.
  :meth:`ReferenceModel.claim_task` answers the least acceptable token and
  :meth:`ReferenceModel.grant` records the token the store actually chose; the claims of
  deleted instances are kept apart (:attr:`ReferenceModel.retired`), for their tokens only.
- Which of several equally ranked tasks ``claim_available_tasks`` hands out when its limit
  cuts through them: :meth:`ReferenceModel.available` ranks the candidates, the test checks
  the store's choice against the ranking and grants what the store chose.
- Which of the prunable workflows one ``prune_workflows`` batch deletes (the contract leaves
  it open): :meth:`ReferenceModel.prunable` lists them, the test checks the store's count and
  choice against it and :meth:`ReferenceModel.prune` deletes what the store chose.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from sayiir_persistence import (
    AtFork,
    AtSignal,
    AtTask,
    CannotCancelError,
    CannotPauseError,
    ClaimLostError,
    CompletionOutcome,
    ConflictError,
    IdempotencyConflictError,
    IfExists,
    InvalidStateError,
    NotFoundError,
    NotStarted,
    SignalKind,
    SignalRequest,
    WorkflowStatus,
    WorkflowTerminalError,
)

TERMINAL = frozenset({WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED})


@dataclass(frozen=True)
class Delay:
    """``AtDelay`` in virtual time: ``next_task_id`` is runnable from ``wake_at`` (seconds) on."""

    delay_id: str
    wake_at: int
    next_task_id: str | None


ModelPosition = NotStarted | AtTask | AtFork | Delay | AtSignal


@dataclass(frozen=True)
class Draft:
    """A snapshot as a caller hands it to ``save_snapshot`` (every field the caller sets)."""

    instance_id: str
    definition_hash: str
    status: WorkflowStatus
    position: ModelPosition
    completed_tasks: dict[str, bytes]
    last_completed_task_id: str | None
    input_task_id: str | None
    initial_input: bytes | None
    output: bytes | None
    error: str | None
    cancel_request: SignalRequest | None
    pause_request: SignalRequest | None
    priority: int
    tags: frozenset[str]
    created_at: datetime
    trace_context: str | None


@dataclass
class Claim:
    worker_id: str
    token: int
    claimed_at: int
    expires_at: int | None
    released: bool = False
    attempt: int = 1
    deadline: int | None = None
    last_error: str | None = None

    def is_live(self, now: int) -> bool:
        return not self.released and (self.expires_at is None or now < self.expires_at)


@dataclass
class Workflow:
    """One stored instance: its snapshot fields and everything attached to it."""

    draft: Draft  # the last saved snapshot, with the fields the store changes overridden:
    status: WorkflowStatus
    position: ModelPosition
    completed_tasks: dict[str, bytes]
    last_completed_task_id: str | None
    input_task_id: str | None
    output: bytes | None
    cancel_request: SignalRequest | None
    pause_request: SignalRequest | None
    created_at: datetime
    trace_context: str | None  # set when the run began, kept by later writes
    version: int
    updated_at: int
    # Claims stay after release (the next token must still be greater).
    claims: dict[str, Claim] = field(default_factory=dict)
    signals: dict[SignalKind, SignalRequest] = field(default_factory=dict)
    events: dict[str, deque[bytes]] = field(default_factory=dict)
    # Keyed calls of this run (docs/contract.md#keys-and-unknown-outcomes): idempotency key ->
    # the event sent (name, payload); consumer key -> the event taken (name, payload).
    sent_keys: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    consumed: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def runnable_task_ids(self, now: int) -> list[str]:
        """Tasks runnable by position and clock, not completed (none unless in progress)."""
        if self.status is not WorkflowStatus.IN_PROGRESS:
            return []
        match self.position:
            case AtTask(task_id=task_id):
                tasks = [task_id]
            case AtFork(branch_task_ids=branches):
                tasks = list(dict.fromkeys(branches))
            case Delay(wake_at=wake_at, next_task_id=str() as next_task_id) if wake_at <= now:
                tasks = [next_task_id]
            case _:
                tasks = []
        return [task for task in tasks if task not in self.completed_tasks]

    @property
    def input_for_position(self) -> bytes | None:
        if self.input_task_id is None:
            return self.draft.initial_input
        return self.completed_tasks.get(self.input_task_id)

    def bump(self, now: int) -> int:
        self.version += 1
        self.updated_at = now
        return self.version


@dataclass(frozen=True)
class ExpectedClaim:
    """A claim the store must return; its token must be at least ``min_token``."""

    instance_id: str
    task_id: str
    worker_id: str
    claimed_at: int
    expires_at: int | None
    min_token: int
    pending_signals: frozenset[SignalKind]
    attempt: int = 1
    deadline: int | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class Candidate:
    """An available task: what ``AvailableTask`` must say, and its rank.

    ``rank`` is ``(priority * aging + updated_at, updated_at)`` in virtual seconds: lower is
    handed out first. The contract breaks remaining ties by the exact ``updated_at`` and then
    ``instance_id``; tasks of one instance share ``updated_at`` and go by ``task_id``.
    """

    instance_id: str
    task_id: str
    definition_hash: str
    input: bytes | None
    priority: int
    tags: frozenset[str]
    snapshot_version: int
    trace_context: str | None
    rank: tuple[int, int]


@dataclass(frozen=True)
class Step:
    """What a completion's advance function does to the snapshot it is given."""

    kind: str  # "move" (to ``position``), "complete" (output b"done"), "fail" ("boom"), "raise"
    position: ModelPosition | None = None


@dataclass(frozen=True)
class Completion:
    """A ``TaskCompletion`` as the model sees it (``step=None``: no advance function)."""

    instance_id: str
    task_id: str
    worker_id: str
    token: int
    output: bytes | None
    error: str | None
    step: Step | None
    retry_after: int | None = None


@dataclass(frozen=True)
class ExpectedCompletion:
    outcome: CompletionOutcome
    version: int | None = None
    next_claims: tuple[tuple[ExpectedClaim, Candidate], ...] = ()


def _position_tasks(position: ModelPosition) -> list[str]:
    """A position's tasks, whatever the time (a delay's next task too)."""
    match position:
        case AtTask(task_id=task_id):
            return [task_id]
        case AtFork(branch_task_ids=branches):
            return list(branches)
        case Delay(next_task_id=str() as next_task_id):
            return [next_task_id]
        case _:
            return []


class ReferenceModel:
    def __init__(self) -> None:
        self.now = 0
        self.workflows: dict[str, Workflow] = {}
        # The last claim of each (instance, task) of a deleted instance (delete_snapshot,
        # prune_workflows): a claim of the id created again must have a greater token, and
        # its holder is fenced off (docs/contract.md#claims).
        self.retired: dict[tuple[str, str], Claim] = {}

    def advance(self, seconds: int) -> None:
        assert seconds >= 0
        self.now += seconds

    def _get(self, instance_id: str) -> Workflow:
        if instance_id not in self.workflows:
            raise NotFoundError(instance_id)
        return self.workflows[instance_id]

    # -- snapshots ---------------------------------------------------------------------------

    def _write(self, draft: Draft) -> int:
        """Insert or replace; stored results win over the draft's (a save never rewrites one)."""
        existing = self.workflows.get(draft.instance_id)
        if existing is not None and existing.status in TERMINAL:
            raise WorkflowTerminalError(draft.instance_id)
        completed = dict(draft.completed_tasks)
        if existing is not None:
            completed.update(existing.completed_tasks)
        workflow = Workflow(
            draft=draft,
            status=draft.status,
            position=draft.position,
            completed_tasks=completed,
            last_completed_task_id=draft.last_completed_task_id,
            input_task_id=draft.input_task_id,
            output=draft.output,
            cancel_request=draft.cancel_request,
            pause_request=draft.pause_request,
            created_at=draft.created_at if existing is None else existing.created_at,
            trace_context=draft.trace_context if existing is None else existing.trace_context,
            version=1 if existing is None else existing.version + 1,
            updated_at=self.now,
        )
        if existing is not None:  # claims, signals, events and keys belong to the instance
            workflow.claims = existing.claims
            workflow.signals = existing.signals
            workflow.events = existing.events
            workflow.sent_keys = existing.sent_keys
            workflow.consumed = existing.consumed
        self.workflows[draft.instance_id] = workflow
        return workflow.version

    def start_workflow(self, draft: Draft, if_exists: IfExists) -> Workflow:
        """Absent: stored as a first save. Existing: refused, used, or replaced at version 1
        with its claims dropped but kept (the next token is still greater)."""
        existing = self.workflows.get(draft.instance_id)
        claims: dict[str, Claim] = {}
        if existing is not None:
            if if_exists is IfExists.FAIL:
                raise ConflictError(draft.instance_id)
            if if_exists is IfExists.USE_EXISTING:
                if existing.draft.definition_hash != draft.definition_hash:
                    raise ConflictError(draft.instance_id)
                return existing
            claims = existing.claims
            for claim in claims.values():
                claim.released = True
                claim.attempt, claim.last_error, claim.deadline = 0, None, None  # counted anew
            del self.workflows[draft.instance_id]
        self._write(draft)
        started = self.workflows[draft.instance_id]
        started.claims = claims
        return started

    def save_snapshot(self, draft: Draft, expected_version: int | None) -> int:
        existing = self.workflows.get(draft.instance_id)
        stored_version = 0 if existing is None else existing.version
        if expected_version is not None and expected_version != stored_version:
            raise ConflictError(draft.instance_id)
        return self._write(draft)

    def save_snapshot_fenced(
        self, draft: Draft, task_id: str, worker_id: str, token: int | None
    ) -> bool:
        workflow = self.workflows.get(draft.instance_id)
        claim = None if workflow is None else workflow.claims.get(task_id)
        if (
            claim is None
            or not claim.is_live(self.now)
            or claim.worker_id != worker_id
            or (token is not None and token != claim.token)
        ):
            return False
        self._write(draft)
        return True

    def save_task_result(self, instance_id: str, task_id: str, output: bytes) -> int:
        workflow = self._get(instance_id)
        if workflow.status in TERMINAL:
            raise WorkflowTerminalError(instance_id)
        workflow.completed_tasks[task_id] = output
        workflow.last_completed_task_id = task_id
        return workflow.bump(self.now)

    def load_snapshot(self, instance_id: str) -> Workflow:
        return self._get(instance_id)

    def load_task_result(self, instance_id: str, task_id: str) -> bytes | None:
        return self._get(instance_id).completed_tasks.get(task_id)

    def delete_snapshot(self, instance_id: str) -> None:
        self._get(instance_id)
        self._delete(instance_id)

    def _delete(self, instance_id: str) -> None:
        """Delete an instance and everything attached; its claims' tokens are retired."""
        for task_id, claim in self.workflows.pop(instance_id).claims.items():
            self.retired[(instance_id, task_id)] = claim

    def retired_token(self, instance_id: str, task_id: str) -> int:
        """The greatest token of the task in deleted instances of the id (0: none)."""
        claim = self.retired.get((instance_id, task_id))
        return 0 if claim is None else claim.token

    def list_snapshots(
        self, status: WorkflowStatus | None, after: str | None, limit: int | None
    ) -> list[str]:
        ids = sorted(
            instance_id
            for instance_id, workflow in self.workflows.items()
            if (status is None or workflow.status is status)
            and (after is None or instance_id > after)
        )
        return ids if limit is None else ids[:limit]

    def prunable(self, finished_before: int, statuses: frozenset[WorkflowStatus]) -> list[str]:
        """What ``prune_workflows`` may delete (it chooses which ``batch_size`` of them):
        terminal workflows of ``statuses`` last saved strictly before ``finished_before``."""
        return sorted(
            instance_id
            for instance_id, workflow in self.workflows.items()
            if workflow.status in TERMINAL & statuses and workflow.updated_at < finished_before
        )

    def prune(self, instance_ids: set[str]) -> None:
        """Delete the workflows a ``prune_workflows`` call chose, everything attached."""
        for instance_id in instance_ids:
            self._delete(instance_id)

    # -- claims ------------------------------------------------------------------------------

    def claim_task(
        self,
        instance_id: str,
        task_id: str,
        worker_id: str,
        ttl: int | None,
        timeout: int | None = None,
    ) -> ExpectedClaim | None:
        """Whether the claim must be granted (a query: :meth:`grant` records it). An attempt
        past a limit is granted too: see :meth:`give_up`."""
        workflow = self._get(instance_id)
        if workflow.signals or task_id not in workflow.runnable_task_ids(self.now):
            return None
        claim = workflow.claims.get(task_id)
        if claim is not None and claim.is_live(self.now):
            return None
        # Expiry at the earlier of the ttl and the deadline (docs/contract.md#attempts-...).
        lifetimes = [t for t in (ttl, timeout) if t is not None]
        return ExpectedClaim(
            instance_id=instance_id,
            task_id=task_id,
            worker_id=worker_id,
            claimed_at=self.now,
            expires_at=self.now + min(lifetimes) if lifetimes else None,
            min_token=1
            + (self.retired_token(instance_id, task_id) if claim is None else claim.token),
            pending_signals=frozenset(),
            attempt=1 if claim is None else claim.attempt + 1,
            deadline=None if timeout is None else self.now + timeout,
            last_error=None if claim is None else claim.last_error,
        )

    def grant(self, expected: ExpectedClaim, token: int) -> None:
        """Record a claim the store granted with ``token``."""
        previous = self.workflows[expected.instance_id].claims.get(expected.task_id)
        assert previous is None or token > previous.token, "fencing token did not increase"
        retired = self.retired_token(expected.instance_id, expected.task_id)
        assert token > retired, "fencing token repeated one of a deleted instance"
        self.workflows[expected.instance_id].claims[expected.task_id] = Claim(
            worker_id=expected.worker_id,
            token=token,
            claimed_at=expected.claimed_at,
            expires_at=expected.expires_at,
            attempt=expected.attempt,
            deadline=expected.deadline,
            last_error=expected.last_error,
        )

    def give_up(self, expected: ExpectedClaim, max_attempts: int) -> None:
        """A claim past ``max_attempts`` was granted: its workflow is failed under it."""
        self.grant(expected, expected.min_token)
        attempts = f"{max_attempts} attempt{'s' if max_attempts != 1 else ''}"
        reason = expected.last_error or (
            "no attempt reported a result (each claim expired: its worker stopped, or the "
            "task passed its deadline)"
        )
        error = f"task {expected.task_id!r} failed after {attempts}: {reason}"
        self._complete(
            Completion(
                expected.instance_id,
                expected.task_id,
                expected.worker_id,
                expected.min_token,
                output=None,
                error=error,
                step=None,
            )
        )

    def settle_token(self, instance_id: str, task_id: str, token: int) -> None:
        """The store chose ``token`` for a claim recorded with its least acceptable token."""
        claim = self.workflows[instance_id].claims[task_id]
        assert token >= claim.token, "fencing token did not increase"
        claim.token = token

    def _held(self, instance_id: str, task_id: str, worker_id: str, token: int | None) -> Claim:
        workflow = self.workflows.get(instance_id)
        claim = None if workflow is None else workflow.claims.get(task_id)
        if claim is None or claim.released:
            raise NotFoundError(f"{instance_id}/{task_id}")
        if claim.worker_id != worker_id:
            raise ClaimLostError(f"{instance_id}/{task_id} is held by {claim.worker_id}")
        if token is not None and token != claim.token:
            raise ClaimLostError(f"{instance_id}/{task_id} has token {claim.token}")
        return claim

    def release_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, token: int | None
    ) -> None:
        self._held(instance_id, task_id, worker_id, token).released = True

    def extend_task_claim(
        self, instance_id: str, task_id: str, worker_id: str, ttl: int | None, token: int | None
    ) -> ExpectedClaim:
        claim = self._held(instance_id, task_id, worker_id, token)
        if claim.deadline is not None:
            if self.now >= claim.deadline:
                raise ClaimLostError(f"{instance_id}/{task_id} passed its deadline")
            claim.expires_at = (
                claim.deadline if ttl is None else min(self.now + ttl, claim.deadline)
            )
        else:
            claim.expires_at = None if ttl is None else self.now + ttl
        return ExpectedClaim(
            instance_id=instance_id,
            task_id=task_id,
            worker_id=worker_id,
            claimed_at=claim.claimed_at,
            expires_at=claim.expires_at,
            min_token=claim.token,
            pending_signals=frozenset(self.workflows[instance_id].signals),
            attempt=claim.attempt,
            deadline=claim.deadline,
            last_error=claim.last_error,
        )

    def available(self, worker_tags: frozenset[str], aging: int) -> list[Candidate]:
        """Every available task for a worker with ``worker_tags``, best first."""
        candidates = []
        for instance_id, workflow in self.workflows.items():
            if workflow.signals or not workflow.draft.tags <= worker_tags:
                continue
            for task_id in workflow.runnable_task_ids(self.now):
                claim = workflow.claims.get(task_id)
                if claim is not None and claim.is_live(self.now):
                    continue
                priority = workflow.draft.priority
                candidates.append(
                    Candidate(
                        instance_id=instance_id,
                        task_id=task_id,
                        definition_hash=workflow.draft.definition_hash,
                        input=workflow.input_for_position,
                        priority=priority,
                        tags=workflow.draft.tags,
                        snapshot_version=workflow.version,
                        trace_context=workflow.trace_context,
                        rank=(priority * aging + workflow.updated_at, workflow.updated_at),
                    )
                )
        return sorted(candidates, key=lambda c: (c.rank, c.instance_id, c.task_id))

    # -- completions -------------------------------------------------------------------------

    def complete_tasks(
        self,
        completions: list[Completion],
        ttl: int | None,
        claim_next: int,
        timeout: int | None = None,
    ) -> list[ExpectedCompletion]:
        """Records as the contract says; next claims are recorded with their least token
        (:meth:`settle_token` corrects it to the store's)."""
        expected = []
        for completion in completions:
            result = self._complete(completion)
            if result.outcome is CompletionOutcome.RECORDED and claim_next > 0:
                claims = self._claim_next(completion, ttl, timeout, claim_next)
                claim_next -= len(claims)
                result = dataclasses.replace(result, next_claims=claims)
            expected.append(result)
        return expected

    def _complete(self, completion: Completion) -> ExpectedCompletion:
        workflow = self.workflows.get(completion.instance_id)
        if workflow is None:
            return ExpectedCompletion(CompletionOutcome.NOT_FOUND)
        claim = workflow.claims.get(completion.task_id)
        if (
            claim is None
            or not claim.is_live(self.now)
            or claim.worker_id != completion.worker_id
            or claim.token != completion.token
        ):
            return ExpectedCompletion(CompletionOutcome.CLAIM_LOST)
        if workflow.status is not WorkflowStatus.IN_PROGRESS:
            return ExpectedCompletion(CompletionOutcome.NOT_IN_PROGRESS)
        task_id = completion.task_id
        if task_id in workflow.completed_tasks or task_id not in _position_tasks(workflow.position):
            return ExpectedCompletion(CompletionOutcome.NOT_RUNNABLE)
        if completion.retry_after is not None:
            # The claim becomes the wait for the retry: held by no worker until it is due.
            claim.worker_id = ""
            claim.expires_at = self.now + completion.retry_after
            claim.deadline = None
            claim.last_error = completion.error
            return ExpectedCompletion(CompletionOutcome.RETRY_SCHEDULED)
        step = completion.step
        if completion.error is None and step is not None and step.kind == "raise":
            return ExpectedCompletion(CompletionOutcome.ADVANCE_FAILED)
        if completion.error is not None:
            workflow.status = WorkflowStatus.FAILED
            workflow.draft = dataclasses.replace(workflow.draft, error=completion.error)
        else:
            assert completion.output is not None
            workflow.completed_tasks[task_id] = completion.output
            workflow.last_completed_task_id = task_id
            if step is not None and step.kind == "move":
                assert step.position is not None
                workflow.position = step.position
                workflow.input_task_id = task_id
            elif step is not None and step.kind == "complete":
                workflow.status = WorkflowStatus.COMPLETED
                workflow.output = b"done"
            elif step is not None and step.kind == "fail":
                workflow.status = WorkflowStatus.FAILED
                workflow.draft = dataclasses.replace(workflow.draft, error="boom")
        claim.released = True
        return ExpectedCompletion(CompletionOutcome.RECORDED, version=workflow.bump(self.now))

    def _claim_next(
        self, completion: Completion, ttl: int | None, timeout: int | None, limit: int
    ) -> tuple[tuple[ExpectedClaim, Candidate], ...]:
        workflow = self.workflows[completion.instance_id]
        if workflow.signals:
            return ()
        claims: list[tuple[ExpectedClaim, Candidate]] = []
        for task_id in workflow.runnable_task_ids(self.now):
            if len(claims) == limit:
                break
            expected = self.claim_task(
                completion.instance_id, task_id, completion.worker_id, ttl, timeout
            )
            if expected is None:
                continue
            self.grant(expected, expected.min_token)
            task = Candidate(
                instance_id=completion.instance_id,
                task_id=task_id,
                definition_hash=workflow.draft.definition_hash,
                input=workflow.input_for_position,
                priority=workflow.draft.priority,
                tags=workflow.draft.tags,
                snapshot_version=workflow.version,
                trace_context=workflow.trace_context,
                rank=(0, 0),
            )
            claims.append((expected, task))
        return tuple(claims)

    # -- signals and events ------------------------------------------------------------------

    def store_signal(self, instance_id: str, kind: SignalKind, request: SignalRequest) -> None:
        workflow = self._get(instance_id)
        status = workflow.status
        if kind is SignalKind.CANCEL:
            if status in (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED):
                raise CannotCancelError(instance_id)
            if status is WorkflowStatus.CANCELLED:
                return
        else:
            if status in TERMINAL:
                raise CannotPauseError(instance_id)
            if status is WorkflowStatus.PAUSED:
                return
        workflow.signals.setdefault(kind, request)  # the first pending request stays

    def get_signal(self, instance_id: str, kind: SignalKind) -> SignalRequest | None:
        return self._get(instance_id).signals.get(kind)

    def clear_signal(self, instance_id: str, kind: SignalKind) -> None:
        self._get(instance_id).signals.pop(kind, None)

    def check_and_apply(self, instance_id: str, kind: SignalKind) -> bool:
        workflow = self._get(instance_id)
        request = workflow.signals.get(kind)
        if kind is SignalKind.CANCEL:
            applies = workflow.status in (WorkflowStatus.IN_PROGRESS, WorkflowStatus.PAUSED)
        else:
            applies = workflow.status is WorkflowStatus.IN_PROGRESS
        if request is None or not applies:
            return False
        if kind is SignalKind.CANCEL:
            workflow.status = WorkflowStatus.CANCELLED
            workflow.cancel_request = request
        else:
            workflow.status = WorkflowStatus.PAUSED
            workflow.pause_request = request
        for claim in workflow.claims.values():
            claim.released = True
        del workflow.signals[kind]
        workflow.bump(self.now)
        return True

    def unpause(self, instance_id: str) -> Workflow:
        workflow = self._get(instance_id)
        if workflow.status is not WorkflowStatus.PAUSED:
            raise CannotPauseError(instance_id)
        workflow.status = WorkflowStatus.IN_PROGRESS
        workflow.pause_request = None
        workflow.bump(self.now)
        return workflow

    def retry_workflow(self, instance_id: str) -> Workflow:
        """A failed workflow back in progress where it failed; its claims dropped and its
        attempts counted anew; its pending signals cleared (docs/contract.md#retry_workflow)."""
        workflow = self._get(instance_id)
        if workflow.status is not WorkflowStatus.FAILED:
            raise InvalidStateError(f"{instance_id} is {workflow.status.value}")
        workflow.status = WorkflowStatus.IN_PROGRESS
        workflow.draft = dataclasses.replace(workflow.draft, error=None)
        for claim in workflow.claims.values():
            claim.released = True
            claim.attempt, claim.last_error, claim.deadline = 0, None, None
        workflow.signals.clear()
        workflow.bump(self.now)
        return workflow

    def send_event(
        self, instance_id: str, name: str, payload: bytes, key: str | None = None
    ) -> None:
        """Deliver or buffer; with a key, at most once per key of this run (a repeat with
        other arguments is a conflict)."""
        workflow = self._get(instance_id)
        if key is not None and key in workflow.sent_keys:
            if workflow.sent_keys[key] != (name, payload):
                raise IdempotencyConflictError(key)
            return
        position = workflow.position
        if (
            workflow.status is WorkflowStatus.IN_PROGRESS
            and isinstance(position, AtSignal)
            and position.signal_name == name
        ):
            # The payload is the result of the signal: recorded like save_task_result.
            workflow.completed_tasks[position.signal_id] = payload
            workflow.last_completed_task_id = position.signal_id
            if position.next_task_id is None:
                workflow.status = WorkflowStatus.COMPLETED
                workflow.output = payload
            else:
                workflow.position = AtTask(position.next_task_id)
                workflow.input_task_id = position.signal_id
            workflow.bump(self.now)
        else:
            workflow.events.setdefault(name, deque()).append(payload)
        if key is not None:
            workflow.sent_keys[key] = (name, payload)

    def consume_event(self, instance_id: str, name: str, key: str | None = None) -> bytes | None:
        """The oldest event of that name; with a key, the one taken under it, again."""
        workflow = self._get(instance_id)
        if key is not None and key in workflow.consumed:
            taken_name, payload = workflow.consumed[key]
            if taken_name != name:
                raise IdempotencyConflictError(key)
            return payload
        queue = workflow.events.get(name)
        if not queue:
            return None
        payload = queue.popleft()
        if key is not None:
            workflow.consumed[key] = (name, payload)
        return payload
