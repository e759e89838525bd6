"""A PostgreSQL primary lost and its synchronous standby promoted: a backend given one URL naming
both servers carries on against the new primary, and no acknowledged write is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from helpers.clusters import StandbyPair
from sayiir_persistence import BackendUnavailableError, WorkflowSnapshot, migrate
from sayiir_persistence.sql.backend import SqlBackend

pytestmark = pytest.mark.failover

#: How long the backend may keep failing after the standby is promoted.
RECOVERY_SECONDS = 30


@pytest.fixture
def backend(standby_pair: StandbyPair) -> Iterator[SqlBackend]:
    migrate(standby_pair.url())
    store = SqlBackend(standby_pair.url())
    try:
        yield store
    finally:
        store.close()


def test_a_backend_carries_on_after_the_standby_is_promoted(
    standby_pair: StandbyPair, backend: SqlBackend
) -> None:
    acknowledged = [f"before-{number}" for number in range(20)]
    for instance_id in acknowledged:
        backend.start_workflow(WorkflowSnapshot.new(instance_id, "h", first_task="t1"))

    standby_pair.kill_primary()
    with pytest.raises(BackendUnavailableError):
        backend.load_snapshot("before-0")
    standby_pair.promote()

    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        try:
            backend.start_workflow(WorkflowSnapshot.new("after", "h", first_task="t1"))
            break
        except BackendUnavailableError:
            assert time.monotonic() < deadline, "no write accepted after the promotion"
            time.sleep(0.2)

    assert sorted(backend.list_snapshots()) == sorted([*acknowledged, "after"])
