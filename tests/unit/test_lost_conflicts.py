"""What a transaction that lost a conflict leaves behind: the dialect is told, and on a Galera
node its thread claims its node's share of the candidates first for a while."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sayiir_persistence.provisioning import migrate
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.sql.dialects import MySqlDialect, mysql
from sayiir_persistence.sql.errors import RetryableConflict

KEYS = [(f"wf-{n:03d}", "t") for n in range(30)]


def test_the_backend_tells_its_dialect_of_each_conflict_it_runs_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    migrate(url)
    backend = SqlBackend(url)
    told: list[None] = []
    attempts: list[None] = []
    backend._dialect.lost_conflict = lambda: told.append(None)  # type: ignore[method-assign]

    def work(_conn: Any) -> str:
        attempts.append(None)
        if len(attempts) < 3:
            raise RetryableConflict("deadlock")
        return "done"

    try:
        assert backend._transaction(work) == "done"
    finally:
        backend.close()
    assert len(told) == 2


@pytest.fixture
def uncontended(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mysql._contention, "until", 0.0, raising=False)


@pytest.mark.usefixtures("uncontended")
def test_a_galera_node_claims_its_share_first_after_a_lost_conflict() -> None:
    node = SimpleNamespace(info={mysql._GALERA_SHARE: (1, 3)})
    assert mysql._contended_order(node, KEYS) == KEYS  # type: ignore[arg-type]
    MySqlDialect().lost_conflict()
    ordered = mysql._contended_order(node, KEYS)  # type: ignore[arg-type]
    mine = [key for key in KEYS if mysql._share_of(key, 3) == 1]
    assert 0 < len(mine) < len(KEYS)
    assert ordered == mine + [key for key in KEYS if key not in mine]


@pytest.mark.usefixtures("uncontended")
def test_one_server_keeps_the_order_after_a_lost_conflict() -> None:
    MySqlDialect().lost_conflict()
    assert mysql._contended_order(SimpleNamespace(info={}), KEYS) == KEYS  # type: ignore[arg-type]
