"""OpenTelemetry is optional: without it nothing of it is imported and every hook is a no-op;
with the API but no SDK, nothing is recorded. Each case in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]

_BLOCK_OPENTELEMETRY = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"{name} is blocked by the test")
        return None

sys.meta_path.insert(0, Blocked())
"""

_RUN = """
import sys, time
from datetime import timedelta
from sayiir_persistence import InMemoryBackend, PersistentBackend
from sayiir_persistence.telemetry import AVAILABLE
from sayiir_persistence.worker import Pipeline, Worker

pipeline = Pipeline("first", "second")
backend = InMemoryBackend()
stored = backend.start_workflow(pipeline.start("wf-1", "def"))
assert stored.trace_context is None, stored.trace_context
worker = Worker(
    backend, lambda ctx: b"out", {"def": pipeline}, poll_interval=timedelta(milliseconds=10)
)
with worker:
    deadline = time.monotonic() + 20
    while backend.load_snapshot("wf-1").status.value != "completed":
        assert time.monotonic() < deadline, "the workflow did not complete"
        time.sleep(0.01)
assert worker.stats.recorded == 2, worker.stats
imported = sorted(m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry."))
wrapped = hasattr(PersistentBackend.load_snapshot, "__wrapped__")
print(f"available={AVAILABLE} wrapped={wrapped} imported={len(imported)}")
"""


def _run(script: str) -> str:
    environment = {**os.environ, "PYTHONPATH": str(_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_without_opentelemetry_nothing_is_imported_and_calls_work() -> None:
    assert _run(_BLOCK_OPENTELEMETRY + _RUN) == "available=False wrapped=False imported=0"


def test_with_the_api_and_no_sdk_nothing_is_recorded() -> None:
    pytest.importorskip("opentelemetry")
    # The API's no-op provider: spans are made (the methods are wrapped) and dropped, and no
    # trace context is stored (the workflow's start is in no trace).
    output = _run(_RUN)
    assert output.startswith("available=True wrapped=True imported=")
    assert output != "available=True wrapped=True imported=0"
