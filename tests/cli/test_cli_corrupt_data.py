"""The operator commands on a store holding a corrupt row (docs/contract.md#errors).

``show`` and ``list`` must say which instance and which column cannot be decoded, on one line
of stderr, without a traceback, and exit 1; the healthy workflows stay readable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from helpers.isolated_db import isolated_database
from sayiir_persistence import SqlBackend, WorkflowSnapshot, migrate
from sayiir_persistence.provisioning import URL_ENV_VAR

pytestmark = pytest.mark.timeout(180)

VICTIM = "order-bad"
HEALTHY = "order-ok"


@pytest.fixture
def store_url(sql_url: str) -> Iterator[str]:
    """A database of this test's own with a healthy workflow and one whose ``column`` will be
    spoiled by the test."""
    with isolated_database(sql_url) as url:
        migrate(url)
        with SqlBackend(url) as backend:
            for instance_id in (HEALTHY, VICTIM):
                backend.start_workflow(WorkflowSnapshot.new(instance_id, "h", first_task="t1"))
        yield url


def corrupt(url: str, column: str, garbage: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                # The column name is one of this module's constants, never input.
                sa.text(f"UPDATE sayiir_workflows SET {column} = :garbage WHERE instance_id = :id"),
                {"garbage": garbage, "id": VICTIM},
            )
    finally:
        engine.dispose()


def run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop(URL_ENV_VAR, None)
    return subprocess.run(
        [sys.executable, "-m", "sayiir_persistence", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def one_error_line(completed: subprocess.CompletedProcess[str], column: str) -> str:
    """Exit 1, one line on stderr naming the instance and the column, no traceback."""
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output
    assert "Traceback" not in output
    assert completed.stdout == ""
    [line] = completed.stderr.splitlines()
    assert line.startswith("sayiir-persistence: error: stored workflow"), line
    assert repr(VICTIM) in line and f"sayiir_workflows.{column}" in line, line
    return line


@pytest.mark.parametrize(
    ("column", "garbage"),
    [
        pytest.param("position", "{not json\n", id="position"),
        pytest.param("tags", '{"gpu": 1}', id="tags"),
        pytest.param("pause_request", '{"reason": null}', id="pause-request"),
        pytest.param("status", "exploded", id="status"),
    ],
)
@pytest.mark.parametrize("json_output", [False, True], ids=["table", "json"])
def test_show_names_the_corrupt_row_on_one_line(
    store_url: str, column: str, garbage: str, json_output: bool
) -> None:
    corrupt(store_url, column, garbage)
    extra = ("--json",) if json_output else ()

    line = one_error_line(run("show", VICTIM, *extra, url=store_url), column)
    assert "start_workflow with TERMINATE_EXISTING" in line  # the way out

    healthy = run("show", HEALTHY, *extra, url=store_url)
    assert healthy.returncode == 0, healthy.stderr
    assert HEALTHY in healthy.stdout


@pytest.mark.parametrize("json_output", [False, True], ids=["table", "json"])
def test_list_names_a_corrupt_status_on_one_line(store_url: str, json_output: bool) -> None:
    corrupt(store_url, "status", "exploded")
    extra = ("--json",) if json_output else ()

    one_error_line(run("list", *extra, url=store_url), "status")

    # A page without the corrupt row lists as usual.
    page = run("list", "--after", VICTIM, *extra, url=store_url)
    assert page.returncode == 0, page.stderr
    assert HEALTHY in page.stdout


def test_a_corrupt_workflow_can_be_pruned_from_the_listing_by_deleting_it(store_url: str) -> None:
    corrupt(store_url, "position", "[]")
    with SqlBackend(store_url) as backend:
        backend.delete_snapshot(VICTIM)  # decodes nothing: the way out
    listed = run("list", url=store_url)
    assert listed.returncode == 0, listed.stderr
    assert HEALTHY in listed.stdout and VICTIM not in listed.stdout
