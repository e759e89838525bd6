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
from sqlalchemy import URL, Connection, Engine, create_engine
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from .errors import InvalidInputError, SchemaError
from .sql.dialects import dialect_class
from .sql.errors import translated_errors
from .urls import mask_url, parse_url

__all__ = [
    "MIGRATIONS_DIR",
    "URL_ENV_VAR",
    "VERSION_TABLE",
    "MigrationResult",
    "alembic_config",
    "check_schema",
    "current_revision",
    "head_revision",
    "migrate",
    "migration_lock",
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
        shown = mask_url(engine.url)
        config = alembic_config()
        with (
            _translate_errors(engine, "migrate"),
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
        with _translate_errors(engine, "migrate"), engine.connect() as connection:
            dialect_class(engine.dialect.name).after_migration(connection)
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


def check_schema(engine: Engine | Connection) -> None:
    """Raise :class:`SchemaError` unless the database is at :func:`head_revision`.

    The message names the database (password masked) and the command that fixes it. Given
    a ``Connection``, the check runs on it (its transaction is left open).

    Raises:
        SchemaError: the database is not provisioned, behind head, or ahead of this package.
        BackendUnavailableError: the database cannot be reached.
    """
    shown = mask_url(engine.engine.url)
    with _translate_errors(engine.engine, "check the schema of"):
        if isinstance(engine, Connection):
            current = current_revision(engine)
        else:
            with engine.connect() as connection:
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
    Each dialect's ``migration_lock`` holds the details.
    """
    with dialect_class(connection.dialect.name).migration_lock(connection):
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
    url = parse_url(engine_or_url)
    try:
        # NullPool: the engine lives for one migration; no connection should outlive it.
        options = dialect_class(url.get_backend_name()).migration_engine_options()
        engine = create_engine(url, poolclass=NullPool, **options)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise InvalidInputError(f"cannot use database URL {mask_url(url)}: {exc}") from exc
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _translate_errors(engine: Engine, action: str) -> Iterator[None]:
    """Turn Alembic and SQLAlchemy exceptions into the library's, the original as cause."""
    shown = mask_url(engine.url)
    try:
        dialect = dialect_class(engine.dialect.name)
    except ValueError as error:
        raise InvalidInputError(str(error)) from None
    try:
        with translated_errors(shown, dialect, action=action):
            yield
    except CommandError as exc:
        raise SchemaError(f"cannot {action} {shown}: {' '.join(str(exc).split())}") from exc
