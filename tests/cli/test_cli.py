"""The operator commands of ``sayiir-persistence``, run as a real process.

Every test starts the console script (``python -m sayiir_persistence``) in a subprocess against
a database of its own (SQLite file; PostgreSQL schema, MySQL database: see
``helpers/isolated_db.py``), seeded through the Python API in the test process. Output is read
as people see it (tables) and as scripts do (``--json`` parsed with ``json.loads``); error exits
are checked for their status and their one line on stderr.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from helpers.isolated_db import isolated_database
from sayiir_persistence import (
    AtFork,
    CompletionOutcome,
    NotFoundError,
    SignalKind,
    SignalRequest,
    SqlBackend,
    TaskClaim,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
    cli,
    migrate,
)
from sayiir_persistence.cli import database as cli_database
from sayiir_persistence.cli import format_duration, parse_duration
from sayiir_persistence.inspection import StoreInspector
from sayiir_persistence.provisioning import URL_ENV_VAR
from sayiir_persistence.sql.schema import task_claims, task_results, workflows

pytestmark = pytest.mark.timeout(180)

BINARY = bytes(range(256)) * 4
LONG_TTL = timedelta(minutes=10)


# --------------------------------------------------------------------------------------------
# Running the command


def run(
    *args: str, url: str | None = None, env_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``sayiir-persistence ARGS [--url URL]``; ``$SAYIIR_DATABASE_URL`` unset or ``env_url``."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop(URL_ENV_VAR, None)
    if env_url is not None:
        env[URL_ENV_VAR] = env_url
    command = [sys.executable, "-m", "sayiir_persistence", *args]
    if url is not None:
        command += ["--url", url]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, check=False
    )


def ok(*args: str, url: str | None = None, env_url: str | None = None) -> str:
    completed = run(*args, url=url, env_url=env_url)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stderr == ""
    return completed.stdout


def ok_json(*args: str, url: str) -> Any:
    return json.loads(ok(*args, "--json", url=url))


def failure(expected: int, *args: str, url: str | None = None) -> str:
    """Run, expect exit status ``expected``; return stderr (checked free of tracebacks)."""
    completed = run(*args, url=url)
    output = completed.stdout + completed.stderr
    assert completed.returncode == expected, output
    assert "Traceback" not in output
    return completed.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sayiir-persistence: error: "), stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# Databases


@pytest.fixture
def backend(store_url: str) -> Iterator[SqlBackend]:
    with SqlBackend(store_url) as backend:
        yield backend


def seed(backend: SqlBackend) -> None:
    """A small store with one workflow of each interesting shape.

    - ``order-1``: at a fork after ``validate``; ``reserve`` held by worker-a (live),
      ``charge`` claimed by worker-b for a millisecond (expired);
    - ``order-2``: at ``validate``, held by worker-b with no expiry (live);
    - ``order-3``: at ``validate``, claim released;
    - ``order-4``: completed, with a binary task output;
    - ``order-5``: failed.
    """
    for number in range(1, 6):
        backend.save_snapshot(
            WorkflowSnapshot.new(
                f"order-{number}",
                "orders-v1",
                initial_input=b'{"sku": "A1", "qty": 2}',
                first_task="validate",
                priority=2 if number == 1 else 3,
                tags=("eu",) if number == 1 else (),
            )
        )
    first = backend.load_snapshot("order-1")
    first.mark_task_completed("validate", b'{"valid": true}')
    first.move_to(AtFork("payment", ("reserve", "charge")))
    backend.save_snapshot(first)
    assert backend.claim_task("order-1", "reserve", "worker-a", LONG_TTL)
    assert backend.claim_task("order-1", "charge", "worker-b", timedelta(milliseconds=1))
    assert backend.claim_task("order-2", "validate", "worker-b", None)
    assert backend.claim_task("order-3", "validate", "worker-a", LONG_TTL)
    backend.release_task_claim("order-3", "validate", "worker-a")

    done = backend.load_snapshot("order-4")
    done.mark_task_completed("validate", BINARY)
    done.mark_completed(b'{"shipped": true}')
    backend.save_snapshot(done)
    failed = backend.load_snapshot("order-5")
    failed.mark_failed("card declined")
    backend.save_snapshot(failed)


# --------------------------------------------------------------------------------------------
# list


def test_list_pages_through_instances_in_id_order(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    page = ok_json("list", "--limit", "2", url=store_url)
    assert [row["instance_id"] for row in page["instances"]] == ["order-1", "order-2"]
    assert page["next_after"] == "order-2"
    first = page["instances"][0]
    assert first["status"] == "in_progress" and first["version"] == 2
    assert datetime.fromisoformat(first["updated_at"]).tzinfo is not None

    page = ok_json("list", "--limit", "2", "--after", "order-2", url=store_url)
    assert [row["instance_id"] for row in page["instances"]] == ["order-3", "order-4"]
    page = ok_json("list", "--limit", "2", "--after", "order-4", url=store_url)
    assert [row["instance_id"] for row in page["instances"]] == ["order-5"]
    assert page["next_after"] is None

    page = ok_json("list", "--status", "completed", url=store_url)
    assert page == {
        "instances": [
            {
                "instance_id": "order-4",
                "status": "completed",
                "version": 2,
                "updated_at": page["instances"][0]["updated_at"],
            }
        ],
        "next_after": None,
    }

    table = ok("list", "--limit", "3", url=store_url)
    for expected in (
        "Instance",
        "Status",
        "order-1",
        "order-3",
        "in_progress",
        "more: --after order-3",
    ):
        assert expected in table
    assert "order-4" not in table
    assert "failed" in ok("list", "--status", "FAILED", url=store_url)


def test_list_shows_why_and_where_failed_workflows_failed(
    backend: SqlBackend, store_url: str
) -> None:
    seed(backend)  # order-5: failed at validate, "card declined"
    backend.save_snapshot(WorkflowSnapshot.new("job-3", "orders-v1", first_task="charge"))
    claim = backend.claim_task("job-3", "charge", "worker-a", LONG_TTL)
    assert claim is not None
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "charge.py", line 12, in run\n'
        "RuntimeError: the payment gateway timed out after 30 seconds"
    )
    fail_task(backend, claim, traceback)

    failed = ok_json("list", "--status", "failed", url=store_url)["instances"]
    assert [(i["instance_id"], i["error"], i["failed_tasks"]) for i in failed] == [
        ("job-3", traceback, ["charge"]),
        ("order-5", "card declined", ["validate"]),
    ]
    # The other statuses keep their shape.
    everything = ok_json("list", url=store_url)["instances"]
    assert {tuple(i) for i in everything if i["status"] != "failed"} == {
        ("instance_id", "status", "version", "updated_at")
    }

    table = ok("list", "--status", "failed", url=store_url)
    for expected in ("Failed at", "Error", "charge", "card declined", "validate"):
        assert expected in table, expected
    assert 'Traceback (most recent call last): File "charge.py"' in table  # one line
    assert "after 30 seconds" not in table  # cut short
    assert "Failed at" not in ok("list", "--status", "completed", url=store_url)


def test_list_reads_the_url_from_the_environment(backend: SqlBackend, store_url: str) -> None:
    assert ok_json("list", url=store_url) == {"instances": [], "next_after": None}
    assert "no workflow instances" in ok("list", env_url=store_url)
    seed(backend)
    assert "order-5" in ok("list", env_url=store_url)
    # --url wins over the environment.
    completed = run("list", "--url", store_url, env_url="postgresql://nobody@127.0.0.1:1/none")
    assert completed.returncode == 0 and "order-5" in completed.stdout


# --------------------------------------------------------------------------------------------
# show


def test_show_prints_snapshot_claims_and_signals(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    backend.store_signal(
        "order-1", SignalKind.CANCEL, SignalRequest("customer called", "support-7")
    )
    table = ok("show", "order-1", url=store_url)
    for expected in (
        "Workflow order-1",
        "in_progress",
        "at fork payment: reserve, charge",
        "orders-v1",
        "eu",
        '23 B  {"sku": "A1", "qty": 2}',  # input: size and preview
        "validate",
        '{"valid": true}',
        "15 B",
        "worker-a",
        "worker-b",
        "live",
        "expired",
        "Pending signals (1)",
        "by support-7: customer called",
    ):
        assert expected in table, expected

    shown = ok_json("show", "order-1", url=store_url)
    assert shown["instance_id"] == "order-1"
    assert shown["status"] == "in_progress"
    assert shown["position"] == {
        "kind": "fork",
        "fork_id": "payment",
        "branch_task_ids": ["reserve", "charge"],
    }
    assert (shown["version"], shown["priority"], shown["tags"]) == (2, 2, ["eu"])
    assert shown["initial_input"]["size"] == 23
    assert base64.b64decode(shown["initial_input"]["base64"]) == b'{"sku": "A1", "qty": 2}'
    assert list(shown["completed_tasks"]) == ["validate"]
    assert base64.b64decode(shown["completed_tasks"]["validate"]["base64"]) == b'{"valid": true}'
    assert shown["output"] is None and shown["error"] is None
    claims = {claim["task_id"]: claim for claim in shown["claims"]}
    assert claims["reserve"]["state"] == "live" and claims["reserve"]["worker_id"] == "worker-a"
    assert claims["charge"]["state"] == "expired" and claims["charge"]["token"] == 1
    assert shown["pending_signals"]["cancel"]["requested_by"] == "support-7"
    assert shown["pending_signals"]["cancel"]["reason"] == "customer called"
    assert "pause" not in shown["pending_signals"]
    assert datetime.fromisoformat(shown["database_time"]) >= datetime.fromisoformat(
        shown["updated_at"]
    )


def test_show_finished_workflows_with_binary_payloads(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    done = ok_json("show", "order-4", url=store_url)
    assert done["status"] == "completed"
    assert done["completed_tasks"]["validate"]["size"] == len(BINARY)
    assert base64.b64decode(done["completed_tasks"]["validate"]["base64"]) == BINARY
    assert base64.b64decode(done["output"]["base64"]) == b'{"shipped": true}'
    assert done["claims"] == [] and done["pending_signals"] == {}
    table = ok("show", "order-4", url=store_url)
    assert "1.0 KiB" in table and "hex 00 01 02" in table  # not text: a hex preview
    assert "Claims: none" in table and "Pending signals: none" in table

    failed = ok_json("show", "order-5", url=store_url)
    assert (failed["status"], failed["error"]) == ("failed", "card declined")
    assert "card declined" in ok("show", "order-5", url=store_url)


def test_show_prints_attempts_deadlines_and_retry_waits(
    backend: SqlBackend, store_url: str
) -> None:
    snapshot = WorkflowSnapshot.new("job-2", "orders-v1")
    snapshot.move_to(AtFork("f", ("a", "b")))
    backend.save_snapshot(snapshot)
    a = backend.claim_task("job-2", "a", "worker-a", LONG_TTL)
    assert a is not None
    flaky = TaskCompletion(
        "job-2", "a", "worker-a", a.token, error="disk full\n  at line 3", retry_after=LONG_TTL
    )
    [scheduled] = backend.complete_tasks([flaky], ttl=LONG_TTL)
    assert scheduled.outcome is CompletionOutcome.RETRY_SCHEDULED
    assert backend.claim_task("job-2", "b", "worker-b", LONG_TTL)
    backend.release_task_claim("job-2", "b", "worker-b")
    b = backend.claim_task("job-2", "b", "worker-b", LONG_TTL, timeout=timedelta(minutes=30))
    assert b is not None and b.attempt == 2 and b.deadline is not None

    shown = ok_json("show", "job-2", url=store_url)
    claims = {claim["task_id"]: claim for claim in shown["claims"]}
    assert claims["a"]["worker_id"] == "" and claims["a"]["waiting_to_retry"] is True
    assert (claims["a"]["attempt"], claims["a"]["state"]) == (1, "live")
    assert claims["a"]["last_error"] == "disk full\n  at line 3"
    assert claims["a"]["deadline"] is None
    assert claims["b"]["worker_id"] == "worker-b" and claims["b"]["waiting_to_retry"] is False
    assert (claims["b"]["attempt"], claims["b"]["last_error"]) == (2, None)
    assert datetime.fromisoformat(claims["b"]["deadline"]) == b.deadline

    table = ok("show", "job-2", url=store_url)
    for expected in ("Attempt", "Deadline", "Last error", "waiting to retry until", "worker-b"):
        assert expected in table, expected
    assert "disk full at line 3" in table  # on one line

    # A retry drops both claims and counts anew: no attempt since.
    fail_task(backend, b, "out of memory")
    ok("retry", "job-2", url=store_url)
    dropped = ok_json("show", "job-2", url=store_url)["claims"]
    assert [(c["task_id"], c["state"], c["attempt"]) for c in dropped] == [
        ("a", "released", 0),
        ("b", "released", 0),
    ]
    assert "retry wait, dropped" in ok("show", "job-2", url=store_url)

    # Without deadlines nor errors, the claims table has no column for them.
    seed(backend)
    plain = ok("show", "order-1", url=store_url)
    assert "Attempt" in plain and "Deadline" not in plain and "Last error" not in plain


# --------------------------------------------------------------------------------------------
# claims


def test_claims_lists_live_claims_by_the_database_clock(
    backend: SqlBackend, store_url: str
) -> None:
    seed(backend)
    live = ok_json("claims", url=store_url)
    assert [(c["instance_id"], c["task_id"], c["worker_id"]) for c in live["claims"]] == [
        ("order-1", "reserve", "worker-a"),
        ("order-2", "validate", "worker-b"),
    ]
    assert {c["state"] for c in live["claims"]} == {"live"}
    never = live["claims"][1]
    assert never["expires_at"] is None and never["token"] == 1
    now = datetime.fromisoformat(live["database_time"])
    assert datetime.fromisoformat(live["claims"][0]["expires_at"]) > now

    everything = ok_json("claims", "--all", url=store_url)
    assert [(c["instance_id"], c["task_id"], c["state"]) for c in everything["claims"]] == [
        ("order-1", "charge", "expired"),
        ("order-1", "reserve", "live"),
        ("order-2", "validate", "live"),
        ("order-3", "validate", "released"),
    ]
    mine = ok_json("claims", "--all", "--worker", "worker-b", url=store_url)
    assert [c["task_id"] for c in mine["claims"]] == ["charge", "validate"]
    assert len(ok_json("claims", "--all", "--limit", "1", url=store_url)["claims"]) == 1

    table = ok("claims", "--all", url=store_url)
    assert "2 live, 1 expired, 1 released" in table
    assert "never" in table and "ago" in table and "in " in table
    assert "no live claims of worker-z" in ok("claims", "--worker", "worker-z", url=store_url)


# --------------------------------------------------------------------------------------------
# cancel, pause, resume


def test_cancel_applies_at_once_and_stops_the_running_workers(
    backend: SqlBackend, store_url: str
) -> None:
    seed(backend)
    result = ok_json(
        "cancel", "order-1", "--reason", "customer called", "--by", "alice", url=store_url
    )
    assert result["outcome"] == "applied"
    assert (result["previous_status"], result["status"]) == ("in_progress", "cancelled")
    # Only the live claim was dropped; the expired one was nobody's any more.
    assert [(c["task_id"], c["worker_id"]) for c in result["claims_dropped"]] == [
        ("reserve", "worker-a")
    ]

    snapshot = backend.load_snapshot("order-1")
    assert snapshot.status is WorkflowStatus.CANCELLED
    assert snapshot.cancel_request is not None
    assert (snapshot.cancel_request.reason, snapshot.cancel_request.requested_by) == (
        "customer called",
        "alice",
    )
    assert backend.get_signal("order-1", SignalKind.CANCEL) is None
    # The worker that held "reserve" learns at its next heartbeat; its save is refused.
    with pytest.raises(NotFoundError):
        backend.extend_task_claim("order-1", "reserve", "worker-a", LONG_TTL)
    assert not backend.save_snapshot_fenced(snapshot, "reserve", "worker-a")

    again = ok_json("cancel", "order-1", url=store_url)
    assert (again["outcome"], again["status"], again["claims_dropped"]) == (
        "unchanged",
        "cancelled",
        [],
    )
    assert "already cancelled" in ok("cancel", "order-1", url=store_url)

    table = ok("cancel", "order-2", url=store_url)
    assert "cancelled 'order-2' (was in_progress)" in table
    assert "validate by worker-b" in table


def test_pause_then_resume(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    paused = ok_json("pause", "order-2", "--reason", "maintenance", url=store_url)
    assert (paused["outcome"], paused["status"]) == ("applied", "paused")
    assert [c["task_id"] for c in paused["claims_dropped"]] == ["validate"]
    snapshot = backend.load_snapshot("order-2")
    assert snapshot.status is WorkflowStatus.PAUSED
    assert snapshot.pause_request is not None and snapshot.pause_request.reason == "maintenance"
    assert snapshot.pause_request.requested_by  # the login name by default
    assert "order-2" not in {t.instance_id for t in backend.find_available_tasks("w", 10)}
    assert "already paused" in ok("pause", "order-2", url=store_url)

    resumed = ok_json("resume", "order-2", url=store_url)
    assert (resumed["outcome"], resumed["status"]) == ("resumed", "in_progress")
    assert resumed["version"] == backend.load_snapshot("order-2").version
    # Runnable again: its task's claim was dropped by the pause.
    assert "order-2" in {t.instance_id for t in backend.find_available_tasks("w", 10)}

    assert "paused 'order-3' (was in_progress)" in ok("pause", "order-3", url=store_url)
    assert "resumed 'order-3': in progress, at task validate" in ok(
        "resume", "order-3", url=store_url
    )


def test_a_paused_workflow_can_be_cancelled(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    ok("pause", "order-3", url=store_url)
    result = ok_json("cancel", "order-3", url=store_url)
    assert (result["outcome"], result["previous_status"], result["status"]) == (
        "applied",
        "paused",
        "cancelled",
    )


def test_resume_withdraws_a_pause_not_yet_applied(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    backend.store_signal("order-3", SignalKind.PAUSE, SignalRequest("later"))
    result = ok_json("resume", "order-3", url=store_url)
    assert (result["outcome"], result["status"]) == ("pause_withdrawn", "in_progress")
    assert backend.get_signal("order-3", SignalKind.PAUSE) is None


def test_refusals_exit_1_with_one_line(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    line = one_error_line(failure(1, "cancel", "order-4", url=store_url))
    assert "cannot cancel" in line and "completed" in line
    line = one_error_line(failure(1, "pause", "order-5", url=store_url))
    assert "cannot pause" in line and "failed" in line
    line = one_error_line(failure(1, "resume", "order-1", url=store_url))
    assert "cannot resume" in line and "not paused" in line
    assert backend.load_snapshot("order-4").status is WorkflowStatus.COMPLETED
    assert backend.load_snapshot("order-1").status is WorkflowStatus.IN_PROGRESS


def test_a_workflow_that_finishes_meanwhile_is_refused_and_left_clean(
    backend: SqlBackend, store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The race between ``store_signal`` and ``check_and_cancel`` (run in process, to time it):
    the workflow completes in between, so the cancel is refused and its request not left behind.
    """
    seed(backend)

    class CompletesFirst(SqlBackend):
        def check_and_cancel(self, instance_id: str) -> bool:
            snapshot = self.load_snapshot(instance_id)
            snapshot.mark_completed(b"finished just now")
            self.save_snapshot(snapshot)
            return super().check_and_cancel(instance_id)

    monkeypatch.setattr(cli_database, "SqlBackend", CompletesFirst)
    assert cli.main(["cancel", "order-3", "--url", store_url]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cannot cancel: workflow 'order-3' is completed now" in line
    assert backend.load_snapshot("order-3").status is WorkflowStatus.COMPLETED
    assert backend.get_signal("order-3", SignalKind.CANCEL) is None


def test_unknown_ids_exit_1(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    for command in ("show", "cancel", "pause", "resume", "retry"):
        for json_flag in ((), ("--json",)):
            completed = run(command, "order-404", *json_flag, url=store_url)
            assert completed.returncode == 1, (command, completed.stdout + completed.stderr)
            assert completed.stdout == ""
            line = one_error_line(completed.stderr)
            assert "'order-404' not found" in line, line


# --------------------------------------------------------------------------------------------
# retry


def fail_task(backend: SqlBackend, claim: TaskClaim, error: str) -> None:
    """Fail the claim's workflow as a worker does: a completion with ``error``."""
    completion = TaskCompletion(
        claim.instance_id, claim.task_id, claim.worker_id, claim.token, error=error
    )
    [result] = backend.complete_tasks([completion], ttl=LONG_TTL)
    assert result.outcome is CompletionOutcome.RECORDED


def test_retry_requeues_a_failed_workflow_at_its_task(backend: SqlBackend, store_url: str) -> None:
    backend.save_snapshot(WorkflowSnapshot.new("job-1", "orders-v1", first_task="charge"))
    first = backend.claim_task("job-1", "charge", "worker-a", LONG_TTL)
    assert first is not None
    fail_task(backend, first, "card declined")
    failed = backend.load_snapshot("job-1")

    line = ok("retry", "job-1", url=store_url)
    assert line == f"re-queued 'job-1' at task charge: in progress, version {failed.version + 1}\n"
    snapshot = backend.load_snapshot("job-1")
    assert (snapshot.status, snapshot.error) == (WorkflowStatus.IN_PROGRESS, None)
    again = backend.claim_task("job-1", "charge", "worker-b", LONG_TTL)
    assert again is not None and again.attempt == 1 and again.token == 2


def test_retry_a_fork_drops_the_claims_still_held(backend: SqlBackend, store_url: str) -> None:
    seed(backend)  # order-1: at a fork, reserve held by worker-a, charge's claim expired
    charge = backend.claim_task("order-1", "charge", "worker-c", LONG_TTL)
    assert charge is not None
    fail_task(backend, charge, "gateway down")
    version = backend.load_snapshot("order-1").version

    result = ok_json("retry", "order-1", url=store_url)
    assert result == {
        "instance_id": "order-1",
        "action": "retry",
        "outcome": "requeued",
        "previous_status": "failed",
        "status": "in_progress",
        "version": version + 1,
        "position": {
            "kind": "fork",
            "fork_id": "payment",
            "branch_task_ids": ["reserve", "charge"],
        },
        "requeued_tasks": ["reserve", "charge"],
    }
    # worker-a was still running reserve: its claim is gone, its heartbeat fails.
    with pytest.raises(NotFoundError):
        backend.extend_task_claim("order-1", "reserve", "worker-a", LONG_TTL)
    claimed = backend.claim_available_tasks("worker-d", 10, LONG_TTL, tags=["eu"])
    assert sorted(
        (c.task.task_id, c.claim.attempt, c.claim.token)
        for c in claimed
        if c.task.instance_id == "order-1"
    ) == [("charge", 1, 3), ("reserve", 1, 2)]


def test_retry_refuses_a_workflow_that_is_not_failed(backend: SqlBackend, store_url: str) -> None:
    seed(backend)
    ok("cancel", "order-2", url=store_url)
    ok("pause", "order-3", url=store_url)
    for instance_id, status in (
        ("order-1", "in_progress"),
        ("order-2", "cancelled"),
        ("order-3", "paused"),
        ("order-4", "completed"),
    ):
        before = backend.load_snapshot(instance_id)
        for json_flag in ((), ("--json",)):
            completed = run("retry", instance_id, *json_flag, url=store_url)
            assert completed.returncode == 1 and completed.stdout == ""
            line = one_error_line(completed.stderr)
            assert f"cannot retry: workflow {instance_id!r} is {status}, not failed" in line
        assert backend.load_snapshot(instance_id) == before
    # order-5 failed without a claim (a save): its task is re-queued all the same.
    assert "re-queued 'order-5' at task validate" in ok("retry", "order-5", url=store_url)


# --------------------------------------------------------------------------------------------
# prune


def backdate(backend: SqlBackend, instance_ids: list[str], age: timedelta) -> None:
    """Make workflows look last saved ``age`` ago (a store only sets updated_at to its now)."""
    with backend.engine.begin() as conn:
        conn.execute(
            sa.update(workflows)
            .where(workflows.c.instance_id.in_(instance_ids))
            .values(updated_at=datetime.now(UTC) - age)
        )


def finished(backend: SqlBackend, instance_id: str, status: WorkflowStatus) -> None:
    snapshot = WorkflowSnapshot.new(instance_id, "orders-v1", first_task="validate")
    backend.save_snapshot(snapshot)
    assert backend.claim_task(instance_id, "validate", "worker-a", LONG_TTL)
    backend.save_task_result(instance_id, "validate", b"checked")
    backend.release_task_claim(instance_id, "validate", "worker-a")
    snapshot = backend.load_snapshot(instance_id)
    if status is WorkflowStatus.COMPLETED:
        snapshot.mark_completed(b"done")
    else:
        snapshot.mark_failed("broken")
    backend.save_snapshot(snapshot)


def children(backend: SqlBackend, instance_id: str) -> int:
    with backend.engine.connect() as conn:
        return sum(
            conn.execute(
                sa.select(sa.func.count()).where(table.c.instance_id == instance_id)
            ).scalar_one()
            for table in (task_results, task_claims)
        )


def test_prune_deletes_old_finished_workflows_in_batches(
    backend: SqlBackend, store_url: str
) -> None:
    old = [f"old-{n}" for n in range(5)]
    for instance_id in [*old, "recent-0", "recent-1"]:
        finished(backend, instance_id, WorkflowStatus.COMPLETED)
    finished(backend, "old-failed", WorkflowStatus.FAILED)
    backend.save_snapshot(WorkflowSnapshot.new("old-running", "orders-v1", first_task="a"))
    backdate(backend, [*old, "old-failed", "old-running"], timedelta(days=8))
    assert children(backend, "old-0") == 2  # a result and a released claim

    dry = ok_json(
        "prune", "--status", "completed", "--older-than", "7d", "--batch", "2", "--dry-run",
        url=store_url,
    )  # fmt: skip
    assert dry["dry_run"] is True
    assert [batch["matched"] for batch in dry["batches"]] == [2, 2, 1]
    assert (dry["matched"], dry["deleted"]) == (5, 0)
    assert dry["older_than_seconds"] == 7 * 86400
    assert len(backend.list_snapshots()) == 9

    text = ok("prune", "--status", "completed", "--older-than", "7d", "--batch", "2", url=store_url)
    for line in ("batch 1: deleted 2", "batch 2: deleted 2", "batch 3: deleted 1"):
        assert line in text
    assert "deleted 5 completed workflow(s)" in text and "older than 7d" in text
    assert backend.list_snapshots() == ["old-failed", "old-running", "recent-0", "recent-1"]
    for instance_id in old:
        assert children(backend, instance_id) == 0  # its results and claims went too
    assert children(backend, "recent-0") == 2

    # Nothing left that old; younger ones go with a shorter duration.
    nothing = ok_json("prune", "--status", "completed", "--older-than", "1d12h", url=store_url)
    assert (nothing["batches"], nothing["matched"], nothing["deleted"]) == ([], 0, 0)
    gone = ok_json("prune", "--status", "failed", "--older-than", "30s", url=store_url)
    assert (gone["matched"], gone["deleted"]) == (1, 1)
    assert backend.list_snapshots() == ["old-running", "recent-0", "recent-1"]
    assert "would delete 2 completed" in ok(
        "prune", "--status", "completed", "--older-than", "0s", "--dry-run", url=store_url
    )


def test_prune_from_two_processes_at_once_deletes_each_workflow_once(
    backend: SqlBackend, store_url: str
) -> None:
    old = [f"old-{n:02d}" for n in range(30)]
    for instance_id in old:
        finished(backend, instance_id, WorkflowStatus.COMPLETED)
    backdate(backend, old, timedelta(days=2))
    env = {**os.environ}
    env.pop(URL_ENV_VAR, None)
    command = [sys.executable, "-m", "sayiir_persistence", "prune", "--status", "completed"]
    command += ["--older-than", "1d", "--batch", "4", "--json", "--url", store_url]
    runs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outputs = []
    for process in runs:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0 and stderr == "", stderr
        outputs.append(json.loads(stdout))
    assert sum(output["deleted"] for output in outputs) == len(old)
    for output in outputs:
        # Each batch is one prune_workflows call: what it matched, it deleted.
        assert all(0 < batch["deleted"] == batch["matched"] <= 4 for batch in output["batches"])
        assert output["matched"] == output["deleted"]
    assert backend.list_snapshots() == []


def test_prune_selects_candidates_through_the_status_index(backend: SqlBackend) -> None:
    """Each page of a dry run's count is a range scan of the (status, instance_id) index,
    never a full scan (a real run's batches: tests/databases/test_sql_pruning.py)."""
    dialect = backend.engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        pytest.skip(f"no plan check for {dialect}")
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM sayiir_workflows" in statement and "ORDER BY" in statement:
            captured.append((statement, parameters))

    sa.event.listen(backend.engine, "before_cursor_execute", capture)
    try:
        StoreInspector(backend.engine).prune_candidates(
            WorkflowStatus.COMPLETED, datetime.now(UTC), after="order-1", limit=500
        )
    finally:
        sa.event.remove(backend.engine, "before_cursor_execute", capture)
    [(statement, parameters)] = captured
    with backend.engine.connect() as conn:
        if dialect == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " ".join(str(row[-1]) for row in rows)
        else:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            plan = " ".join(str(row[0]) for row in rows)
    assert "ix_sayiir_workflows_status_instance_id" in plan, plan


# --------------------------------------------------------------------------------------------
# Errors: unprovisioned databases, bad URLs, usage


def test_unprovisioned_database_exits_1_saying_how_to_migrate(sql_url: str) -> None:
    with isolated_database(sql_url) as url:
        if make_url(url).get_backend_name() == "sqlite":
            # The per-test file does not exist yet: create it empty.
            with sa.create_engine(url).connect() as conn:
                conn.exec_driver_sql("CREATE TABLE unrelated (x INTEGER)")
        for command in (
            ("list",),
            ("show", "x"),
            ("claims",),
            ("cancel", "x"),
            ("retry", "x"),
            ("prune", "--status", "completed", "--older-than", "1d"),
        ):
            line = one_error_line(failure(1, *command, url=url))
            assert "not provisioned" in line and "sayiir-persistence migrate --url" in line, line


@pytest.mark.sqlite
def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    line = one_error_line(failure(1, "list", url=f"sqlite:///{missing}"))
    assert f"no SQLite database at {missing}" in line and "migrate" in line
    assert not missing.exists()
    line = one_error_line(failure(1, "claims", url="sqlite://"))
    assert "in-memory SQLite database" in line


@pytest.mark.postgres
def test_bad_urls_exit_1_with_the_password_masked(postgres_url: str) -> None:
    server = make_url(postgres_url)
    refused = server.set(port=1, password="s3cret-pw").render_as_string(hide_password=False)
    bad_port = refused.replace(":1/", ":notaport/")
    for url in (refused, bad_port, "no-such-dialect://u:s3cret-pw@host/db", "not a url"):
        completed = run("list", url=url)
        output = completed.stdout + completed.stderr
        assert completed.returncode == 1, output
        assert "Traceback" not in output and "s3cret-pw" not in output
        line = one_error_line(completed.stderr)
        if "s3cret" in url:
            assert ":***@" in line, line
    assert "cannot connect" in one_error_line(run("list", url=refused).stderr)
    assert "not a valid database URL" in one_error_line(run("list", url=bad_port).stderr)


@pytest.mark.sqlite
def test_usage_errors_exit_2(sqlite_url: str) -> None:
    migrate(sqlite_url)
    for args in (
        (),
        ("frobnicate",),
        ("show",),
        ("list", "--limit", "0"),
        ("list", "--status", "running"),
        ("claims", "--limit", "many"),
        ("cancel",),
        ("retry",),
        ("prune", "--status", "completed"),
        ("prune", "--status", "in_progress", "--older-than", "7d"),
        ("prune", "--status", "completed", "--older-than", "7 days"),
        ("prune", "--status", "completed", "--older-than", "7d", "--batch", "0"),
        ("prune", "--status", "completed", "--older-than", "7d", "--batch", "10001"),
    ):
        stderr = failure(2, *args, url=sqlite_url if args else None)
        assert "usage: sayiir-persistence" in stderr, args
    # No --url and no $SAYIIR_DATABASE_URL.
    assert "--url" in failure(2, "list")
    assert "--older-than" in ok("prune", "--help")


def test_durations() -> None:
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration(" 1D12h ") == timedelta(days=1, hours=12)
    assert parse_duration("0s") == timedelta(0)
    for bad in ("", "7", "d", "7 d", "-1d", "1.5h", "7w", "1d 2h", "1dd"):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)
    for text in ("30s", "15m", "12h", "7d", "1d12h", "2h5m3s", "0s"):
        assert format_duration(parse_duration(text)) == text


def test_show_prints_the_trace_context(backend: SqlBackend, store_url: str) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    backend.start_workflow(WorkflowSnapshot.new("traced", "h", trace_context=traceparent))
    backend.start_workflow(WorkflowSnapshot.new("untraced", "h"))

    assert ok_json("show", "traced", url=store_url)["trace_context"] == traceparent
    assert "4bf92f3577b34da6a3ce929d0e0e4736" in ok("show", "traced", url=store_url)
    assert ok_json("show", "untraced", url=store_url)["trace_context"] is None
    assert "Trace" not in ok("show", "untraced", url=store_url)
