"""The crash-surviving demo: real worker processes, a real SIGKILL, a verified report."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from rich.console import Console

from helpers.isolated_db import isolated_database
from sayiir_persistence.demo import (
    DemoReport,
    _lineage_errors,
    add_demo_arguments,
    run_demo,
)
from sayiir_persistence.demo.workflow import fails_first_payment


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=100, color_system=None), out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_survives_a_killed_worker(sql_url: str) -> None:
    console, out = _console()
    with isolated_database(sql_url) as url:
        report = run_demo(
            url,
            instances=40,
            processes=2,
            threads=3,
            kill_after=0.2,
            ttl=timedelta(seconds=1),
            timeout=timedelta(seconds=90),
            console=console,
        )
    printed = out.getvalue()
    assert report.ok, f"{report.problems}\n{printed}"
    assert report.completed == report.instances == 40
    assert report.results == 4 * 40
    assert report.duplicate_results == 0
    assert report.lineage_errors == 0
    assert report.kills and report.kills[-1].abandoned > 0
    assert report.takeovers > 0
    assert report.abandoned > 0 and report.taken_over == report.abandoned
    assert report.executions >= report.results
    # Killed workers show as killed; the others and the replacements stopped cleanly.
    killed = {kill.worker_id for kill in report.kills}
    for worker_id, code in report.worker_exit_codes.items():
        assert code == (-9 if worker_id in killed else 0), worker_id
    assert {kill.replacement for kill in report.kills} <= set(report.worker_exit_codes)
    assert "SIGKILL" in printed and "Demo summary" in printed and "Verified" in printed


@pytest.mark.sqlite
@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_with_flaky_payments_retries_them(sqlite_url: str) -> None:
    console, out = _console()
    report = run_demo(
        sqlite_url,
        instances=30,
        processes=2,
        threads=3,
        ttl=timedelta(seconds=1),
        timeout=timedelta(seconds=90),
        console=console,
        flaky=0.5,
    )
    printed = out.getvalue()
    assert report.ok, f"{report.problems}\n{printed}"
    assert report.completed == 30 and report.duplicate_results == 0
    flaky_orders = sum(
        fails_first_payment(f"order-{report.run_id}-{n:05d}", 0.5) for n in range(1, 31)
    )
    # Each flaky order's first payment failed and was retried (a payment attempt cut short
    # by the killed worker may have been taken over before it could fail).
    assert 0 < report.retried <= flaky_orders
    assert "Attempts failed and retried" in printed and "fail once and are retried" in printed


_SMALL_DEMO = ["--instances", "20", "--kill-after", "0.2", "--processes", "2", "--threads", "3"]


def _run_console_script(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``sayiir-persistence ...`` as a user runs it (``python -m`` of this interpreter)."""
    return subprocess.run(
        [sys.executable, "-m", "sayiir_persistence", *arguments],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "100"},
        check=False,
    )


@pytest.mark.sqlite
@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_command_runs_on_a_temporary_sqlite_file_by_default() -> None:
    completed = _run_console_script("demo", *_SMALL_DEMO, "--ttl", "1")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Verified" in completed.stdout
    assert "sqlite:///" in completed.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_command_runs_on_each_database(sql_url: str) -> None:
    with isolated_database(sql_url) as url:
        completed = _run_console_script("demo", "--url", url, *_SMALL_DEMO, "--ttl", "1")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Verified" in completed.stdout
    assert "Duplicate results" in completed.stdout


def test_demo_command_usage_error_exits_2() -> None:
    completed = _run_console_script("demo", "--instances", "zero")
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr


def test_demo_arguments_have_working_defaults_and_reject_nonsense() -> None:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args([])
    assert (args.url, args.instances, args.processes, args.threads) == (None, 200, 3, 4)
    assert (args.kill_after, args.ttl, args.keep) == (0.3, 2.0, False)
    assert args.flaky == 0.0
    for bad in (["--instances", "0"], ["--kill-after", "1.5"], ["--ttl", "-1"], ["--flaky", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_run_demo_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        run_demo(instances=0)
    with pytest.raises(ValueError):
        run_demo(kill_after=1.0)
    with pytest.raises(ValueError, match="flaky"):
        run_demo(flaky=-0.1)


def test_lineage_check_notices_a_result_that_was_replaced() -> None:
    """The verification is not vacuous: a task whose stored result differs from the one its
    consumer saw counts as an inconsistency."""
    outputs = {
        "validate": {"execution": "v1", "consumed": {}},
        "reserve_stock": {"execution": "r1", "consumed": {"validate": "v1"}},
        "charge_payment": {"execution": "c1", "consumed": {"validate": "v1"}},
        "ship": {"execution": "s1", "consumed": {"reserve_stock": "r1", "charge_payment": "c1"}},
    }
    assert _lineage_errors(outputs, b'{"execution": "s1"}') == 0
    outputs["reserve_stock"] = {"execution": "r2", "consumed": {"validate": "v1"}}
    assert _lineage_errors(outputs, b'{"execution": "s1"}') == 1
    assert _lineage_errors(outputs, b'{"execution": "s0"}') == 2


def test_report_is_not_ok_with_problems() -> None:
    report = DemoReport(url="sqlite://", run_id="r", instances=1)
    assert report.ok
    report.problems.append("something")
    assert not report.ok
