"""A PostgreSQL primary lost and its synchronous standby promoted: a backend given one URL naming
both servers carries on against the new primary, and no acknowledged write is lost."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers.clusters import PAIR_BASE_PORT, StandbyPair, wait_until
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
from sayiir_persistence import (
    BackendUnavailableError,
    CompletionOutcome,
    CompletionResult,
    TaskCompletion,
    WorkflowSnapshot,
    migrate,
)
from sayiir_persistence.sql.backend import SqlBackend

pytestmark = pytest.mark.failover

#: How long the backend may keep failing after the standby is promoted.
RECOVERY_SECONDS = 30


#: The same two servers in both forms of multi-host URL, through both drivers: SQLAlchemy's
#: (``?host=a:p&host=b:p``) and libpq's own (``@a:p,b:p/db``, rewritten by ``parse_url``).
URL_FORMS = {
    "psycopg2-query": StandbyPair.url(),
    "psycopg-libpq": (
        f"postgresql+psycopg://postgres@127.0.0.1:{PAIR_BASE_PORT},127.0.0.1:{PAIR_BASE_PORT + 1}"
        "/test?target_session_attrs=read-write"
    ),
}


@pytest.fixture(params=sorted(URL_FORMS))
def pair_url(request: pytest.FixtureRequest) -> str:
    return URL_FORMS[request.param]


@pytest.fixture
def backend(standby_pair: StandbyPair, pair_url: str) -> Iterator[SqlBackend]:
    migrate(pair_url)
    store = SqlBackend(pair_url)
    try:
        yield store
    finally:
        store.close()


def _write_accepted(backend: SqlBackend, instance_id: str) -> float:
    """Start a workflow, repeating while the backend is unavailable; when it succeeded.

    Raises:
        AssertionError: not within RECOVERY_SECONDS.
    """
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        try:
            backend.start_workflow(WorkflowSnapshot.new(instance_id, "h", first_task="t1"))
            return time.monotonic()
        except BackendUnavailableError:
            assert time.monotonic() < deadline, "no write accepted after the promotion"
            time.sleep(0.1)


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


def test_idle_workers_listen_again_on_the_new_primary(
    standby_pair: StandbyPair, backend: SqlBackend, pair_url: str
) -> None:
    """The work waiter's LISTEN connection dies with the primary; it connects again through
    the host list, to the promoted standby, and announcements wake it again (not only
    polling)."""
    backend.start_workflow(WorkflowSnapshot.new("before", "h", first_task="t1"))
    waiter = backend.work_waiter()
    announcer = SqlBackend(pair_url)
    try:
        assert not waiter.wait(0.1)  # listening now, nothing announced since
        standby_pair.kill_primary()
        standby_pair.promote()
        _write_accepted(announcer, "after-0")
        deadline = time.monotonic() + RECOVERY_SECONDS
        for number in itertools.count(1):
            # Each start announces work; the waiter reconnects at one of its waits.
            announcer.start_workflow(WorkflowSnapshot.new(f"after-{number}", "h", first_task="t1"))
            if waiter.wait(1.0):
                break
            assert time.monotonic() < deadline, "the waiter was not woken after the failover"
    finally:
        waiter.close()
        announcer.close()


def _replication_pid(pair: StandbyPair, server: str, process: str) -> int:
    """The pid of ``process`` (``walsender`` or ``walreceiver``), a child of ``server``'s
    postmaster (``primary`` or ``standby``)."""
    postmaster = (pair.directory / server / "postmaster.pid").read_text().split()[0]
    found = subprocess.run(
        ["pgrep", "-P", postmaster, "-f", process], capture_output=True, text=True, check=False
    )
    pids = found.stdout.split()
    assert len(pids) == 1, f"{process} of the {server}: {found.stdout!r}"
    return int(pids[0])


@pytest.mark.parametrize(
    "stopped",
    ["walsender", "walreceiver"],
    ids=["standby-lacks-the-commit", "standby-has-the-commit"],
)
def test_a_completion_whose_commit_is_unanswered_is_repeated_safely(
    standby_pair: StandbyPair, backend: SqlBackend, stopped: str
) -> None:
    """The primary dies while a ``complete_tasks`` COMMIT waits for the synchronous standby:
    the call raises ``BackendUnavailableError`` (outcome unknown; the backend does not run it
    again). Both outcomes, after the promotion, then the caller's repeat of the same
    completion (same token), as the Worker does:

    - the primary's WAL sender was stopped: the standby never got the commit; the repeat
      records the result (the claim, whose own commit the standby acknowledged, is held);
    - the standby's WAL receiver was stopped: the commit was on its way (in the socket), and
      the standby has it once it runs again; the repeat finds ``CLAIM_LOST`` and writes
      nothing.

    Either way: one result, recorded once; a further repeat writes nothing."""
    backend.start_workflow(WorkflowSnapshot.new("wf", "h", first_task="t1"))
    [claimed] = backend.claim_available_tasks("w", 1, timedelta(minutes=5))
    completion = TaskCompletion("wf", "t1", "w", claimed.claim.token, output=b"done")
    server = "primary" if stopped == "walsender" else "standby"
    replication = _replication_pid(standby_pair, server, stopped)
    os.kill(replication, signal.SIGSTOP)
    outcome: list[BaseException | list[CompletionResult]] = []

    def complete() -> None:
        try:
            outcome.append(backend.complete_tasks([completion], ttl=None))
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=complete)
    try:
        thread.start()
        time.sleep(1.0)
        assert not outcome, "the COMMIT did not wait for the synchronous standby"
        standby_pair.kill_primary()
        thread.join(RECOVERY_SECONDS)
        if stopped == "walsender":
            standby_pair.promote()  # the WAL sender stays stopped: nothing more reaches it
    finally:
        os.kill(replication, signal.SIGCONT)
    assert len(outcome) == 1 and isinstance(outcome[0], BackendUnavailableError), outcome
    if stopped == "walreceiver":
        time.sleep(0.5)  # the receiver writes out what it had received, then finds EOF
        standby_pair.promote()
    _write_accepted(backend, "after")
    if stopped == "walsender":
        assert backend.load_snapshot("wf").completed_tasks == {}
        [result] = backend.complete_tasks([completion], ttl=None)
        assert result.outcome is CompletionOutcome.RECORDED
    else:
        assert backend.load_snapshot("wf").completed_tasks == {"t1": b"done"}
    [again] = backend.complete_tasks([completion], ttl=None)
    assert again.outcome is CompletionOutcome.CLAIM_LOST
    assert backend.load_snapshot("wf").completed_tasks == {"t1": b"done"}


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
