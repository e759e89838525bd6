"""The statements of ``SqlBackend``'s frequent calls, built once per backend.

Building a SQLAlchemy expression (operators, coercions, a fresh cache key) costs more client
CPU than executing its cached compiled form, so the statements of the worker's loop (claim,
save a result, release, heartbeat, load) are built here at start-up with ``bindparam()``
placeholders and only their values change between calls. Parameter names start with ``p_``
(SQLAlchemy reserves column names for the ``VALUES`` of an ``INSERT``/``UPDATE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Executable,
    Exists,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    delete,
    exists,
    not_,
    or_,
    select,
    tuple_,
    union_all,
    update,
)

from ..model import WorkflowStatus
from ..validation import MAX_PRIORITY, MIN_PRIORITY
from .dialects import SqlDialect, claim_key
from .dialects.base import ready_is_free
from .schema import ready_tasks, signals, task_claims, task_results, workflow_tags, workflows

# Statuses in which a workflow's stored state may still change (not terminal).
CHANGEABLE_STATUSES = tuple(status.value for status in WorkflowStatus if not status.is_terminal)


S = TypeVar("S", bound=Executable)


@dataclass(frozen=True)
class ByToken(Generic[S]):
    """A statement on the caller's own claim: whatever its token, or that one token."""

    any_token: S
    one_token: S

    def for_token(self, token: int | None) -> S:
        return self.any_token if token is None else self.one_token


@dataclass(frozen=True)
class ByWorkerTags(Generic[S]):
    """A candidate statement for a worker without tags, and for one with tags (bound as
    the expanding ``worker_tags``)."""

    untagged: S
    tagged: S

    def for_tags(self, worker_tags: frozenset[str]) -> S:
        return self.tagged if worker_tags else self.untagged


def _is_changeable() -> ColumnElement[bool]:
    # Equalities, not IN (...): an IN list of values is expanded at every execution.
    return or_(*(workflows.c.status == status for status in CHANGEABLE_STATUSES))


def _workflow_key() -> ColumnElement[bool]:
    return workflows.c.instance_id == bindparam("p_instance_id")


def _ready_key() -> ColumnElement[bool]:
    return and_(
        ready_tasks.c.instance_id == bindparam("p_instance_id"),
        ready_tasks.c.task_id == bindparam("p_task_id"),
    )


def signal_pending() -> Exists:
    """A signal (cancel or pause) is pending for the ready row's workflow."""
    return exists().where(signals.c.instance_id == ready_tasks.c.instance_id)


def held_claim_filter(with_token: bool) -> ColumnElement[bool]:
    """The caller's own unreleased claim (and that token, when given): ``p_instance_id``,
    ``p_task_id``, ``p_worker_id``, ``p_token``."""
    condition = and_(
        claim_key(),
        task_claims.c.worker_id == bindparam("p_worker_id"),
        task_claims.c.released.is_(False),
    )
    if with_token:
        condition = and_(condition, task_claims.c.token == bindparam("p_token"))
    return condition


def mark_claimed() -> Update:
    """Set the claim hint of the ready rows ``p_keys`` (expanding) to ``p_until``."""
    return (
        update(ready_tasks)
        .where(
            tuple_(ready_tasks.c.instance_id, ready_tasks.c.task_id).in_(
                bindparam("p_keys", expanding=True)
            )
        )
        .values(claimed_until=bindparam("p_until"))
    )


def candidate_query(dialect: SqlDialect, worker_has_tags: bool) -> CompoundSelect[Any]:
    """The first ``:limit`` available tasks of each priority (``worker_tags``: expanding).

    Effective priority mixes priority and age, which no index can order directly. But
    within one priority it is ``updated_at`` order, which the index serves: so take the
    first ``limit`` of each priority (one indexed scan each) and merge them afterwards.
    """
    now = dialect.now()
    live_claim = exists().where(
        task_claims.c.instance_id == ready_tasks.c.instance_id,
        task_claims.c.task_id == ready_tasks.c.task_id,
        task_claims.c.released.is_(False),
        or_(task_claims.c.expires_at.is_(None), task_claims.c.expires_at > now),
    )
    foreign_tag = exists().where(workflow_tags.c.instance_id == ready_tasks.c.instance_id)
    if worker_has_tags:
        foreign_tag = foreign_tag.where(
            workflow_tags.c.tag.not_in(bindparam("worker_tags", expanding=True))
        )
    filters = [
        ready_is_free(ready_tasks, now),
        or_(ready_tasks.c.wake_at.is_(None), ready_tasks.c.wake_at <= now),
        not_(signal_pending()),
        not_(live_claim),
        or_(ready_tasks.c.has_tags.is_(False), not_(foreign_tag)),
    ]
    branches = [
        select(
            ready_tasks.c.instance_id,
            ready_tasks.c.task_id,
            ready_tasks.c.priority,
            ready_tasks.c.updated_at,
            now.label("now"),
        )
        .where(ready_tasks.c.priority == priority, *filters)
        .order_by(ready_tasks.c.updated_at, ready_tasks.c.instance_id, ready_tasks.c.task_id)
        .limit(bindparam("limit", type_=Integer()))
        .subquery()
        for priority in range(MIN_PRIORITY, MAX_PRIORITY + 1)
    ]
    return union_all(*(select(branch) for branch in branches))


class Statements:
    """The prebuilt statements of one backend (its dialect's clock and locking)."""

    def __init__(self, dialect: SqlDialect) -> None:
        now = dialect.now()
        self.candidates = ByWorkerTags(
            untagged=candidate_query(dialect, worker_has_tags=False),
            tagged=candidate_query(dialect, worker_has_tags=True),
        )
        # PostgreSQL finds, locks, claims and describes in one statement; elsewhere None.
        claim_available = (
            dialect.claim_available_query(self.candidates.untagged),
            dialect.claim_available_query(self.candidates.tagged),
        )
        self.claim_available: ByWorkerTags[Select[Any]] | None = (
            None
            if claim_available[0] is None or claim_available[1] is None
            else ByWorkerTags(untagged=claim_available[0], tagged=claim_available[1])
        )
        input_result = task_results.alias("input_result")
        # What a claimed task hands out: its workflow's input (or its input task's output).
        self.available_tasks = (
            select(
                workflows.c.instance_id,
                workflows.c.definition_hash,
                workflows.c.priority,
                workflows.c.tags,
                workflows.c.version,
                workflows.c.initial_input,
                workflows.c.input_task_id,
                workflows.c.trace_context,
                input_result.c.output.label("input_output"),
            )
            .select_from(
                workflows.outerjoin(
                    input_result,
                    and_(
                        input_result.c.instance_id == workflows.c.instance_id,
                        input_result.c.task_id == workflows.c.input_task_id,
                    ),
                )
            )
            .where(workflows.c.instance_id.in_(bindparam("p_instance_ids", expanding=True)))
        )

        # -- workflow rows
        self.lock_state = (
            select(workflows.c.version, workflows.c.status, workflows.c.tags, now.label("now"))
            .where(_workflow_key())
            .with_for_update()
        )
        self.lock_snapshot = (
            select(workflows, now.label("now")).where(_workflow_key()).with_for_update()
        )
        # A shared lock on the workflow row keeps results from changing under a load.
        self.read_snapshot = select(workflows).where(_workflow_key()).with_for_update(read=True)
        self.exists = select(workflows.c.instance_id).where(_workflow_key())
        self.results = select(task_results.c.task_id, task_results.c.output).where(
            task_results.c.instance_id == bindparam("p_instance_id")
        )
        # save_task_result: lock, terminal guard and version bump in one statement.
        bump: Update = (
            update(workflows)
            .where(_workflow_key(), _is_changeable())
            .values(
                version=workflows.c.version + 1,
                updated_at=now,
                last_completed_task_id=bindparam("p_task_id"),
            )
        )
        bumped = (workflows.c.version, workflows.c.updated_at, workflows.c.position)
        self.bump_version: Executable = (
            bump.returning(*bumped) if dialect.update_returning else bump
        )
        # Where the database has no UPDATE ... RETURNING: our own locked row, read back.
        self.read_bumped: Select[Any] = select(*bumped).where(_workflow_key())

        # -- ready rows
        # claim_task's lock: what the claim needs to know of the task (its token floor where
        # the dialect's claim statement cannot return its token: see SqlDialect.floor_read).
        ready_task = [ready_tasks.c.wake_at, now.label("now"), signal_pending().label("signalled")]
        floor = dialect.floor_read(ready_tasks.c.instance_id)
        if floor is not None:
            ready_task.append(floor.label("token_floor"))
        self.lock_ready_task = select(*ready_task).where(_ready_key()).with_for_update()
        self.delete_ready_task = delete(ready_tasks).where(_ready_key())
        # The claim hint of ready rows: set by a claim, cleared by a release.
        self.mark_claimed = mark_claimed()
        self.clear_claimed = update(ready_tasks).where(_ready_key()).values(claimed_until=None)
        # A renewal for less than before (``p_ttl`` from now): the hint must not outlive the
        # claim, or the task would stay hidden once the claim expired. Run before the renewal
        # (ready row, then claim row: the order every call locks in); its own clock reading
        # is the earlier, so the hint ends at most when the renewed claim does. A claim's
        # deadline needs no lowering: its first expiry and hint were already at most that.
        renewed_until = dialect.now_plus_ttl()
        self.lower_claimed_until = (
            update(ready_tasks)
            .where(_ready_key(), ready_tasks.c.claimed_until > renewed_until)
            .values(claimed_until=renewed_until)
        )
        self.clear_ready_tasks = delete(ready_tasks).where(
            ready_tasks.c.instance_id == bindparam("p_instance_id")
        )
        self.redate_ready_tasks = (
            update(ready_tasks)
            .where(ready_tasks.c.instance_id == bindparam("p_instance_id"))
            .values(updated_at=bindparam("p_updated_at"))
        )

        # -- claims, with and without a fencing token
        self.release = ByToken(
            any_token=_release(with_token=False), one_token=_release(with_token=True)
        )
        # Heartbeats: until now + p_ttl, or for ever (ttl=None).
        self.extend_until = ByToken(
            any_token=_extend(dialect, with_token=False, with_ttl=True),
            one_token=_extend(dialect, with_token=True, with_ttl=True),
        )
        self.extend_forever = ByToken(
            any_token=_extend(dialect, with_token=False, with_ttl=False),
            one_token=_extend(dialect, with_token=True, with_ttl=False),
        )
        self.read_claim = select(task_claims).where(claim_key())
        # A renewal cut short at the claim's deadline.
        self.set_expiry = (
            update(task_claims).where(claim_key()).values(expires_at=bindparam("p_until"))
        )
        self.lock_claim = select(task_claims, now.label("now")).where(claim_key()).with_for_update()
        self.pending_signals = select(signals.c.kind).where(
            signals.c.instance_id == bindparam("p_instance_id")
        )


def _release(*, with_token: bool) -> Update:
    return update(task_claims).where(held_claim_filter(with_token)).values(released=True)


def _extend(dialect: SqlDialect, *, with_token: bool, with_ttl: bool) -> Update:
    expires_at = dialect.now_plus_ttl() if with_ttl else None
    # A claim past its deadline is not renewed (docs/contract.md#attempts-and-deadlines).
    before_deadline = or_(task_claims.c.deadline.is_(None), task_claims.c.deadline > dialect.now())
    return (
        update(task_claims)
        .where(held_claim_filter(with_token), before_deadline)
        .values(expires_at=expires_at)
    )
