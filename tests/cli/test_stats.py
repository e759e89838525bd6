"""``sayiir-persistence stats``, run as a real process against each SQL database.

Every test seeds a database of its own (see ``helpers/isolated_db.py``) with a known state
through the Python API, then reads it as people do (the tables), as scripts do (``--json``),
as Prometheus does (``--prometheus``, parsed with ``prometheus-client``'s own parser), and
watches it (``--watch``, stopped with SIGINT).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sayiir_persistence import (
    AtFork,
    CompletionOutcome,
    SqlBackend,
    TaskCompletion,
    WorkflowSnapshot,
    WorkflowStatus,
)
from sayiir_persistence.provisioning import URL_ENV_VAR
from sayiir_persistence.testing.builders import save_with_status

pytestmark = pytest.mark.timeout(180)

LONG_TTL = timedelta(minutes=10)
#: What the seeded store holds (see ``seeded_url``).
WORKFLOWS = {"in_progress": 4, "completed": 2, "failed": 1, "cancelled": 1, "paused": 1}
RUNNABLE = {1: 2, 2: 2}
CLAIMS = [("worker-a", 1, 0), ("worker-b", 0, 1)]
RETRY_WAITS = 1
COMPLETED = 2


def _command(*args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop(URL_ENV_VAR, None)
    return [sys.executable, "-m", "sayiir_persistence", "stats", *args], env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command, default_env = _command(*args)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env or default_env, check=False
    )


def ok(*args: str) -> str:
    completed = run(*args)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stderr == ""
    return completed.stdout


@pytest.fixture
def seeded_url(store_url: str) -> str:
    """The store of WORKFLOWS, RUNNABLE, CLAIMS, RETRY_WAITS and COMPLETED:

    - ``p1-a``, ``p1-b``: priority 1 at their first task (2 runnable); ``p1-b`` also has two
      results of side tasks saved (the 2 completions);
    - ``p2-fork``: priority 2 at a fork of b1 (claimed by worker-a, live), b2 (claimed by
      worker-b, expired: runnable again), b3 (2 runnable);
    - ``p5-retry``: priority 5, its task failed once and waits for its retry (not runnable);
    - two completed workflows, one failed, one cancelled, one paused (no task runnable).
    """
    with SqlBackend(store_url) as backend:
        for instance_id in ("p1-a", "p1-b"):
            backend.save_snapshot(
                WorkflowSnapshot.new(instance_id, "h", first_task="t1", priority=1)
            )
        backend.save_task_result("p1-b", "side-1", b"out")
        backend.save_task_result("p1-b", "side-2", b"out")
        fork = WorkflowSnapshot.new("p2-fork", "h", first_task=None, priority=2)
        fork.move_to(AtFork("f", ("b1", "b2", "b3")))
        backend.save_snapshot(fork)
        assert backend.claim_task("p2-fork", "b1", "worker-a", LONG_TTL) is not None
        assert backend.claim_task("p2-fork", "b2", "worker-b", timedelta(milliseconds=1))
        backend.save_snapshot(WorkflowSnapshot.new("p5-retry", "h", first_task="t1", priority=5))
        claim = backend.claim_task("p5-retry", "t1", "worker-a", LONG_TTL)
        assert claim is not None
        [result] = backend.complete_tasks(
            [
                TaskCompletion(
                    "p5-retry", "t1", "worker-a", claim.token, error="boom", retry_after=LONG_TTL
                )
            ],
            ttl=LONG_TTL,
        )
        assert result.outcome is CompletionOutcome.RETRY_SCHEDULED
        for number in range(WORKFLOWS["completed"]):
            save_with_status(backend, f"done-{number}", WorkflowStatus.COMPLETED)
        for status in (WorkflowStatus.FAILED, WorkflowStatus.CANCELLED, WorkflowStatus.PAUSED):
            save_with_status(backend, status.value, status)
    time.sleep(0.05)  # worker-b's claim of 1 ms has expired by any clock
    return store_url


def test_stats_table_shows_the_seeded_figures(seeded_url: str) -> None:
    output = ok("--url", seeded_url)
    assert re.search(r"^Store at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", output, re.MULTILINE)

    def row(*cells: object) -> None:
        pattern = r"^\s*" + r"\s+".join(re.escape(str(cell)) for cell in cells) + r"\s*$"
        assert re.search(pattern, output, re.MULTILINE), f"no row {cells} in:\n{output}"

    for status, count in WORKFLOWS.items():
        row(status, count)
    row("total", sum(WORKFLOWS.values()))
    for priority, count in RUNNABLE.items():
        assert re.search(rf"^\s*{priority}\s+{count}\s+\d+[smhd]", output, re.MULTILINE), output
    row("total", sum(RUNNABLE.values()))
    for worker_id, live, expired in CLAIMS:
        row(worker_id, live, expired)
    row("retry waits", RETRY_WAITS)
    row("last minute", COMPLETED)
    row("last hour", COMPLETED)


def test_stats_json_is_one_object_with_the_seeded_figures(seeded_url: str) -> None:
    stats = json.loads(ok("--json", "--url", seeded_url))
    assert stats["workflows"] == WORKFLOWS
    assert stats["runnable"]["total"] == sum(RUNNABLE.values())
    by_priority = stats["runnable"]["by_priority"]
    assert {entry["priority"]: entry["count"] for entry in by_priority} == RUNNABLE
    assert all(0 <= entry["oldest_wait_seconds"] < 120 for entry in by_priority)
    assert stats["claims"] == {
        "live": 1,
        "expired": 1,
        "by_worker": [
            {"worker_id": worker_id, "live": live, "expired": expired}
            for worker_id, live, expired in CLAIMS
        ],
    }
    assert stats["retry_waits"] == RETRY_WAITS
    assert stats["completed"] == {"last_minute": COMPLETED, "last_hour": COMPLETED}
    assert stats["taken_at"].endswith("+00:00")


def test_stats_of_an_empty_store_lists_every_status(store_url: str) -> None:
    stats = json.loads(ok("--json", "--url", store_url))
    assert stats["workflows"] == {status.value: 0 for status in WorkflowStatus}
    assert stats["runnable"] == {"total": 0, "by_priority": []}
    assert "(none)" in ok("--url", store_url)


def _samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def test_stats_prometheus_exposition_parses_to_the_seeded_figures(seeded_url: str) -> None:
    samples = _samples(ok("--prometheus", "--url", seeded_url))
    for status, count in WORKFLOWS.items():
        assert samples["sayiir_workflows", (("status", status),)] == count
    for priority, count in RUNNABLE.items():
        assert samples["sayiir_runnable_tasks", (("priority", str(priority)),)] == count
        age = samples["sayiir_oldest_runnable_age_seconds", (("priority", str(priority)),)]
        assert 0 <= age < 120
    assert not any(key[1] == (("priority", "5"),) for key in samples)
    for worker_id, live, expired in CLAIMS:
        assert samples["sayiir_claims", (("state", "live"), ("worker_id", worker_id))] == live
        assert samples["sayiir_claims", (("state", "expired"), ("worker_id", worker_id))] == expired
    assert samples["sayiir_retry_waits", ()] == RETRY_WAITS
    assert samples["sayiir_tasks_completed_last_minute", ()] == COMPLETED
    assert samples["sayiir_tasks_completed_last_hour", ()] == COMPLETED


def test_stats_prometheus_without_prometheus_client_exits_2_naming_the_extra(
    store_url: str, tmp_path: Path
) -> None:
    # A prometheus_client that cannot be imported, first on the path.
    blocker = tmp_path / "prometheus_client"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('not installed (test)')\n")
    command, env = _command("--prometheus", "--url", store_url)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "sayiir-persistence[prometheus]" in completed.stderr
    assert completed.stdout == ""


def test_stats_prometheus_refuses_json_and_watch(store_url: str) -> None:
    for extra in (["--json"], ["--watch", "1"]):
        completed = run("--prometheus", *extra, "--url", store_url)
        assert completed.returncode == 2, completed.stdout + completed.stderr
        assert "--prometheus" in completed.stderr


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_stats_watch_refreshes_until_sigint_then_exits_0(seeded_url: str, as_json: bool) -> None:
    command, env = _command("--watch", "0.2", *(["--json"] if as_json else []), "--url", seeded_url)
    mark = '"workflows"' if as_json else "Store at "
    lines: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        stdout, stderr = process.stdout, process.stderr
        assert stdout is not None and stderr is not None
        # Read by a thread: a watch that stopped printing must fail the test, not hang it.
        reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")))
        try:
            reader.start()
            deadline = time.monotonic() + 30
            while "".join(lines).count(mark) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
            errors = stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
            reader.join(timeout=30)
    seen = "".join(lines)
    assert seen.count(mark) >= 3, seen + errors
    assert process.returncode == 0, errors
    assert "Traceback" not in errors + seen
    if as_json:
        objects: list[Any] = [json.loads(line) for line in seen.splitlines() if line]
        assert all(stats["workflows"] == WORKFLOWS for stats in objects)
