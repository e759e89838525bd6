"""A 3-node MariaDB Galera cluster: every node takes writes, and claims stay exclusive when the
workers racing for them are connected to different nodes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from helpers.clusters import GaleraCluster
from sayiir_persistence import WorkflowSnapshot, migrate
from sayiir_persistence.sql.backend import SqlBackend

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
