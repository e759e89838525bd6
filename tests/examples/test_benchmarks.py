"""The benchmark suite still runs: ``python -m benchmarks --quick`` on SQLite, in a subprocess.

Timings are not checked (they belong to ``benchmarks/RESULTS.md``, not to a test); the results
file must hold every scenario, and no task may have been handed out twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sqlite, pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("claim_cycle", "ceiling", "ratios", "contended", "scaling", "payloads")


@pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="no benchmarks/ beside tests/")
def test_quick_benchmark_run_on_sqlite(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--db",
            "sqlite",
            "--output",
            str(tmp_path),
            "--no-chart",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    sqlite = results["databases"]["sqlite"]
    assert set(SCENARIOS) <= set(sqlite)
    for scenario in SCENARIOS:
        assert sqlite[scenario], f"{scenario}: no rows"
    for row in sqlite["claim_cycle"] + sqlite["ceiling"]:
        assert row["duplicates"] == 0, row
        assert row["drained"], row
    for row in sqlite["contended"]:
        assert row["duplicates"] == 0, row
        assert row["unclaimed"] == 0, row
    assert all(row["ratio"] > 0 for row in sqlite["ratios"])
    assert [row["workflows"] for row in sqlite["scaling"]] == sorted(
        row["workflows"] for row in sqlite["scaling"]
    )


@pytest.mark.skipif(not (ROOT / "benchmarks" / "peers").is_dir(), reason="no benchmarks/peers")
def test_quick_peers_run_of_ours_on_sqlite(tmp_path: Path) -> None:
    """``python -m benchmarks.peers`` with our contender alone (no peer library needed)."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.peers",
            "--quick",
            "--contenders",
            "ours",
            "--db",
            "sqlite",
            "--output",
            str(tmp_path),
            "--no-chart",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert {(row["db"], row["kind"]) for row in runs} == {("sqlite", "one"), ("sqlite", "chain")}
    for row in runs:
        assert "error" not in row, row
        assert row["workflows_per_s"] > 0, row
    assert "| sqlite | one-task workflows | ours |" in (tmp_path / "results.md").read_text()
