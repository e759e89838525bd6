"""``complete_tasks`` on SQL: many fenced completions in one transaction, set-based.

Per call, whatever the number of completions (docs/contract.md#complete_tasks):

1. lock the workflow rows, in id order (the global lock order starts there), reading the
   database clock and whether a signal is pending;
2. read their stored results;
3. lock their ready rows, then the claim rows of the completed tasks (workflow -> ready ->
   claims, the order every writer follows, so no wait forms a cycle);
4. decide each completion in Python (``completions.apply_completion``, shared with the
   in-memory backend), running the advance functions on the locked state;
5. write what was recorded with a few multi-row statements, release the claims, and claim the
   next tasks with the dialect's guarded claim statement.

The claim check is made on claim rows locked ``FOR UPDATE`` in this transaction: nobody can
take a claim over between the check and the commit (SQLite: the transaction holds the
database's write lock).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BindParameter,
    Connection,
    Row,
    bindparam,
    delete,
    exists,
    insert,
    select,
    tuple_,
    update,
)

from ..attempts import RETRY_WAIT_WORKER, claim_times
from ..completions import apply_completion
from ..model import (
    AvailableTask,
    ClaimedTask,
    CompletionOutcome,
    CompletionResult,
    TaskCompletion,
    WorkflowSnapshot,
)
from .dialects import ClaimRow, ClaimTerms, Granted, SqlDialect, TaskKey, TokenFloors
from .dialects.base import claimed_until
from .rows import granted_claim, new_results, ready_rows, snapshot_from_row, workflow_values
from .schema import ready_tasks, signals, task_claims, task_results, workflow_tags, workflows
from .statements import mark_claimed


class CompletionStatements:
    """The statements of :func:`complete_tasks`, built once per backend."""

    def __init__(self, dialect: SqlDialect) -> None:
        now = dialect.now()
        instance_ids: BindParameter[list[str]] = bindparam("p_instance_ids", expanding=True)
        keys: BindParameter[list[TaskKey]] = bindparam("p_keys", expanding=True)
        claim_key = tuple_(task_claims.c.instance_id, task_claims.c.task_id)
        signalled = exists().where(signals.c.instance_id == workflows.c.instance_id)
        locked: list[Any] = [workflows, now.label("now"), signalled.label("signalled")]
        # The token floor, for next claims, where the dialect's claim cannot return its token.
        floor = dialect.floor_read(workflows.c.instance_id)
        if floor is not None:
            locked.append(floor.label("token_floor"))
        self.lock_workflows = (
            select(*locked)
            .where(workflows.c.instance_id.in_(instance_ids))
            .order_by(workflows.c.instance_id)
            .with_for_update()
        )
        self.results = select(
            task_results.c.instance_id, task_results.c.task_id, task_results.c.output
        ).where(task_results.c.instance_id.in_(instance_ids))
        self.lock_ready = (
            select(ready_tasks.c.instance_id)
            .where(ready_tasks.c.instance_id.in_(instance_ids))
            .with_for_update()
        )
        self.lock_claims = (
            select(task_claims, now.label("now")).where(claim_key.in_(keys)).with_for_update()
        )
        self.update_workflow = (
            update(workflows)
            .where(workflows.c.instance_id == bindparam("p_instance_id"))
            .values({name: bindparam(f"p_{name}") for name in (*_WORKFLOW_COLUMNS, "version")})
        )
        self.clear_ready = delete(ready_tasks).where(ready_tasks.c.instance_id.in_(instance_ids))
        self.release_claims = update(task_claims).where(claim_key.in_(keys)).values(released=True)
        # A failed attempt with a retry to come: the claim becomes the wait (held by no
        # worker until the retry is due), and its ready row is hidden until then.
        self.wait_for_retry = (
            update(task_claims)
            .where(
                task_claims.c.instance_id == bindparam("p_instance_id"),
                task_claims.c.task_id == bindparam("p_task_id"),
            )
            .values(
                worker_id=RETRY_WAIT_WORKER,
                expires_at=bindparam("p_retry_at"),
                deadline=None,
                last_error=bindparam("p_error"),
            )
        )
        self.hide_until_retry = (
            update(ready_tasks)
            .where(
                ready_tasks.c.instance_id == bindparam("p_instance_id"),
                ready_tasks.c.task_id == bindparam("p_task_id"),
            )
            .values(claimed_until=bindparam("p_retry_at"))
        )
        self.clear_tags = delete(workflow_tags).where(workflow_tags.c.instance_id.in_(instance_ids))
        self.mark_claimed = mark_claimed()


# The columns a save writes (see rows.workflow_values), bound as p_<name> for executemany.
_WORKFLOW_COLUMNS = (
    "definition_hash",
    "status",
    "position",
    "last_completed_task_id",
    "input_task_id",
    "deadline",
    "initial_input",
    "output",
    "error",
    "cancel_request",
    "pause_request",
    "priority",
    "tags",
    "updated_at",
)


@dataclass
class _Locked:
    """A locked workflow: its stored state and what this call has made of it so far."""

    stored: WorkflowSnapshot
    stored_results: frozenset[str]
    signalled: bool
    current: WorkflowSnapshot
    written: bool = False
    token_floor: int | None = None  # read where the dialect needs it (SqlDialect.floor_read)


def complete_tasks(
    conn: Connection,
    sql: CompletionStatements,
    dialect: SqlDialect,
    completions: Sequence[TaskCompletion],
    ttl: timedelta | None,
    timeout: timedelta | None,
    claim_next: int,
    check_snapshot: Callable[[WorkflowSnapshot], None],
    announce: Callable[[Connection], None],
) -> list[CompletionResult]:
    """Apply ``completions`` in ``conn``'s transaction; see the module documentation.

    ``announce`` is called when a completion made a task runnable that no next claim took.
    """
    locked, now = _lock_workflows(conn, sql, sorted({c.instance_id for c in completions}))
    if not locked:
        return [CompletionResult(CompletionOutcome.NOT_FOUND) for _ in completions]
    conn.execute(sql.lock_ready, {"p_instance_ids": sorted(locked)})
    keys = sorted({(c.instance_id, c.task_id) for c in completions if c.instance_id in locked})
    claims = {
        (row.instance_id, row.task_id): row
        for row in conn.execute(sql.lock_claims, {"p_keys": keys})
    }

    results: list[CompletionResult] = []
    released: dict[TaskKey, None] = {}  # in order
    retries: list[dict[str, object]] = []
    after: dict[int, WorkflowSnapshot] = {}  # the snapshot after each recorded completion
    for completion in completions:
        key = (completion.instance_id, completion.task_id)
        workflow = locked.get(completion.instance_id)
        claim = claims.get(key)
        held = claim is not None and key not in released and _holds(claim, completion)
        applied = apply_completion(
            None if workflow is None else workflow.current,
            completion,
            claim_held=held,
            check_snapshot=check_snapshot,
        )
        if isinstance(applied, CompletionResult):
            if applied.outcome is CompletionOutcome.RETRY_SCHEDULED:
                assert completion.retry_after is not None
                released[key] = None  # this claim is over: not for a later completion
                retries.append(
                    {
                        "p_instance_id": completion.instance_id,
                        "p_task_id": completion.task_id,
                        "p_retry_at": now + completion.retry_after,
                        "p_error": completion.error,
                    }
                )
            results.append(applied)
            continue
        assert workflow is not None
        applied.version = workflow.current.version + 1
        applied.updated_at = now
        workflow.current, workflow.written = applied, True
        released[key] = None
        after[len(results)] = applied
        results.append(CompletionResult(CompletionOutcome.RECORDED, version=applied.version))

    if retries:
        conn.execute(sql.wait_for_retry, retries)
        conn.execute(sql.hide_until_retry, retries)
    written = {instance_id: w for instance_id, w in locked.items() if w.written}
    if not written:
        return results
    runnable = _write(conn, sql, written, now)
    if claim_next > 0:
        # Before the release: a task whose claim a later completion of this call holds is
        # still claimed when an earlier one looks for next tasks.
        signalled = {instance_id for instance_id, w in locked.items() if w.signalled}
        expires_at, deadline = claim_times(now, ttl, timeout)
        floors = {i: w.token_floor for i, w in locked.items() if w.token_floor is not None}
        results = _claim_next(
            conn,
            sql,
            dialect,
            completions,
            results,
            after,
            signalled,
            floors,
            claim_next,
            now,
            expires_at,
            deadline,
        )
    waiting = {(str(r["p_instance_id"]), str(r["p_task_id"])) for r in retries}
    conn.execute(sql.release_claims, {"p_keys": [k for k in released if k not in waiting]})
    taken = {(t.task.instance_id, t.task.task_id) for r in results for t in r.next_tasks}
    if runnable - taken:
        announce(conn)
    return results


def _lock_workflows(
    conn: Connection, sql: CompletionStatements, instance_ids: list[str]
) -> tuple[dict[str, _Locked], datetime]:
    rows = conn.execute(sql.lock_workflows, {"p_instance_ids": instance_ids}).all()
    if not rows:
        return {}, datetime.min
    results: dict[str, dict[str, bytes]] = defaultdict(dict)
    for result in conn.execute(sql.results, {"p_instance_ids": [r.instance_id for r in rows]}):
        results[result.instance_id][result.task_id] = result.output
    locked = {}
    for row in rows:
        stored = snapshot_from_row(row, results[row.instance_id])
        locked[row.instance_id] = _Locked(
            stored=stored,
            stored_results=frozenset(stored.completed_tasks),
            signalled=bool(row.signalled),
            current=stored,
            token_floor=getattr(row, "token_floor", None),
        )
    now: datetime = rows[0].now
    return locked, now


def _holds(claim: Row[Any], completion: TaskCompletion) -> bool:
    """The completion's worker holds this locked claim row, live by the database clock."""
    return (
        not claim.released
        and claim.worker_id == completion.worker_id
        and claim.token == completion.token
        and (claim.expires_at is None or claim.now < claim.expires_at)
    )


def _write(
    conn: Connection, sql: CompletionStatements, written: dict[str, _Locked], now: datetime
) -> set[TaskKey]:
    """Save the final snapshot of each written workflow, as ``save_snapshot`` would; the
    ready tasks written."""
    conn.execute(
        sql.update_workflow,
        [
            {
                "p_instance_id": instance_id,
                "p_version": w.current.version,
                **{f"p_{name}": value for name, value in workflow_values(w.current, now).items()},
            }
            for instance_id, w in written.items()
        ],
    )
    instance_ids = sorted(written)
    conn.execute(sql.clear_ready, {"p_instance_ids": instance_ids})
    ready = [
        row
        for w in written.values()
        for row in ready_rows(w.current, w.stored_results | w.current.completed_tasks.keys(), now)
    ]
    if ready:
        conn.execute(insert(ready_tasks), ready)
    results = [
        row for w in written.values() for row in new_results(w.current, w.stored_results, now)
    ]
    if results:
        conn.execute(insert(task_results), results)
    retagged = sorted(i for i, w in written.items() if frozenset(w.current.tags) != w.stored.tags)
    if retagged:
        conn.execute(sql.clear_tags, {"p_instance_ids": retagged})
        tags = [
            {"instance_id": instance_id, "tag": tag}
            for instance_id in retagged
            for tag in sorted(written[instance_id].current.tags)
        ]
        if tags:
            conn.execute(insert(workflow_tags), tags)
    return {(str(row["instance_id"]), str(row["task_id"])) for row in ready}


def _claim_next(
    conn: Connection,
    sql: CompletionStatements,
    dialect: SqlDialect,
    completions: Sequence[TaskCompletion],
    results: list[CompletionResult],
    after: dict[int, WorkflowSnapshot],
    signalled: set[str],
    floors: TokenFloors,
    limit: int,
    now: datetime,
    expires_at: datetime | None,
    deadline: datetime | None,
) -> list[CompletionResult]:
    """Claim up to ``limit`` next tasks for the completions' workers, as if after each
    recorded completion in turn (docs/contract.md#complete_tasks): the tasks its workflow
    then has runnable, not claimed (by others, by an earlier next claim, or by a later
    completion of this call), while the workflow has no pending signal."""
    wanted = sorted(
        {
            (snapshot.instance_id, task_id)
            for snapshot in after.values()
            if snapshot.instance_id not in signalled
            for task_id in snapshot.runnable_task_ids(now)
        }
    )
    if not wanted:
        return results
    # Their claim rows, locked (after the ready rows: the global order), so that the choice
    # below is the claim statement's too.
    rows = {
        (row.instance_id, row.task_id): row
        for row in conn.execute(sql.lock_claims, {"p_keys": wanted})
    }
    live = {
        key
        for key, row in rows.items()
        if not row.released and (row.expires_at is None or row.now < row.expires_at)
    }
    chosen: dict[int, list[TaskKey]] = defaultdict(list)
    taken: set[TaskKey] = set()
    budget = limit
    for index, snapshot in sorted(after.items()):
        if snapshot.instance_id in signalled:
            continue
        for task_id in snapshot.runnable_task_ids(now):
            key = (snapshot.instance_id, task_id)
            if budget > 0 and key not in taken and key not in live:
                chosen[index].append(key)
                taken.add(key)
                budget -= 1
    by_worker: dict[str, dict[TaskKey, ClaimRow]] = defaultdict(dict)
    for index, keys in chosen.items():
        for key in keys:
            by_worker[completions[index].worker_id][key] = (
                ClaimRow.PRESENT if key in rows else ClaimRow.ABSENT
            )
    tokens: dict[TaskKey, Granted] = {}
    terms = {worker_id: ClaimTerms(worker_id, now, expires_at, deadline) for worker_id in by_worker}
    for worker_id, claims in by_worker.items():
        tokens |= dialect.claim_many(conn, claims, terms[worker_id], floors)
    if tokens:
        conn.execute(
            sql.mark_claimed, {"p_keys": list(tokens), "p_until": claimed_until(expires_at)}
        )
    return [
        replace(
            result,
            next_tasks=tuple(
                _claimed_task(after[index], key, terms[completions[index].worker_id], tokens[key])
                for key in chosen[index]
                if key in tokens
            ),
        )
        if index in chosen
        else result
        for index, result in enumerate(results)
    ]


def _claimed_task(
    snapshot: WorkflowSnapshot, key: TaskKey, terms: ClaimTerms, granted: Granted
) -> ClaimedTask:
    instance_id, task_id = key
    return ClaimedTask(
        granted_claim(key, terms, granted),
        AvailableTask(
            instance_id=instance_id,
            task_id=task_id,
            definition_hash=snapshot.definition_hash,
            input=snapshot.input_for_position,
            priority=snapshot.priority,
            tags=frozenset(snapshot.tags),
            snapshot_version=snapshot.version,
            trace_context=snapshot.trace_context,
        ),
    )
