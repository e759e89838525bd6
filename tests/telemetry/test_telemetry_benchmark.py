"""``python -m benchmarks.telemetry`` still runs (a tiny run on SQLite; timings not checked:
the figures belong to the README, not to a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sqlite, pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (ROOT / "benchmarks").is_dir(), reason="no benchmarks/ beside tests/")
def test_a_tiny_telemetry_benchmark_run(tmp_path: Path) -> None:
    out = tmp_path / "telemetry.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.telemetry",
            "--db",
            "sqlite",
            "--rounds",
            "2",
            "--tasks",
            "60",
            "--span-calls",
            "200",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["cycle"]["sqlite"]["rows"]
    assert [len(rows["off"]), len(rows["on"])] == [2, 2]
    assert set(results["span_us"]) == {"bare", "off", "on"}
    assert all(value > 0 for value in results["span_us"].values())
