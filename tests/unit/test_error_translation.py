"""The one error translator (``sql/errors.py``) and the dialect registry it asks.

Driver errors are built here as the drivers raise them (an exception carrying a PostgreSQL
SQLSTATE or a MySQL error number, wrapped by SQLAlchemy); the databases' own fault tests
(tests/faults) produce the real ones.
"""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc

from sayiir_persistence import (
    BackendUnavailableError,
    InvalidInputError,
    PersistenceError,
    SchemaError,
)
from sayiir_persistence.sql.dialects import (
    MySqlDialect,
    PostgresDialect,
    SqlDialect,
    SqliteDialect,
    dialect_class,
)
from sayiir_persistence.sql.errors import RetryableConflict, translate


class _PgError(Exception):
    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


def _wrapped(original: Exception, *, statement: str | None = "SELECT 1") -> sa_exc.DBAPIError:
    return sa_exc.OperationalError(statement, {}, original)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("postgresql", PostgresDialect),
        ("mysql", MySqlDialect),
        ("mariadb", MySqlDialect),
        ("sqlite", SqliteDialect),
    ],
)
def test_registry_finds_each_strategy_by_dialect_name(
    name: str, expected: type[SqlDialect]
) -> None:
    assert dialect_class(name) is expected
    assert name in expected.names


def test_registry_refuses_an_unknown_dialect_naming_it() -> None:
    with pytest.raises(ValueError, match="unsupported database dialect 'mssql'"):
        dialect_class("mssql")


@pytest.mark.parametrize(
    ("dialect", "original"),
    [
        (PostgresDialect, _PgError("deadlock detected", "40P01")),
        (PostgresDialect, _PgError("could not serialize access", "40001")),
        (MySqlDialect, Exception(1213, "Deadlock found when trying to get lock")),
        (MySqlDialect, Exception(1205, "Lock wait timeout exceeded")),
    ],
)
def test_a_deadlock_is_retried_by_the_backend_and_unavailable_for_other_callers(
    dialect: type[SqlDialect], original: Exception
) -> None:
    error = _wrapped(original)
    assert isinstance(translate(error, "db", dialect, retries=True), RetryableConflict)
    # Inspection and provisioning do not retry: the internal RetryableConflict never escapes.
    for action in (None, "migrate"):
        translated = translate(error, "db", dialect, action=action)
        assert isinstance(translated, BackendUnavailableError)


@pytest.mark.parametrize(
    ("dialect", "original", "expected", "words"),
    [
        (PostgresDialect, _PgError("relation does not exist", "42P01"), SchemaError, "migrate"),
        (MySqlDialect, Exception(1146, "Table doesn't exist"), SchemaError, "migrate"),
        (SqliteDialect, Exception("no such table: sayiir_workflows"), SchemaError, "migrate"),
        (MySqlDialect, Exception(1153, "packet bigger"), InvalidInputError, "max_allowed_packet"),
        (SqliteDialect, Exception("database is locked"), BackendUnavailableError, "locked"),
        (MySqlDialect, Exception(2013, "Lost connection"), BackendUnavailableError, "unavail"),
    ],
)
def test_each_dialect_classifies_its_driver_errors(
    dialect: type[SqlDialect], original: Exception, expected: type[Exception], words: str
) -> None:
    # Programming errors, not OperationalError: the classification alone decides.
    error = sa_exc.ProgrammingError("SELECT 1", {}, original)
    translated = translate(error, "db", dialect, retries=True)
    assert type(translated) is expected
    assert words in str(translated)


def test_provisioning_errors_say_what_could_not_be_done_and_connect_errors_are_unavailable() -> (
    None
):
    failed = translate(
        sa_exc.ProgrammingError("CREATE TABLE t", {}, Exception("syntax error")),
        "db",
        PostgresDialect,
        action="migrate",
    )
    assert isinstance(failed, SchemaError)
    assert str(failed) == "cannot migrate db: syntax error"
    refused = translate(
        _wrapped(Exception("connection refused"), statement=None),
        "db",
        PostgresDialect,
        action="migrate",
    )
    assert isinstance(refused, BackendUnavailableError)
    assert str(refused).startswith("cannot connect to db")


def test_an_unclassified_error_is_a_persistence_error_naming_the_database() -> None:
    translated = translate(
        sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key")), "db", PostgresDialect
    )
    assert type(translated) is PersistenceError
    assert str(translated) == "database error at db: duplicate key"
