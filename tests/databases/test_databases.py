"""Self-tests of the database plumbing in ``helpers/databases.py`` and ``conftest.py``.

The unmarked tests need no server. ``test_selected_database_answers`` runs once per selected SQL
database, so every tox environment has at least one test that proves its database is there.
"""

from __future__ import annotations

import contextlib

import pytest
import sqlalchemy as sa

from helpers.databases import (
    DEFAULT_URLS,
    MYSQL,
    POSTGRES,
    REQUIRE_ENV,
    URL_ENV,
    mask_url,
    parse_selection,
    required_kinds,
    resolve_server_url,
    selected_kinds,
)

# --------------------------------------------------------------------------------------------
# Password masking


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://alice:s3cr%40t-pw@db.example:5432/prod",
        "mysql+pymysql://root:s3cr%40t-pw@127.0.0.1:3306/test?charset=utf8mb4",
        "not a url://alice:s3cr%40t-pw@host/db",
    ],
)
def test_mask_url_hides_the_password(url: str) -> None:
    masked = mask_url(url)
    assert "s3cr" not in masked
    assert "***" in masked
    assert "alice" in masked or "root" in masked


def test_mask_url_leaves_a_url_without_password_alone() -> None:
    assert mask_url(DEFAULT_URLS[POSTGRES]) == DEFAULT_URLS[POSTGRES]


# --------------------------------------------------------------------------------------------
# Unreachable databases: fail when required, skip otherwise


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """Point the kind's URL at a closed port (with a password) and hide any Docker engine."""
    kind: str = request.param
    scheme = "postgresql+psycopg2" if kind == POSTGRES else "mysql+pymysql"
    monkeypatch.setenv(URL_ENV[kind], f"{scheme}://someone:hunter2@127.0.0.1:1/test")
    monkeypatch.setattr("helpers.databases.docker_available", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    return kind


@pytest.mark.parametrize("unreachable", [POSTGRES, MYSQL], indirect=True)
@pytest.mark.parametrize(("variable", "value"), [(REQUIRE_ENV, "1"), ("CI", "true")])
def test_unreachable_database_fails_when_required(
    unreachable: str, variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with contextlib.ExitStack() as stack, pytest.raises(pytest.fail.Exception) as failed:
        resolve_server_url(unreachable, stack)
    message = str(failed.value)
    assert "127.0.0.1:1" in message
    assert "hunter2" not in message
    assert "***" in message
    assert ("pg_ctlcluster" if unreachable == POSTGRES else "mariadbd") in message


@pytest.mark.parametrize("unreachable", [POSTGRES, MYSQL], indirect=True)
def test_unreachable_database_skips_when_not_required(unreachable: str) -> None:
    with contextlib.ExitStack() as stack, pytest.raises(pytest.skip.Exception) as skipped:
        resolve_server_url(unreachable, stack)
    assert "hunter2" not in str(skipped.value)
    assert REQUIRE_ENV in str(skipped.value)


# --------------------------------------------------------------------------------------------
# Selection


def test_selection_from_option_env_or_default() -> None:
    assert selected_kinds(["postgres"], {"SAYIIR_TEST_DATABASES": "sqlite"}) == {"postgres"}
    assert selected_kinds(None, {"SAYIIR_TEST_DATABASES": " memory, SQLite "}) == {
        "memory",
        "sqlite",
    }
    assert selected_kinds(None, {}) == {"memory", "sqlite", "postgres", "mysql"}


@pytest.mark.parametrize("value", ["oracle", "sqlite,nope", " , "])
def test_selection_rejects_unknown_or_empty(value: str) -> None:
    with pytest.raises(ValueError, match="database"):
        parse_selection(value)


def test_unmarked_tests_count_as_memory() -> None:
    assert required_kinds(["slow", "parametrize"]) == {"memory"}
    assert required_kinds(["postgres", "slow"]) == {"postgres"}


# --------------------------------------------------------------------------------------------
# The selected databases are there, new enough, and speak Unicode

MINIMUM_VERSIONS = {
    "sqlite": (3, 35),
    "postgresql": (13,),
    "mysql": (8, 0),
    "mariadb": (10, 6),
}


def test_selected_database_answers(sql_url: str) -> None:
    engine = sa.create_engine(sql_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1
            dialect = engine.dialect
            name = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
            version = dialect.server_version_info or ()
            assert tuple(version[:2]) >= MINIMUM_VERSIONS[name], (name, version)
            if dialect.name == "mysql":
                charset = connection.execute(sa.text("SELECT @@character_set_connection"))
                assert charset.scalar_one() == "utf8mb4"
    finally:
        engine.dispose()
