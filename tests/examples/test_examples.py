"""The README's quick start example runs as written."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def _run_quickstart(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(QUICKSTART), *argv])
    runpy.run_path(str(QUICKSTART), run_name="__main__")


def test_quickstart_on_the_in_memory_backend(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_quickstart([], monkeypatch)
    assert "order-42 completed at version 3" in capsys.readouterr().out


@pytest.mark.sqlite
def test_quickstart_on_sqlite(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_quickstart([sqlite_url], monkeypatch)
    assert "order-42 completed at version 3" in capsys.readouterr().out
