"""A 3-node MariaDB Galera cluster: every node takes writes, and claims stay exclusive when the
workers racing for them are connected to different nodes."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from helpers.clusters import GaleraCluster, wait_until
from sayiir_persistence import (
    BackendUnavailableError,
    ClaimedTask,
    CompletionOutcome,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    WorkflowTerminalError,
    migrate,
)
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.sql.schema import task_claims, task_results
from sayiir_persistence.testing.contract.completions import chain

pytestmark = pytest.mark.galera

DATABASE = "sayiir_galera"
TASKS = 60
THREADS_PER_NODE = 4


@pytest.fixture
def node_backends(galera_cluster: GaleraCluster) -> Iterator[list[SqlBackend]]:
    """One backend per node, on this module's database, migrated through node 1 and emptied."""
    galera_cluster.create_database(DATABASE)
    urls = galera_cluster.node_urls(DATABASE)
    migrate(urls[0])
    backends = [SqlBackend(url) for url in urls]
    try:
        for instance_id in backends[0].list_snapshots(limit=10_000):
            backends[0].delete_snapshot(instance_id)
        yield backends
    finally:
        for backend in backends:
            backend.close()


def test_a_workflow_written_on_one_node_is_read_on_the_others(
    node_backends: list[SqlBackend],
) -> None:
    first, *others = node_backends
    first.start_workflow(WorkflowSnapshot.new("wf", "h", first_task="t1"))
    for backend in others:
        assert backend.load_snapshot("wf").version == 1


def test_claim_task_race_across_nodes_has_one_winner_per_task(
    node_backends: list[SqlBackend],
) -> None:
    first = node_backends[0]
    for number in range(TASKS):
        first.start_workflow(WorkflowSnapshot.new(f"wf{number}", "h", first_task="t1"))

    def race(worker: int) -> list[str]:
        backend = node_backends[worker % len(node_backends)]
        won = []
        for number in range(TASKS):
            claim = backend.claim_task(f"wf{number}", "t1", f"w{worker}", timedelta(minutes=5))
            if claim is not None:
                won.append(claim.instance_id)
        return won

    workers = THREADS_PER_NODE * len(node_backends)
    with ThreadPoolExecutor(workers) as pool:
        winners = Counter(i for won in pool.map(race, range(workers)) for i in won)

    assert winners == Counter({f"wf{number}": 1 for number in range(TASKS)})


CHAIN = ("s1", "s2", "s3")
CHAINS = 40


def _rows(url: str, table: sa.Table) -> list[sa.Row[Any]]:
    """Every row of ``table``, read directly; the server's wsrep_sync_wait (set by
    scripts/galera-cluster) makes the read wait for what the other nodes committed."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET SESSION wsrep_sync_wait = 1")
            return list(conn.execute(sa.select(table)).all())
    finally:
        engine.dispose()


def test_claims_and_completions_with_next_claims_race_across_nodes(
    node_backends: list[SqlBackend], galera_cluster: GaleraCluster
) -> None:
    """Workers on every node claim (claim_available_tasks) and complete in batches with next
    claims (complete_tasks): every task handed out once, every result recorded once."""
    first = node_backends[0]
    for number in range(CHAINS):
        first.start_workflow(WorkflowSnapshot.new(f"chain{number}", "h", first_task=CHAIN[0]))

    def work(worker: int) -> tuple[list[tuple[str, str]], list[str]]:
        backend = node_backends[worker % len(node_backends)]
        worker_id = f"w{worker}"
        handed: list[tuple[str, str]] = []
        problems: list[str] = []
        held: list[ClaimedTask] = []
        empty = 0
        while empty < 5:
            if not held:
                held = backend.claim_available_tasks(worker_id, 3, timedelta(minutes=5))
            if not held:
                empty += 1
                time.sleep(0.05 * empty)
                continue
            empty = 0
            completions = []
            for claimed in held:
                key = (claimed.task.instance_id, claimed.task.task_id)
                handed.append(key)
                completions.append(
                    TaskCompletion(
                        *key,
                        worker_id,
                        claimed.claim.token,
                        output="/".join(key).encode(),
                        advance=chain(*CHAIN),
                    )
                )
            results = backend.complete_tasks(
                completions, ttl=timedelta(minutes=5), claim_next=worker % 3
            )
            held = []
            for completion, result in zip(completions, results, strict=True):
                if result.outcome is not CompletionOutcome.RECORDED:
                    problems.append(f"{completion.instance_id}/{completion.task_id}: {result}")
                held += [claimed for claimed in result.next_tasks]
        return handed, problems

    workers = THREADS_PER_NODE * len(node_backends)
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(work, range(workers)))
    assert [p for _, problems in outcomes for p in problems] == []
    handed = Counter(key for keys, _ in outcomes for key in keys)
    expected = {(f"chain{number}", step) for number in range(CHAINS) for step in CHAIN}
    assert handed == Counter(dict.fromkeys(expected, 1))
    # On node 1, read directly: one result per task, its own output; every claim released.
    url = galera_cluster.node_url(1, DATABASE)
    results = Counter((row.instance_id, row.task_id) for row in _rows(url, task_results))
    assert results == Counter(dict.fromkeys(expected, 1))
    # (Tokens go on from earlier runs' instances of the same ids: not compared.)
    claims = Counter(
        (row.instance_id, row.task_id, bool(row.released)) for row in _rows(url, task_claims)
    )
    assert claims == Counter({(*key, True): 1 for key in expected})
    for number in (0, CHAINS - 1):
        stored = first.load_snapshot(f"chain{number}")
        assert stored.status is WorkflowStatus.COMPLETED
        assert stored.output == f"chain{number}/{CHAIN[-1]}".encode()


FENCED_RACES = 30
SHORT_TTL = timedelta(seconds=2)


def test_fenced_save_at_expiry_races_a_takeover_on_another_node(
    node_backends: list[SqlBackend],
) -> None:
    """A holder on node 1 saves (fenced, completing its workflow) just as its claim expires,
    while a newcomer on node 2 takes the claim over: never both. Either the save was first
    (the task is gone: no takeover) or the takeover was (the save is refused), however the
    two transactions interleave across the nodes."""
    holder, newcomer = node_backends[0], node_backends[1]
    keys = [(f"fence{number}", "t1") for number in range(FENCED_RACES)]
    tokens = {}
    for instance_id, task_id in keys:
        holder.start_workflow(WorkflowSnapshot.new(instance_id, "h", first_task=task_id))
        claim = holder.claim_task(instance_id, task_id, "old", SHORT_TTL)
        assert claim is not None
        tokens[instance_id] = (claim.token, claim.expires_at)
    rng = random.Random(15)

    def save(key: tuple[str, str], delay: float) -> str:
        instance_id, task_id = key
        snapshot = holder.load_snapshot(instance_id)
        snapshot.mark_task_completed(task_id, b"old")
        snapshot.mark_completed(b"old")
        token, expires_at = tokens[instance_id]
        assert expires_at is not None
        _sleep_until(expires_at.timestamp() - delay)
        try:
            saved = holder.save_snapshot_fenced(snapshot, task_id, "old", token=token)
        except (WorkflowTerminalError, BackendUnavailableError) as error:
            return type(error).__name__
        return "saved" if saved else "refused"

    def take_over(key: tuple[str, str], delay: float) -> str:
        instance_id, task_id = key
        _, expires_at = tokens[instance_id]
        assert expires_at is not None
        _sleep_until(expires_at.timestamp() - delay)
        give_up = expires_at.timestamp() + 5.0
        last = "not taken"
        while time.time() < give_up:
            try:
                claim = newcomer.claim_task(instance_id, task_id, "new", timedelta(minutes=5))
            except BackendUnavailableError as error:
                last = f"not taken: {error}"
                continue
            if claim is not None:
                return "taken"
            if holder.load_snapshot(instance_id).status is WorkflowStatus.COMPLETED:
                return "gone"
        return last

    with ThreadPoolExecutor(2 * FENCED_RACES) as pool:
        saves = [pool.submit(save, key, rng.uniform(-0.02, 0.03)) for key in keys]
        takeovers = [pool.submit(take_over, key, 0.05) for key in keys]
        outcomes = [(s.result(), t.result()) for s, t in zip(saves, takeovers, strict=True)]

    both = [
        key for key, outcome in zip(keys, outcomes, strict=True) if outcome == ("saved", "taken")
    ]
    assert both == [], f"saved by the old holder and taken over: {both}"
    for (instance_id, _), (saved, taken) in zip(keys, outcomes, strict=True):
        stored = holder.load_snapshot(instance_id)
        if saved == "saved":
            assert stored.status is WorkflowStatus.COMPLETED and stored.output == b"old"
        else:
            assert taken == "taken", (instance_id, saved, taken)
            assert stored.status is WorkflowStatus.IN_PROGRESS
    print(f"\n[fenced race] {Counter(outcomes)}")


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def test_a_partitioned_node_refuses_calls_and_the_others_carry_on(
    node_backends: list[SqlBackend], galera_cluster: GaleraCluster
) -> None:
    """Node 3 cut off from the others (gmcast.isolate) leaves the primary component: its
    calls fail with BackendUnavailableError, never with a wrong answer; nodes 1 and 2 (the
    majority) go on taking writes; back, node 3 catches up and serves them."""
    first, _, third = node_backends
    first.start_workflow(WorkflowSnapshot.new("before", "h", first_task="t1"))
    assert third.load_snapshot("before").version == 1
    galera_cluster.isolate(3)
    try:
        wait_until(lambda: not galera_cluster.ready(3), 30, "node 3 out of the primary component")
        for call in (
            lambda: third.load_snapshot("before"),
            lambda: third.claim_task("before", "t1", "w3", timedelta(minutes=5)),
            lambda: third.claim_available_tasks("w3", 1, timedelta(minutes=5)),
            lambda: third.start_workflow(WorkflowSnapshot.new("on3", "h", first_task="t1")),
        ):
            with pytest.raises(BackendUnavailableError):
                call()
        claim = first.claim_task("before", "t1", "w1", timedelta(minutes=5))
        assert claim is not None
        first.start_workflow(WorkflowSnapshot.new("during", "h", first_task="t1"))
    finally:
        galera_cluster.isolate(3, isolated=False)
    wait_until(lambda: galera_cluster.ready(3), 60, "node 3 back in the primary component")
    assert third.load_snapshot("during").version == 1
    assert third.claim_task("before", "t1", "w3", timedelta(minutes=5)) is None
    assert third.claim_task("during", "t1", "w3", timedelta(minutes=5)) is not None


KILL_WORKFLOWS = 600
KILL_TTL = timedelta(seconds=3)


def test_a_killed_node_loses_no_acknowledged_completion_and_records_none_twice(
    node_backends: list[SqlBackend], galera_cluster: GaleraCluster
) -> None:
    """Workers on every node drain a backlog (claim_available_tasks -> complete_tasks) while
    node 3 is SIGKILLed mid-run. Its workers get BackendUnavailableError, then go on through
    node 1 (as through a list of nodes); their claims left unanswered expire and are taken
    over. Every task ends recorded exactly once, every completion acknowledged as recorded
    is stored with its output (none lost, none overwritten), the workers of nodes 1 and 2
    never failed. Node 3 is started again afterwards (it rejoins and catches up)."""
    first = node_backends[0]
    for number in range(KILL_WORKFLOWS):
        first.start_workflow(WorkflowSnapshot.new(f"kill{number}", "h", first_task="t1"))
    killed = threading.Event()

    def work(worker: int) -> tuple[dict[tuple[str, str], bytes], list[str], int, float, int]:
        node = worker % len(node_backends)
        backend = node_backends[node]
        worker_id = f"w{worker}"
        acknowledged: dict[tuple[str, str], bytes] = {}
        problems: list[str] = []
        failures = empty = lost = 0
        slowest = 0.0
        while empty < 10:
            started = time.monotonic()
            try:
                batch = backend.claim_available_tasks(worker_id, 2, KILL_TTL)
                if not batch:
                    empty += 1
                    time.sleep(0.3)
                    continue
                empty = 0
                completions = [
                    TaskCompletion(
                        claimed.task.instance_id,
                        claimed.task.task_id,
                        worker_id,
                        claimed.claim.token,
                        output=f"{worker_id}/{claimed.claim.token}".encode(),
                    )
                    for claimed in batch
                ]
                results = backend.complete_tasks(completions, ttl=KILL_TTL)
                slowest = max(slowest, time.monotonic() - started)
            except BackendUnavailableError as error:
                failures += 1
                if node != 2 or not killed.is_set():
                    problems.append(f"{worker_id} on node {node + 1}: {error}")
                backend = first  # the next node of its list
                time.sleep(0.1)
                continue
            for completion, result in zip(completions, results, strict=True):
                if result.outcome is CompletionOutcome.RECORDED:
                    key = (completion.instance_id, completion.task_id)
                    assert completion.output is not None
                    acknowledged[key] = completion.output
                elif result.outcome is CompletionOutcome.CLAIM_LOST:
                    # The cluster stalls its commits while it decides that node 3 is gone
                    # (seconds): claims expire meanwhile and are taken over, as they should.
                    lost += 1
                else:
                    problems.append(f"{worker_id}: {completion.instance_id}: {result}")
        return acknowledged, problems, failures, slowest if node != 2 else 0.0, lost

    def kill_node_3() -> None:
        wait_until(
            lambda: (
                len(_rows(galera_cluster.node_url(1, DATABASE), task_results))
                >= KILL_WORKFLOWS // 4
            ),
            60,
            "a quarter of the backlog done",
        )
        # Set first: node 3's workers see their connections die as soon as the process does,
        # maybe before this thread runs again.
        killed.set()
        galera_cluster.kill(3)

    workers = THREADS_PER_NODE * len(node_backends)
    try:
        with ThreadPoolExecutor(workers + 1) as pool:
            killer = pool.submit(kill_node_3)
            outcomes = list(pool.map(work, range(workers)))
            killer.result()
        url = galera_cluster.node_url(1, DATABASE)
        stored = Counter((row.instance_id, row.task_id) for row in _rows(url, task_results))
        outputs = {(row.instance_id, row.task_id): row.output for row in _rows(url, task_results)}
    finally:
        galera_cluster.start_node(3)

    assert [p for _, problems, *_ in outcomes for p in problems] == []
    expected = {(f"kill{number}", "t1") for number in range(KILL_WORKFLOWS)}
    assert stored == Counter(dict.fromkeys(expected, 1))
    acknowledged: dict[tuple[str, str], bytes] = {}
    for mine, *_ in outcomes:
        assert not mine.keys() & acknowledged.keys(), "a task acknowledged as recorded twice"
        acknowledged |= mine
    lost = {key: output for key, output in acknowledged.items() if outputs.get(key) != output}
    assert lost == {}, f"acknowledged completions not stored: {lost}"
    node3_failures = sum(o[2] for worker, o in enumerate(outcomes) if worker % 3 == 2)
    assert node3_failures > 0, "node 3's workers never noticed it was gone"
    # Node 3 rejoined and caught up: it serves what the others wrote meanwhile.
    assert node_backends[2].load_snapshot(f"kill{KILL_WORKFLOWS - 1}").status in (
        WorkflowStatus.IN_PROGRESS,
        WorkflowStatus.COMPLETED,
    )
    print(
        f"\n[killed node] {len(acknowledged)} of {KILL_WORKFLOWS} acknowledged, "
        f"{KILL_WORKFLOWS - len(acknowledged)} unacknowledged (recorded by an unanswered "
        f"call or taken over), {node3_failures} failed calls on node 3, "
        f"{sum(o[4] for o in outcomes)} completions refused (claim expired meanwhile), "
        f"slowest call on nodes 1-2 {max(o[3] for o in outcomes):.1f} s"
    )


HOPS = 150


def test_a_worker_whose_calls_go_to_different_nodes_sees_its_own_commits(
    node_backends: list[SqlBackend],
) -> None:
    """As behind a load balancer: each call of one worker reaches the next node. The backend
    sets ``wsrep_sync_wait`` (reads, updates and deletes) on Galera sessions, so every call
    sees the worker's earlier commits made through other nodes: the claim made on node 2 is
    renewed on node 3 (a transaction that begins with an UPDATE) and completed on node 1."""
    first, second, third = node_backends
    for number in range(HOPS):
        instance_id = f"hop{number}"
        first.start_workflow(WorkflowSnapshot.new(instance_id, "h", first_task="t1"))
        claim = second.claim_task(instance_id, "t1", "hopper", timedelta(minutes=5))
        assert claim is not None, instance_id
        renewed = third.extend_task_claim(
            instance_id, "t1", "hopper", timedelta(minutes=5), token=claim.token
        )
        assert renewed.token == claim.token
        [result] = first.complete_tasks(
            [TaskCompletion(instance_id, "t1", "hopper", claim.token, output=b"done")],
            ttl=timedelta(minutes=5),
        )
        assert result.outcome is CompletionOutcome.RECORDED, (instance_id, result)


def test_concurrent_migrations_through_one_node_queue(galera_cluster: GaleraCluster) -> None:
    """The migration lock (``GET_LOCK``) is per node on Galera: migrations run through one
    node, as the README asks, still queue, and the schema replicates to the others."""
    name = f"sayiir_galera_migrate_{int(time.time() * 1000) % 10**9}"
    galera_cluster.create_database(name)
    urls = galera_cluster.node_urls(name)
    try:
        # Processes, as concurrent deployments would be (Alembic's context is per process).
        with multiprocessing.get_context("spawn").Pool(3) as pool:
            pool.map(migrate, [urls[0]] * 3)
        for url in urls:
            SqlBackend(url).close()  # checks the schema is at head on every node
    finally:
        engine = sa.create_engine(urls[0], poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE `{name}`")
        finally:
            engine.dispose()
