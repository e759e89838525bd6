"""Alembic environment for the ``sayiir_*`` tables.

The database comes from, in order: a connection passed by the caller in
``config.attributes["connection"]`` (what :func:`sayiir_persistence.migrate` does),
``alembic -x url=URL ...``, or the ``SAYIIR_DATABASE_URL`` environment variable.

The revision is recorded in ``sayiir_alembic_version``, not ``alembic_version``, and
autogenerate only looks at tables named ``sayiir_*``: the tables can share a database (and an
Alembic setup) with the application's own.
"""

from __future__ import annotations

import logging
import os
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sayiir_persistence.provisioning import URL_ENV_VAR, VERSION_TABLE, mask_url, migration_lock
from sayiir_persistence.sql.schema import metadata
from sayiir_persistence.sql.types import Identifier, UtcDateTime

TABLE_PREFIX = "sayiir_"

config = context.config
logger = logging.getLogger("sayiir_persistence.migrations")

# Only when run from the `alembic` command line with an ini file that configures logging: a
# program calling `migrate()` keeps its own logging configuration.
if (
    config.config_file_name is not None
    and "connection" not in config.attributes
    and config.file_config.has_section("loggers")
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate filter: only the library's own tables, never the application's."""
    if type_ == "table":
        return name is not None and name.startswith(TABLE_PREFIX)
    return True


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate filter for objects of the metadata side too (see ``include_name``)."""
    if type_ == "table":
        return name is not None and name.startswith(TABLE_PREFIX)
    return True


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate: render the library's column types as ``Identifier()``, not by module path."""
    if type_ == "type" and isinstance(obj, Identifier | UtcDateTime):
        name = type(obj).__name__
        autogen_context.imports.add(f"from sayiir_persistence.sql.types import {name}")
        return f"{name}()"
    return False


def _options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "include_object": include_object,
        "render_item": render_item,
        "compare_type": True,
        # SQLite cannot ALTER most things: future migrations copy-and-move the table.
        "render_as_batch": dialect_name == "sqlite",
        # SQLite's DDL is transactional (pysqlite just never begins before it): run all the
        # migrations in one transaction, which `migration_lock` begins IMMEDIATE.
        "transactional_ddl": True if dialect_name == "sqlite" else None,
    }


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get(URL_ENV_VAR)
    if not url:
        # CommandError: the alembic command line prints it as one line, no traceback.
        raise CommandError(
            "no database URL for the sayiir-persistence migrations: pass `-x url=URL` to "
            f"alembic or set {URL_ENV_VAR} (e.g. postgresql+psycopg2://user@host/db)"
        )
    return url


def run_migrations_offline() -> None:
    """Emit the SQL script (``alembic upgrade head --sql``) without connecting."""
    url = make_url(_url())
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_options(url.get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **_options(connection.dialect.name))
    with context.begin_transaction(), migration_lock(connection):
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on one opened from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = _url()
    logger.info("Migrating %s", mask_url(url))
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
