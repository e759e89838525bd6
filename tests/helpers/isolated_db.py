"""A private database (PostgreSQL schema, MySQL database) for tests that run workers.

Workers claim every runnable task whose tags fit, so on a server database shared by the
session (and by other test runs) they would also claim other tests' untagged leftovers, and
other tests' workers ours. Tests that run workers therefore get a namespace of their own:

- SQLite: the per-test file is private already; the URL is returned as is;
- PostgreSQL: a fresh schema, selected through ``search_path`` in the URL (``options``), so
  that worker processes started from the URL land in it too;
- MySQL/MariaDB: a fresh database in the URL.

The namespace is dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool


@contextmanager
def isolated_database(url: str) -> Iterator[str]:
    """Yield the URL of a fresh, empty namespace on the server of ``url``."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        yield url
        return
    name = f"sayiir_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(parsed, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        if backend == "postgresql":
            create, drop = f'CREATE SCHEMA "{name}"', f'DROP SCHEMA "{name}" CASCADE'
            private = parsed.update_query_dict({"options": f"-csearch_path={name}"})
        else:
            create, drop = f"CREATE DATABASE `{name}`", f"DROP DATABASE `{name}`"
            private = parsed.set(database=name)
        with admin.connect() as conn:
            conn.execute(sa.text(create))
        try:
            yield private.render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(drop))
    finally:
        admin.dispose()
