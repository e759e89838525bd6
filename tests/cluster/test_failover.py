"""A PostgreSQL primary lost and its synchronous standby promoted: a backend given one URL naming
both servers carries on against the new primary, and no acknowledged write is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from helpers.clusters import StandbyPair, wait_until
from helpers.failover_workers import (
    Fleet,
    Spec,
    check_claims,
    check_worker_run,
    downtime_summary,
    fail_over,
    prepare,
    read_journals,
    run_workers_across_failover,
    start_single_tasks,
)
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


# --------------------------------------------------------------------------------------------
# Worker processes across the failover (not restarted)

#: The longest the workers may take to finish every workflow once the standby is promoted:
#: generous (the run itself takes a few seconds), not a timing test; the figures are
#: benchmarks/failover.py's.
FINISH_SECONDS = 120


@pytest.mark.parametrize("kill_workers", [0, 2], ids=["workers-live", "workers-sigkilled"])
def test_worker_processes_carry_on_across_a_failover(
    standby_pair: StandbyPair, tmp_path: Path, kill_workers: int
) -> None:
    run = run_workers_across_failover(
        standby_pair, tmp_path, kill_workers=kill_workers, finish_timeout=FINISH_SECONDS
    )
    problems = check_worker_run(run)
    assert not problems, "\n".join(problems[:40])
    executions = len(run.records("exec"))
    recorded = sum(len(s.completed_tasks) for s in run.snapshots.values())
    downtimes = run.worker_downtimes()
    # Every surviving process reached the new primary by itself.
    survivors = set(run.exit_codes) - run.killed - {f"w{n}" for n in range(3, 3 + kill_workers)}
    assert set(downtimes) >= survivors
    assert max(downtimes.values()) < RECOVERY_SECONDS
    # The failover was mid-run: results were recorded on both primaries.
    acks = [r for r in run.records("ok") if r["call"] == "complete"]
    assert any(r["sent"] < run.failover.killed_at for r in acks)
    assert any(r["sent"] > run.failover.promoted_at for r in acks)
    print(
        f"\n{len(run.snapshots)} workflows, {recorded} results recorded, {executions} executions;"
        f" first write accepted {run.failover.first_write_at - run.failover.killed_at:.2f} s"
        f" after the kill; workers' first call answered after the kill: "
        f"{downtime_summary(list(downtimes.values()))}"
    )


def test_claims_from_several_processes_across_a_failover(
    standby_pair: StandbyPair, tmp_path: Path
) -> None:
    """Claimers in three processes race for a few tasks, releasing or abandoning their claims,
    while the primary is lost and the standby promoted: one holder per task at any time and
    no fencing token handed out twice, before, across and after the failover (the standby
    has every claim that was acknowledged, and the tokens go on from there)."""
    url = standby_pair.url()
    prepare(url)
    start_single_tasks(url, 6)
    fleet = Fleet(tmp_path)
    for n in range(3):
        fleet.start(Spec("claimer", url, str(tmp_path), f"c{n}", 2, 1.0, 1000 + n))
    fleet.wait_ready()

    def claims() -> list[dict[str, Any]]:
        journals, _ = read_journals(tmp_path)
        return [r for rs in journals.values() for r in rs if r["kind"] == "claim"]

    wait_until(lambda: len(claims()) >= 40, 60, "40 claims before the failover")
    failover = fail_over(standby_pair, promote_after=1.0)
    after = datetime.fromtimestamp(failover.promoted_at, UTC)
    wait_until(
        lambda: sum(1 for c in claims() if datetime.fromisoformat(c["claimed_at"]) > after) >= 40,
        RECOVERY_SECONDS + 30,
        "40 claims after the promotion",
    )
    codes = fleet.stop()
    assert all(code == 0 for code in codes.values()), codes
    journals, _ = read_journals(tmp_path)
    problems = check_claims(journals)
    assert not problems, "\n".join(problems[:40])
    before = datetime.fromtimestamp(failover.killed_at, UTC)
    spanned = {
        (c["instance"], c["task"])
        for c in claims()
        if datetime.fromisoformat(c["claimed_at"]) < before
    } & {
        (c["instance"], c["task"])
        for c in claims()
        if datetime.fromisoformat(c["claimed_at"]) > after
    }
    assert spanned, "no task was claimed both before and after the failover"
