"""The conformance suite on the SQL backend: SQLite (a file), PostgreSQL and MariaDB/MySQL.

One migrated database per class (a private schema or database on the servers, see
``isolated_db``, so that concurrent test runs on the same server cannot empty each other's
tables); every table is emptied before each test, so each test starts from the empty store the
contract asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from sqlalchemy import delete

from helpers.isolated_db import isolated_database
from sayiir_persistence.provisioning import migrate
from sayiir_persistence.sql.backend import SqlBackend
from sayiir_persistence.sql.schema import metadata
from sayiir_persistence.testing import BackendContract


def _empty_all_tables(backend: SqlBackend) -> None:
    with backend.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(delete(table))


class _SqlContract(BackendContract):
    """The contract on a migrated database whose URL comes from ``url_fixture``."""

    url_fixture: ClassVar[str]
    # The database clock cannot be advanced: expiry tests sleep past this TTL.
    short_ttl = timedelta(milliseconds=500)

    @pytest.fixture(scope="class")
    @classmethod
    def shared_backend(cls, request: pytest.FixtureRequest) -> Iterator[SqlBackend]:
        server_url: str = request.getfixturevalue(cls.url_fixture)
        with isolated_database(server_url) as url:
            migrate(url)
            backend = SqlBackend(url)
            yield backend
            backend.close()

    @pytest.fixture
    def backend(self, shared_backend: SqlBackend) -> SqlBackend:
        _empty_all_tables(shared_backend)
        return shared_backend


@pytest.fixture(scope="session")
def contract_sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("contract") / "contract.db"
    return f"sqlite:///{path}"


@pytest.mark.sqlite
class TestSqliteContract(_SqlContract):
    url_fixture = "contract_sqlite_url"


@pytest.mark.postgres
class TestPostgresContract(_SqlContract):
    url_fixture = "postgres_url"


@pytest.mark.mysql
class TestMysqlContract(_SqlContract):
    url_fixture = "mysql_url"
