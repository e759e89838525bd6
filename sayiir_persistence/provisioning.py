"""Provision the ``sayiir_*`` tables with the Alembic migrations shipped inside the package.

The migrations live in the repository's top-level ``migrations/`` folder and travel inside
the wheel as ``sayiir_persistence/migrations``, so an installed package migrates without a
checkout or an ``alembic.ini``::

    import sayiir_persistence
    sayiir_persistence.migrate("postgresql+psycopg2://app@db/app")

or, from a shell, ``sayiir-persistence migrate --url URL``. From a checkout,
``alembic upgrade head`` (with ``SAYIIR_DATABASE_URL`` set or ``-x url=URL``) runs the same
scripts through the ``alembic.ini`` at the repository root.

Alembic records the revision in its own table, ``sayiir_alembic_version``, so it never clashes
with an application's ``alembic_version`` in the same database.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from .errors import BackendUnavailableError, InvalidInputError, SchemaError

__all__ = [
    "MIGRATIONS_DIR",
    "URL_ENV_VAR",
    "VERSION_TABLE",
    "MigrationResult",
    "alembic_config",
    "check_schema",
    "current_revision",
    "head_revision",
    "mask_url",
    "migrate",
    "migration_lock",
    "redact_passwords",
    "upgrade",
]

logger = logging.getLogger(__name__)

URL_ENV_VAR = "SAYIIR_DATABASE_URL"
"""Environment variable read by ``alembic`` (env.py) and ``sayiir-persistence`` for the URL."""

VERSION_TABLE = "sayiir_alembic_version"
"""The table in which Alembic records the revision of the ``sayiir_*`` tables."""

# Installed: the wheel carries the migrations inside the package. In a checkout they sit
# in the repository's top-level migrations/ folder.
_PACKAGE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = next(
    (
        candidate
        for candidate in (_PACKAGE_DIR / "migrations", _PACKAGE_DIR.parent / "migrations")
        if (candidate / "env.py").is_file()
    ),
    _PACKAGE_DIR / "migrations",
)
"""The Alembic script directory, inside the package (and so inside the wheel)."""

# Any constant shared by every process: concurrent `migrate` calls (workers starting together)
# queue on it instead of racing to create the same tables.
_LOCK_NAME = "sayiir_persistence_migrations"
_PG_LOCK_KEY = 0x5A11_2000_0001
_MYSQL_LOCK_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`upgrade` did: the revisions before and after, on which database."""

    url: str
    """The database URL, password masked."""
    from_revision: str | None
    """The revision before the upgrade, ``None`` for a database that was not provisioned."""
    to_revision: str | None
    """The revision after the upgrade."""

    @property
    def changed(self) -> bool:
        """Whether any migration ran."""
        return self.from_revision != self.to_revision


def migrate(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (by default the newest), creating the tables.

    Idempotent: a database already at ``revision`` is left as is. Concurrent calls against
    the same database (processes starting together) wait for each other; see
    :func:`migration_lock`. An ``Engine`` is used as given and left open; for a URL an engine
    is created and disposed of.

    Raises:
        InvalidInputError: ``engine_or_url`` is not an engine or a valid database URL.
        BackendUnavailableError: the database cannot be reached.
        SchemaError: the migration failed, ``revision`` is unknown or behind the database,
            or the database was migrated by a newer version of sayiir-persistence.
    """
    upgrade(engine_or_url, revision)


def upgrade(engine_or_url: Engine | str | URL, revision: str = "head") -> MigrationResult:
    """Like :func:`migrate`, and return the revisions before and after the upgrade."""
    with _engine(engine_or_url) as engine:
        shown = _masked(engine.url)
        config = alembic_config()
        with (
            _translate_errors(shown, "migrate"),
            engine.begin() as connection,
            # Taken here too (env.py takes it again: both locks are re-entrant) so that
            # `before` is not read while another process is half-way through.
            migration_lock(connection),
        ):
            before = current_revision(connection)
            # env.py picks this connection up: the upgrade runs in this transaction (so on
            # PostgreSQL, whose DDL is transactional, it is all or nothing).
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            after = current_revision(connection)
    if before == after:
        logger.info("%s is already at revision %s", shown, after)
    else:
        logger.info("Migrated %s from revision %s to %s", shown, before, after)
    return MigrationResult(url=shown, from_revision=before, to_revision=after)


@cache
def head_revision() -> str:
    """Return the newest revision of the migrations shipped with this package.

    Read from the migration files once per process, then cached.
    """
    head = _script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships its initial revision
        raise SchemaError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(connection: Connection) -> str | None:
    """Return the revision recorded in the database, ``None`` if it was never migrated.

    Driver errors are not translated here: the caller owns the connection.
    """
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaError` unless the database is at :func:`head_revision`.

    The message names the database (password masked) and the command that fixes it.

    Raises:
        SchemaError: the database is not provisioned, behind head, or ahead of this package.
        BackendUnavailableError: the database cannot be reached.
    """
    shown = _masked(engine.url)
    with _translate_errors(shown, "check the schema of"), engine.connect() as connection:
        current = current_revision(connection)
    head = head_revision()
    if current == head:
        return
    fix = (
        f"run `sayiir-persistence migrate --url {shown}` "
        "(or `alembic upgrade head` from a checkout)"
    )
    if current is None:
        raise SchemaError(f"database {shown} is not provisioned for sayiir-persistence: {fix}")
    if not _is_known(current):
        raise SchemaError(
            f"database {shown} is at revision {current}, which this version of "
            f"sayiir-persistence does not know (its head is {head}): the database was migrated "
            "by a newer version; upgrade sayiir-persistence"
        )
    raise SchemaError(f"database {shown} is at revision {current}, not at head {head}: {fix}")


@contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Hold a database-wide lock that serialises concurrent migrations.

    Call it inside the migration's transaction. PostgreSQL: a transaction-level advisory
    lock (released at commit). MySQL/MariaDB: a named session lock (their DDL commits
    implicitly, so a transaction-level lock would not last). SQLite: the database's write
    lock, taken now with ``BEGIN IMMEDIATE`` (which also makes the migration all or nothing).
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        yield
    elif dialect in ("mysql", "mariadb"):
        acquired = connection.execute(
            text("SELECT GET_LOCK(:name, :timeout)"),
            {"name": _LOCK_NAME, "timeout": _MYSQL_LOCK_TIMEOUT_SECONDS},
        ).scalar()
        if acquired != 1:
            raise SchemaError(
                f"timed out after {_MYSQL_LOCK_TIMEOUT_SECONDS}s waiting for another "
                "migration of this database to finish"
            )
        try:
            yield
        finally:
            connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": _LOCK_NAME})
    elif dialect == "sqlite":
        # pysqlite does not begin a transaction before DDL: without this, a concurrent
        # migration would find the tables half created. Skipped when a transaction is already
        # open (an engine that begins IMMEDIATE itself, or a re-entrant call).
        if not getattr(connection.connection.dbapi_connection, "in_transaction", False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield
    else:
        yield


def alembic_config() -> Config:
    """Return an Alembic ``Config`` for the packaged migrations, without an ``alembic.ini``.

    For other Alembic commands run programmatically (``alembic.command.downgrade``,
    ``history``, ...): put an open connection in ``config.attributes["connection"]``.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@cache
def _script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _is_known(revision: str) -> bool:
    try:
        return _script_directory().get_revision(revision) is not None
    except CommandError:
        return False


@contextmanager
def _engine(engine_or_url: Engine | str | URL) -> Iterator[Engine]:
    """Yield the engine given, or a throw-away engine for a URL (disposed of afterwards)."""
    if isinstance(engine_or_url, Engine):
        yield engine_or_url
        return
    if not isinstance(engine_or_url, str | URL):
        raise InvalidInputError(
            "engine_or_url must be a SQLAlchemy Engine, URL or str, "
            f"got {type(engine_or_url).__name__}"
        )
    try:
        url = make_url(engine_or_url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        # SQLAlchemy's message repeats the URL, password included: do not chain its text.
        raise InvalidInputError(
            f"not a valid database URL: {mask_url(str(engine_or_url))}"
        ) from None
    try:
        # NullPool: the engine lives for one migration; no connection should outlive it.
        engine = create_engine(url, poolclass=NullPool)
    except (ArgumentError, ImportError) as exc:
        raise InvalidInputError(f"cannot use database URL {_masked(url)}: {exc}") from exc
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _translate_errors(shown_url: str, action: str) -> Iterator[None]:
    """Turn Alembic and SQLAlchemy exceptions into the library's, the original as cause."""
    try:
        yield
    except CommandError as exc:
        raise SchemaError(f"cannot {action} {shown_url}: {_one_line(str(exc))}") from exc
    except DBAPIError as exc:
        reason = _one_line(str(exc.orig))
        if exc.connection_invalidated or _is_connect_error(exc):
            raise BackendUnavailableError(f"cannot connect to {shown_url}: {reason}") from exc
        if _is_sqlite_busy(exc):
            raise BackendUnavailableError(
                f"cannot {action} {shown_url}: the database stayed locked ({reason})"
            ) from exc
        raise SchemaError(f"cannot {action} {shown_url}: {reason}") from exc
    except SQLAlchemyError as exc:
        raise SchemaError(f"cannot {action} {shown_url}: {_one_line(str(exc))}") from exc


def _is_sqlite_busy(exc: DBAPIError) -> bool:
    # Another connection holds SQLite's write lock past the busy timeout: retryable, not a
    # schema problem.
    message = str(exc.orig).lower()
    return "database is locked" in message or "database is busy" in message


def _is_connect_error(exc: DBAPIError) -> bool:
    # SQLAlchemy raises connection failures from pool checkout with no statement attached.
    return exc.statement is None


def _masked(url: URL) -> str:
    return url.render_as_string(hide_password=True)


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, even when it does not parse."""
    try:
        return _masked(make_url(url))
    except (ArgumentError, ValueError):
        return redact_passwords(url)


def redact_passwords(text: str) -> str:
    """Replace the password of every ``scheme://user:password@`` in ``text`` by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


def _one_line(message: str) -> str:
    """Collapse a (possibly multi-line) driver message into one line."""
    message = message.split("\n(Background on this error", 1)[0]
    return " ".join(message.split())
