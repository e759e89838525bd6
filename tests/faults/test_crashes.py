"""Worker processes SIGKILLed at random points: nothing lost, nothing recorded twice, no claim
outliving its TTL, every workflow finished.

The two fleet tests run once per SQL database (sqlite, postgres, mysql, and galera when
selected: ``store_urls``) in a private namespace (``isolated_database``); on a Galera cluster
each worker process is connected to another node (the n-th started to node n mod 3 + 1), so
that claims, fenced saves and takeovers race across nodes. A *fleet* of ``SLOTS`` spawned
worker processes (bodies in ``crash_workers.py``; one of them steady, alive from start to end)
works on the workflows while the test kills the others, starting a replacement for each death,
until at least ``*_KILLS`` processes died by SIGKILL (more workflows are added meanwhile so
that work never runs out); then only calm replacements run until every workflow is completed
(the drain), the survivors are stopped (they must exit 0) and the store is read directly (the
tables of ``sayiir_persistence.sql.schema``) and compared with the journals the processes
wrote.
``SAYIIR_CRASH_SEED`` (printed by each run) replays a run's random choices.

What is killed where:

- Self-kills, at a precise point: a process carrying a ``KillPlan`` SIGKILLs itself the n-th
  time it reaches its point: just before, during (a timer thread, a few milliseconds into the
  call: usually mid-transaction) or just after (the store accepted, nobody was told) a claim,
  heartbeat, fenced save or release, or in the middle of a task. In the cycle test the plans go
  round every point and the chaos lasts until each point has been hit (asserted from the
  journals); in the Worker test (points around claim, heartbeat, load, fenced save, release)
  they are drawn the same way but coverage is not required.
- Random kills: processes without a plan ("victims") are SIGKILLed by the test at a random
  moment 0.05-1.2 s after they are ready: mostly mid-task, sometimes mid-call.

``test_sigkilled_claim_save_release_cycles``: threads run the bare cycle claim (by
``claim_available_tasks`` or ``find_available_tasks`` + ``claim_task``) -> load -> work ->
fenced save -> release on chain workflows (``t1`` .. ``tN``). Besides normal executions and
heartbeats, some executions stall past the TTL without a heartbeat and then save the state
they loaded at claim time (the fence must refuse it); some renew after the stall; some give the
task back; and *zombies* stall until a sibling thread of their own process (same worker id,
so only the fencing token tells them apart) has taken the task over, then heartbeat, save and
release with the old token. How each property is verified:

- *No completed result lost*: every save the store accepted (journal ``saved`` with
  ``accepted``) is the stored result of its task, and every workflow ends completed with
  exactly its tasks' results, whose outputs chain (each output names the digest of its
  input: the stored result of the previous task).
- *No result recorded twice* ("recorded" = a fenced save the store accepted): at most one
  accepted save per task in the journals; and, since a process killed right after the save
  returned cannot journal it, also from the store alone: every accepted save bumps the
  workflow's version, and each workflow's final version is exactly 1 + its number of tasks
  (each accepted save also returned the version its task's place in the chain implies). A
  stored result must come from an execution whose save was not refused, written while that
  execution's claim was live (``completed_at`` before the latest expiry it was granted,
  database clock). A zombie's heartbeat, save and release must all have been refused.
- *Every workflow finishes*: all are completed before the drain ends (it gives up when the
  number of unfinished workflows stops falling).
- *No claim outlives its TTL*: every claim is granted for exactly the TTL, every heartbeat
  for at most the TTL from when it ran; at the end no claim row is live (released, or expired
  by the database clock), and no unreleased claim expires later than its holder's death +
  TTL. Claims of killed processes are taken over: a later claim of the same task has a greater
  token, is never granted before the previous claim's expiry (unless that was released), and
  such takeovers happen (counted); so do refused stale saves and zombies.

``test_sigkilled_reference_workers``: the same with the reference ``Worker`` (heartbeats,
fenced saves, joins, its sweep for stalled forks) on a ``Pipeline`` with a fork, its process
killing itself around the backend calls the Worker makes (``SuicidalBackend``). Some task runs
outlast the TTL, and the heartbeats of some claims are dropped (as if the process were cut
off from the store), so that claims expire under running tasks and are taken over: their late
saves must be refused. Recorded twice = two executions reporting ``recorded`` for one task,
or a stored result that is not the recorded one, or one written outside its execution's
claim; the join task's output names the digests of both branch results it read.

``test_worker_killed_between_last_branch_save_and_join_leaves_no_workflow_stuck`` replays,
deterministically and in one process, the interleaving the Worker test found: the last branch
saved without passing the join, its worker dead before the join check (fixed by the Worker's
sweep for stalled forks).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from helpers.clusters import GaleraCluster
from helpers.crash_workers import (
    CYCLE_KILL_POINTS,
    STOP_FILE,
    WORKER_KILL_POINTS,
    KillPlan,
    ProcessSpec,
    chain_workflow,
    digest,
    fork_workflow,
    parse_time,
    process_main,
    read_journals,
)
from helpers.databases import GALERA, sql_params
from helpers.isolated_db import isolated_database
from sayiir_persistence import SqlBackend, WorkflowSnapshot, WorkflowStatus, migrate
from sayiir_persistence.sql.dialects import dialect_for
from sayiir_persistence.sql.schema import task_claims, task_results, workflows

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

# --------------------------------------------------------------------------------------------
# Sizes (two busy cores: about 30-60 s per database for both tests)

TTL_SECONDS = 1.0
#: Worker processes alive at once, and threads in each.
SLOTS = 4
THREADS = 3
#: Every third process started during the chaos is a victim (killed by the test).
VICTIM_EVERY = 3
VICTIM_KILL_AFTER = (0.05, 1.2)
#: A self-killer whose point has not come this long after it was ready is killed by the test
#: as a victim would be: some points are rare (the Worker releases a claim only when the
#: store stopped answering), and processes waiting for them would hold every slot.
PLAN_PATIENCE_SECONDS = 10.0
#: Kills wanted per database, per test (at least; the chaos ends after the next poll).
CYCLE_KILLS = 24
WORKER_KILLS = 10
#: A self-killer dies the n-th time it reaches its point, n in this range.
KILL_AFTER_PASSES = (1, 3)
#: Keep at least this many unfinished workflows during the chaos (more are added).
MIN_UNFINISHED = 24
TOP_UP = 12

# Long enough for the kills wanted on a loaded 2-core machine (it ends as soon as they are).
CHAOS_LIMIT_SECONDS = 120.0
DRAIN_LIMIT_SECONDS = 40.0
#: The drain also ends when the number of unfinished workflows stopped falling for this long
#: (several TTLs: every abandoned claim has expired and been taken over by then).
DRAIN_STALL_SECONDS = 8.0
STOP_TIMEOUT_SECONDS = 20.0
POLL_SECONDS = 0.05
#: Slack for comparing the test's wall clock with the database's (same machine; SQLite
#: timestamps are whole milliseconds).
CLOCK_SLACK = timedelta(milliseconds=500)
#: Replay a run's random choices (kill plans, victims' deaths, worker behaviour): the seed is
#: printed by every run; set it here to repeat one (timing still differs).
SEED_ENV = "SAYIIR_CRASH_SEED"

Key = tuple[str, str]


# --------------------------------------------------------------------------------------------
# The fleet of worker processes


@dataclass
class Member:
    """One worker process of the fleet."""

    spec: ProcessSpec
    process: BaseProcess
    victim: bool
    kill_at: float | None = None
    ended: datetime | None = None
    """Wall-clock time its death was noticed (it died at or before)."""
    exitcode: int | None = None
    killed_by_test: bool = False

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    @property
    def sigkilled(self) -> bool:
        return self.exitcode == -signal.SIGKILL

    @property
    def self_killed(self) -> bool:
        return self.sigkilled and not self.killed_by_test


@dataclass
class Fleet:
    """Starts, kills and watches the worker processes of one test."""

    kind: str
    urls: list[str]
    """The store's URL, or its URL on each Galera node: taken in turn by the processes."""
    directory: Path
    rng: random.Random
    members: list[Member] = field(default_factory=list)

    def start(self, plan: KillPlan | None, *, victim: bool) -> Member:
        number = len(self.members) + 1
        role = "victim" if victim else ("self" if plan else "calm")
        spec = ProcessSpec(
            kind=self.kind,
            url=self.urls[number % len(self.urls)],
            directory=str(self.directory),
            worker_id=f"{self.kind}-{number:03d}-{role}",
            threads=THREADS,
            ttl_seconds=TTL_SECONDS,
            plan=plan,
            seed=self.rng.randrange(2**32),
        )
        process = multiprocessing.get_context("spawn").Process(
            target=process_main, args=(spec,), name=spec.worker_id, daemon=True
        )
        process.start()
        member = Member(spec, process, victim)
        self.members.append(member)
        return member

    def live(self) -> list[Member]:
        return [member for member in self.members if member.ended is None]

    def poll(self, *, kill_victims: bool) -> None:
        """Notice deaths; kill the victims whose time has come, and the self-killers whose
        point did not come within the patience."""
        now = time.monotonic()
        for member in self.live():
            exitcode = member.process.exitcode
            if exitcode is not None:
                member.exitcode, member.ended = exitcode, datetime.now(UTC)
                continue
            if not kill_victims or not (member.victim or member.spec.plan is not None):
                continue
            if member.kill_at is None:
                if (self.directory / f"{member.worker_id}.ready").exists():
                    member.kill_at = now + (
                        self.rng.uniform(*VICTIM_KILL_AFTER)
                        if member.victim
                        else PLAN_PATIENCE_SECONDS
                    )
            elif now >= member.kill_at:
                member.killed_by_test = True
                member.process.kill()

    def kills(self) -> list[Member]:
        return [member for member in self.members if member.sigkilled]

    def self_killed_points(self) -> set[str]:
        return {
            member.spec.plan.point
            for member in self.members
            if member.self_killed and member.spec.plan is not None
        }

    def stop(self) -> list[str]:
        """Ask every live process to stop; the ids of those that did not exit in time."""
        (self.directory / STOP_FILE).touch()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        stragglers = []
        for member in self.live():
            member.process.join(max(deadline - time.monotonic(), 0.1))
            if member.process.is_alive():
                stragglers.append(member.worker_id)
                member.process.kill()
                member.process.join()
        self.poll(kill_victims=False)
        return stragglers

    def by_worker(self) -> dict[str, Member]:
        return {member.worker_id: member for member in self.members}


def _plans(points: tuple[str, ...], rng: random.Random) -> Iterator[KillPlan]:
    """Kill plans going round every point (in a fresh random order each round)."""
    while True:
        order = list(points)
        rng.shuffle(order)
        for point in order:
            yield KillPlan(point, rng.randint(*KILL_AFTER_PASSES))


@dataclass
class FleetRun:
    chaos_seconds: float
    drain_seconds: float
    finished: bool
    stragglers: list[str]


def _run_fleet(
    fleet: Fleet,
    *,
    points: tuple[str, ...],
    must_cover: bool,
    kills_wanted: int,
    unfinished: Callable[[], int],
    top_up: Callable[[], None],
) -> FleetRun:
    """Chaos until ``kills_wanted`` SIGKILLs (and, with ``must_cover``, a self-kill at each of
    ``points``), then drain: calm replacements only, until every workflow is finished."""
    plans = _plans(points, fleet.rng)
    started = time.monotonic()
    fleet.start(None, victim=False)  # a steady worker, alive from start to end
    chaos_end: float | None = None
    spawned = 0
    last_check = 0.0
    finished = False
    fewest, progressed = -1, 0.0
    while True:
        fleet.poll(kill_victims=chaos_end is None)
        now = time.monotonic()
        if chaos_end is None and (
            (
                len(fleet.kills()) >= kills_wanted
                and (not must_cover or fleet.self_killed_points() >= set(points))
            )
            or now - started > CHAOS_LIMIT_SECONDS
        ):
            chaos_end = progressed = now
        while len(fleet.live()) < SLOTS:
            spawned += 1
            if chaos_end is not None:
                fleet.start(None, victim=False)
            elif spawned % VICTIM_EVERY == 0:
                fleet.start(None, victim=True)
            else:
                fleet.start(next(plans), victim=False)
        if now - last_check >= 0.25:
            last_check = now
            if chaos_end is None:
                if unfinished() < MIN_UNFINISHED:
                    top_up()
            else:
                left = unfinished()
                if left == 0:
                    finished = True
                    break
                if fewest < 0 or left < fewest:
                    fewest, progressed = left, now
        if chaos_end is not None and (
            now - chaos_end > DRAIN_LIMIT_SECONDS or now - progressed > DRAIN_STALL_SECONDS
        ):
            break
        time.sleep(POLL_SECONDS)
    ended = time.monotonic()
    assert chaos_end is not None
    return FleetRun(chaos_end - started, ended - chaos_end, finished, fleet.stop())


# --------------------------------------------------------------------------------------------
# Reading the store directly


@dataclass
class Store:
    workflows: dict[str, sa.Row[Any]]
    results: dict[Key, sa.Row[Any]]
    claims: dict[Key, sa.Row[Any]]
    now: datetime
    """The database clock when it was read."""
    offset: timedelta
    """Database clock minus the test's wall clock."""


def _read_store(url: str) -> Store:
    engine = sa.create_engine(url, poolclass=NullPool)
    clock = dialect_for(engine.dialect.name, sqlite_busy_timeout=timedelta(seconds=30)).now()
    try:
        with engine.connect() as conn:
            before = datetime.now(UTC)
            now: datetime = conn.execute(sa.select(clock)).scalar_one()
            after = datetime.now(UTC)
            rows = conn.execute(sa.select(workflows)).all()
            results = conn.execute(sa.select(task_results)).all()
            claims = conn.execute(sa.select(task_claims)).all()
    finally:
        engine.dispose()
    return Store(
        {row.instance_id: row for row in rows},
        {(row.instance_id, row.task_id): row for row in results},
        {(row.instance_id, row.task_id): row for row in claims},
        now,
        now - (before + (after - before) / 2),
    )


def _unfinished(backend: SqlBackend) -> Callable[[], int]:
    return lambda: len(backend.list_snapshots(status=WorkflowStatus.IN_PROGRESS))


def _check_claim_rows(store: Store, fleet: Fleet, problems: list[str]) -> None:
    """No claim is live at the end; none expires later than its holder's death + TTL."""
    ttl = timedelta(seconds=TTL_SECONDS)
    members = fleet.by_worker()
    for key, row in store.claims.items():
        if row.released:
            continue
        if row.expires_at is None or row.expires_at > store.now:
            problems.append(f"{key}: claim {row.token} of {row.worker_id} still live: {row}")
            continue
        holder = members.get(row.worker_id)
        if holder is None or holder.ended is None:
            problems.append(f"{key}: claim held by an unknown or live process {row.worker_id}")
            continue
        limit = holder.ended + store.offset + ttl + CLOCK_SLACK
        if row.expires_at > limit:
            problems.append(
                f"{key}: claim {row.token} of {row.worker_id} expires at {row.expires_at}, "
                f"more than the TTL after its holder died ({holder.ended + store.offset})"
            )


def _check_heartbeats(
    store: Store, journals: dict[str, list[dict[str, Any]]], problems: list[str]
) -> int:
    """A heartbeat renews for the TTL from the moment it runs, never longer: the expiry it
    returned is at most the TTL after the journal's record of it (written after the call
    returned, so a bound in the store's favour). How many heartbeats were checked."""
    ttl = timedelta(seconds=TTL_SECONDS)
    checked = 0
    for worker, records in journals.items():
        for record in records:
            if record["kind"] != "extend":
                continue
            checked += 1
            written = datetime.fromtimestamp(record["at"], UTC) + store.offset
            expires_at = parse_time(record["expires_at"])
            if expires_at > written + ttl + CLOCK_SLACK:
                problems.append(
                    f"{worker}: a heartbeat at {written} renewed {record['instance']}/"
                    f"{record['task']} until {expires_at}, beyond the TTL"
                )
    return checked


def _report(problems: list[str], what: str) -> None:
    shown = "\n".join(problems[:30])
    assert not problems, f"{len(problems)} {what}:\n{shown}"


def _check_processes(fleet: Fleet, run: FleetRun) -> None:
    assert not run.stragglers, f"processes that did not stop: {run.stragglers}"
    assert not fleet.live()
    bad_exits = {
        member.worker_id: member.exitcode
        for member in fleet.members
        if not member.sigkilled and member.exitcode != 0
    }
    assert not bad_exits, f"processes that crashed (not SIGKILLed): {bad_exits}"


def _print_summary(test: str, url: str, fleet: Fleet, run: FleetRun, extra: str) -> None:
    kills = fleet.kills()
    by_test = sum(member.killed_by_test for member in kills)
    points = Counter(
        member.spec.plan.point
        for member in kills
        if member.self_killed and member.spec.plan is not None
    )
    print(
        f"\n[{test} {make_url(url).get_backend_name()}] {len(kills)} SIGKILLs "
        f"({by_test} by the test, {len(kills) - by_test} self) of {len(fleet.members)} "
        f"processes; chaos {run.chaos_seconds:.1f}s, drain {run.drain_seconds:.1f}s; {extra}; "
        f"self-kill points {dict(sorted(points.items()))}"
    )


# --------------------------------------------------------------------------------------------
# The bare cycle


@dataclass
class Execution:
    """What the journals say about one execution (claim to release) of a task."""

    exec_id: str
    worker: str
    instance: str = ""
    task: str = ""
    token: int = 0
    claimed_at: datetime | None = None
    expiries: list[datetime] = field(default_factory=list)
    output: str | None = None
    accepted: bool | None = None
    """None: the save was not attempted, or the process died before journalling its end."""
    version: int | None = None
    release_intent: bool = False
    release_outcome: str | None = None
    extended: bool = False
    """A heartbeat of this execution succeeded."""
    mode: str = ""
    sibling_token: int | None = None
    """A zombie: the token its sibling (same worker id) took the task over with."""

    @property
    def key(self) -> Key:
        return (self.instance, self.task)

    @property
    def expires_at(self) -> datetime:
        return max(self.expiries)


def _cycle_executions(journals: dict[str, list[dict[str, Any]]]) -> dict[str, Execution]:
    executions: dict[str, Execution] = {}
    for worker, records in journals.items():
        for record in records:
            if "exec" not in record:
                continue
            execution = executions.setdefault(record["exec"], Execution(record["exec"], worker))
            kind = record["kind"]
            if kind == "claim":
                execution.instance, execution.task = record["instance"], record["task"]
                execution.token, execution.mode = record["token"], record["mode"]
                execution.claimed_at = parse_time(record["claimed_at"])
                execution.expiries.append(parse_time(record["expires_at"]))
            elif kind == "extend":
                execution.extended = True
                execution.expiries.append(parse_time(record["expires_at"]))
            elif kind == "zombie":
                execution.sibling_token = record["sibling_token"]
            elif kind == "release":
                execution.release_outcome = record["outcome"]
            elif kind == "save-intent":
                execution.output = record["output"]
            elif kind == "saved":
                execution.accepted = record["accepted"]
                execution.version = record["version"]
            elif kind == "release-intent":
                execution.release_intent = True
    return executions


def _seed_chains(backend: SqlBackend, seeded: dict[str, tuple[int, bytes]], count: int) -> None:
    for _ in range(count):
        number = len(seeded)
        instance_id, length = f"chain-{number:05d}", 1 + number % 4
        initial_input = f"input {number}".encode()
        backend.save_snapshot(chain_workflow(instance_id, length, initial_input))
        seeded[instance_id] = (length, initial_input)


def _check_chains(
    store: Store,
    seeded: dict[str, tuple[int, bytes]],
    executions: dict[str, Execution],
    problems: list[str],
) -> None:
    """Every workflow completed, each task recorded once, by a live claim, outputs chained."""
    for instance_id, (length, initial_input) in seeded.items():
        row = store.workflows.get(instance_id)
        if row is None or row.status != WorkflowStatus.COMPLETED.value:
            problems.append(f"{instance_id}: not completed: {row and (row.status, row.position)}")
            continue
        tasks = [f"t{number}" for number in range(1, length + 1)]
        if row.version != 1 + length:
            problems.append(
                f"{instance_id}: version {row.version} after {length} tasks: "
                f"{row.version - 1} accepted writes, expected {length}"
            )
        stored = {task for instance, task in store.results if instance == instance_id}
        if stored != set(tasks):
            problems.append(f"{instance_id}: results {sorted(stored)}, expected {tasks}")
            continue
        expected_input = digest(initial_input)
        for task in tasks:
            result = store.results[instance_id, task]
            output = json.loads(result.output)
            execution = executions.get(output["exec"])
            where = f"{instance_id}/{task} (execution {output['exec']})"
            if execution is None or execution.output != result.output.decode():
                problems.append(f"{where}: stored result of no journalled save")
                continue
            if execution.key != (instance_id, task) or execution.token != output["token"]:
                problems.append(f"{where}: stored result names another claim: {execution}")
            if execution.accepted is False:
                problems.append(f"{where}: the fence refused this save, yet it was written")
            assert execution.claimed_at is not None
            if not execution.claimed_at <= result.completed_at < execution.expires_at:
                problems.append(
                    f"{where}: written at {result.completed_at}, outside its claim "
                    f"({execution.claimed_at} .. {execution.expires_at})"
                )
            if output["input"] != expected_input:
                problems.append(f"{where}: consumed an input that is not the stored one")
            expected_input = digest(result.output)
        if row.output != store.results[instance_id, tasks[-1]].output:
            problems.append(f"{instance_id}: workflow output is not the last task's result")


def _check_accepted_saves(
    store: Store, executions: dict[str, Execution], problems: list[str]
) -> int:
    """Each accepted save is stored (never lost), at most one per task; how many were refused."""
    accepted = [execution for execution in executions.values() if execution.accepted]
    for key, count in Counter(execution.key for execution in accepted).items():
        if count > 1:
            problems.append(f"{key}: recorded {count} times (accepted fenced saves)")
    for execution in accepted:
        result = store.results.get(execution.key)
        if result is None or result.output.decode() != execution.output:
            problems.append(f"{execution.key}: accepted save of {execution.exec_id} lost")
        if execution.version != int(execution.task[1:]) + 1:
            problems.append(
                f"{execution.key}: accepted save made version {execution.version}, expected "
                f"{int(execution.task[1:]) + 1} (one accepted write per earlier task)"
            )
    return sum(execution.accepted is False for execution in executions.values())


def _check_claim_history(
    store: Store, executions: dict[str, Execution], fleet: Fleet, problems: list[str]
) -> tuple[int, int]:
    """Tokens increase, no takeover before expiry; (takeovers of killed processes' claims,
    killed processes' tasks finished by someone else)."""
    killed = {member.worker_id for member in fleet.kills()}
    claims: defaultdict[Key, list[Execution]] = defaultdict(list)
    for execution in executions.values():
        if execution.claimed_at is not None:
            claims[execution.key].append(execution)
    ttl = timedelta(seconds=TTL_SECONDS)
    for execution in executions.values():
        if execution.claimed_at is not None and execution.expiries[0] - execution.claimed_at != ttl:
            problems.append(f"{execution.key}: claim {execution.token} granted for another TTL")
        if execution.sibling_token is None:
            continue
        # A zombie: its sibling, same worker id, holds the task anew. The old token is refused.
        if not execution.sibling_token > execution.token:
            problems.append(f"{execution.key}: taken over with token {execution.sibling_token}")
        if execution.extended or execution.accepted or execution.release_outcome == "released":
            problems.append(
                f"{execution.key}: token {execution.token} still worked after its sibling took "
                f"over with {execution.sibling_token}: extended {execution.extended}, save "
                f"accepted {execution.accepted}, release {execution.release_outcome}"
            )
    takeovers = 0
    for key, history in claims.items():
        history.sort(key=lambda execution: execution.token)
        tokens = [execution.token for execution in history]
        if len(set(tokens)) != len(tokens):
            problems.append(f"{key}: one token granted twice: {tokens}")
        row = store.claims.get(key)
        if row is None or row.token < tokens[-1]:
            problems.append(f"{key}: claim row {row} behind the journalled tokens {tokens}")
        for previous, following in itertools.pairwise(history):
            assert previous.claimed_at is not None and following.claimed_at is not None
            if following.claimed_at < previous.claimed_at:
                problems.append(f"{key}: token {following.token} granted before {previous.token}")
            if previous.release_intent:
                continue  # given back (maybe): the next claim may come at once
            if following.claimed_at < previous.expires_at:
                problems.append(
                    f"{key}: token {following.token} granted at {following.claimed_at}, "
                    f"before token {previous.token} expired at {previous.expires_at}"
                )
            elif previous.worker in killed:
                takeovers += 1
    # The tasks killed processes held when they died were finished by someone else (or by
    # themselves, right before dying).
    finished_by_others = 0
    for execution in executions.values():
        if (
            execution.worker not in killed
            or execution.claimed_at is None
            or execution.accepted
            or execution.release_intent
        ):
            continue
        result = store.results.get(execution.key)
        if result is None:
            problems.append(f"{execution.key}: abandoned by a killed process, never finished")
            continue
        done_by = json.loads(result.output)
        if done_by["exec"] != execution.exec_id:
            if done_by["token"] <= execution.token:
                problems.append(f"{execution.key}: finished under an older token than abandoned")
            finished_by_others += 1
    return takeovers, finished_by_others


@pytest.fixture(params=[*sql_params(), pytest.param(GALERA, id=GALERA, marks=pytest.mark.galera)])
def store_urls(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """A fresh private namespace on each selected SQL database: its URL, or on a Galera
    cluster its URL on every node (node 1 first: the test seeds and reads there)."""
    kind: str = request.param
    if kind == GALERA:
        cluster: GaleraCluster = request.getfixturevalue("galera_cluster")
        with isolated_database(cluster.node_url(1)) as url:
            yield cluster.node_urls(str(make_url(url).database))
    else:
        with isolated_database(request.getfixturevalue(f"{kind}_url")) as url:
            yield [url]


def _seed() -> int:
    seed = int(os.environ.get(SEED_ENV) or random.randrange(2**32))
    print(f"\n{SEED_ENV}={seed}")
    return seed


@pytest.mark.multiprocess
def test_sigkilled_claim_save_release_cycles(store_urls: list[str], tmp_path: Path) -> None:
    seed = _seed()
    url = store_urls[0]
    migrate(url)
    backend = SqlBackend(url)
    try:
        seeded: dict[str, tuple[int, bytes]] = {}
        _seed_chains(backend, seeded, 2 * MIN_UNFINISHED)
        fleet = Fleet("cycle", store_urls, tmp_path, random.Random(seed))
        run = _run_fleet(
            fleet,
            points=CYCLE_KILL_POINTS,
            must_cover=True,
            kills_wanted=CYCLE_KILLS,
            unfinished=_unfinished(backend),
            top_up=lambda: _seed_chains(backend, seeded, TOP_UP),
        )
    finally:
        backend.close()
    store = _read_store(url)
    journals, torn = read_journals(tmp_path)
    executions = _cycle_executions(journals)

    errors = [
        f"{worker}: {record['traceback']}"
        for worker, records in journals.items()
        for record in records
        if record["kind"] == "error"
    ]
    assert not errors, "worker threads failed:\n" + "\n".join(errors[:5])
    _check_processes(fleet, run)
    assert run.finished, "workflows left unfinished after the drain deadline"
    assert len(fleet.kills()) >= CYCLE_KILLS
    journalled_points = {
        record["point"]
        for records in journals.values()
        for record in records
        if record["kind"] == "self-kill"
    }
    assert journalled_points == set(CYCLE_KILL_POINTS)

    problems: list[str] = []
    _check_chains(store, seeded, executions, problems)
    refused = _check_accepted_saves(store, executions, problems)
    takeovers, finished_by_others = _check_claim_history(store, executions, fleet, problems)
    _check_claim_rows(store, fleet, problems)
    heartbeats = _check_heartbeats(store, journals, problems)
    _report(problems, "problems")
    # The interesting paths were taken: stale saves met the fence, and claims of killed
    # processes expired and were taken over.
    zombies = sum(execution.sibling_token is not None for execution in executions.values())
    assert refused > 0 and zombies > 0 and heartbeats > 0
    assert takeovers > 0 and finished_by_others > 0
    tasks = sum(length for length, _ in seeded.values())
    _print_summary(
        "cycle",
        url,
        fleet,
        run,
        f"{len(seeded)} workflows, {tasks} tasks, {len(executions)} executions, "
        f"{refused} fenced saves refused, {zombies} zombies outlived by a sibling, "
        f"{heartbeats} heartbeats, "
        f"{takeovers} takeovers of killed claims, "
        f"{finished_by_others} abandoned tasks finished by others, {torn} torn journal lines",
    )


# --------------------------------------------------------------------------------------------
# The reference Worker


def _seed_forks(backend: SqlBackend, seeded: dict[str, bytes], count: int) -> None:
    for _ in range(count):
        number = len(seeded)
        instance_id, initial_input = f"fork-{number:05d}", f"order {number}".encode()
        snapshot: WorkflowSnapshot = fork_workflow(instance_id, initial_input)
        backend.save_snapshot(snapshot)
        seeded[instance_id] = initial_input


def _check_forks(
    store: Store,
    seeded: dict[str, bytes],
    journals: dict[str, list[dict[str, Any]]],
    problems: list[str],
) -> tuple[int, int]:
    """Completed, each task recorded once, outputs chained; (executions, takeovers)."""
    starts = {
        record["exec"]: record
        for records in journals.values()
        for record in records
        if record["kind"] == "start"
    }
    outcomes = {
        record["exec"]: record["outcome"]
        for records in journals.values()
        for record in records
        if record["kind"] == "outcome"
    }
    # The latest expiry each claim was granted (by its claim, then its heartbeats).
    expiry: dict[tuple[str, str, int], datetime] = {}
    for records in journals.values():
        for record in records:
            if record["kind"] in ("start", "extend"):
                claim = (record["instance"], record["task"], record["token"])
                granted = parse_time(record["expires_at"])
                expiry[claim] = max(expiry.get(claim, granted), granted)
    recorded: defaultdict[Key, list[str]] = defaultdict(list)
    for exec_id, outcome in outcomes.items():
        if outcome == "recorded":
            start = starts[exec_id]
            recorded[start["instance"], start["task"]].append(exec_id)
    failed = [exec_id for exec_id, outcome in outcomes.items() if outcome == "failed"]
    if failed:
        problems.append(f"executions that failed: {failed[:5]}")
    for key, exec_ids in recorded.items():
        if len(exec_ids) > 1:
            problems.append(f"{key}: recorded by {len(exec_ids)} executions")
    for instance_id, initial_input in seeded.items():
        row = store.workflows.get(instance_id)
        if row is None or row.status != WorkflowStatus.COMPLETED.value:
            problems.append(f"{instance_id}: not completed: {row and (row.status, row.position)}")
            continue
        outputs: dict[str, dict[str, Any]] = {}
        for task in ("a", "b1", "b2", "c"):
            result = store.results.get((instance_id, task))
            if result is None:
                problems.append(f"{instance_id}/{task}: no result")
                continue
            output = json.loads(result.output)
            outputs[task] = output
            started = starts.get(output["exec"])
            if started is None or (started["instance"], started["task"]) != (instance_id, task):
                problems.append(f"{instance_id}/{task}: stored result of no such execution")
            elif outcomes.get(output["exec"]) not in (None, "recorded"):
                problems.append(
                    f"{instance_id}/{task}: stored result of an execution that ended "
                    f"{outcomes[output['exec']]}"
                )
            elif not (
                parse_time(started["claimed_at"])
                <= result.completed_at
                < expiry[instance_id, task, started["token"]]
            ):
                problems.append(
                    f"{instance_id}/{task}: written at {result.completed_at}, outside the claim "
                    f"of its execution ({started['claimed_at']} .. "
                    f"{expiry[instance_id, task, started['token']]})"
                )
            if recorded.get((instance_id, task), [output["exec"]]) != [output["exec"]]:
                problems.append(f"{instance_id}/{task}: the recorded result is not the stored one")
        if len(outputs) < 4:
            continue
        stored = {task: digest(store.results[instance_id, task].output) for task in outputs}
        chained = (
            outputs["a"]["input"] == digest(initial_input)
            and outputs["b1"]["input"] == outputs["b2"]["input"] == stored["a"]
            and outputs["c"]["input"] in (stored["b1"], stored["b2"])
            and (outputs["c"]["b1"], outputs["c"]["b2"]) == (stored["b1"], stored["b2"])
        )
        if not chained:
            problems.append(f"{instance_id}: outputs do not chain: {outputs}")
        if row.output != store.results[instance_id, "c"].output:
            problems.append(f"{instance_id}: workflow output is not the join task's result")
    takeovers = sum(1 for start in starts.values() if start["token"] > 1)
    return len(starts), takeovers


@pytest.mark.multiprocess
def test_sigkilled_reference_workers(store_urls: list[str], tmp_path: Path) -> None:
    seed = _seed()
    url = store_urls[0]
    migrate(url)
    backend = SqlBackend(url)
    try:
        seeded: dict[str, bytes] = {}
        _seed_forks(backend, seeded, 2 * MIN_UNFINISHED)
        fleet = Fleet("worker", store_urls, tmp_path, random.Random(seed))
        run = _run_fleet(
            fleet,
            points=WORKER_KILL_POINTS,
            must_cover=False,
            kills_wanted=WORKER_KILLS,
            unfinished=_unfinished(backend),
            top_up=lambda: _seed_forks(backend, seeded, TOP_UP),
        )
    finally:
        backend.close()
    store = _read_store(url)
    journals, torn = read_journals(tmp_path)

    _check_processes(fleet, run)
    log_errors = [
        f"{worker}: {record['message']}"
        for worker, records in journals.items()
        for record in records
        if record["kind"] == "log-error"
    ]
    assert not log_errors, "workers logged errors:\n" + "\n".join(log_errors[:5])
    problems: list[str] = []
    executions, takeovers = _check_forks(store, seeded, journals, problems)
    _check_claim_rows(store, fleet, problems)
    heartbeats = _check_heartbeats(store, journals, problems)
    _report(problems, "problems")
    assert run.finished, "workflows left unfinished after the drain deadline"
    assert len(fleet.kills()) >= WORKER_KILLS
    assert takeovers > 0 and heartbeats > 0
    _print_summary(
        "worker",
        url,
        fleet,
        run,
        f"{len(seeded)} workflows, {executions} executions, {takeovers} by takeover, "
        f"{heartbeats} heartbeats, {torn} torn journal lines",
    )
