"""How the test suite reaches its databases.

Kinds of database a run can target (``--db`` or ``SAYIIR_TEST_DATABASES``):

- ``memory``: tests that need no database at all (every test without a database marker);
- ``sqlite``: a SQLite file in a per-test temporary directory;
- ``postgres``: ``SAYIIR_TEST_POSTGRES_URL``, default ``postgresql+psycopg2://postgres@127.0.0.1:5432/test``;
- ``mysql``: ``SAYIIR_TEST_MYSQL_URL``, default ``mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4``;
- ``galera``: a 3-node MariaDB Galera cluster the tests start themselves
  (``tests/helpers/clusters.py``);
- ``failover``: a PostgreSQL primary with a synchronous standby the tests start themselves.

A server database is checked once per session (a real connection with a short timeout). When it
does not answer and a Docker engine does, testcontainers starts a throw-away server for the
session. Otherwise its tests are skipped with the reason, except when databases are required
(``CI=true`` or ``SAYIIR_REQUIRE_DATABASES=1``): then they fail, naming the URL (password masked)
and how to start the server. A CI run must never go green because a database was down.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

MEMORY: Final = "memory"
SQLITE: Final = "sqlite"
POSTGRES: Final = "postgres"
MYSQL: Final = "mysql"

GALERA: Final = "galera"
FAILOVER: Final = "failover"

#: Every kind ``--db`` accepts; also the names of the pytest markers that tie a test to one.
KINDS: Final = (MEMORY, SQLITE, POSTGRES, MYSQL, GALERA, FAILOVER)
#: What a run targets when nothing is selected: the replicated servers only when asked for
#: (they take the session half a minute to start; the tox environment `cluster` asks).
DEFAULT_KINDS: Final = (MEMORY, SQLITE, POSTGRES, MYSQL)
#: Kinds that give an SQL URL (the ``sql_url`` fixture's parameters).
SQL_KINDS: Final = (SQLITE, POSTGRES, MYSQL)
#: Kinds that need a running server.
SERVER_KINDS: Final = (POSTGRES, MYSQL)

SELECTION_ENV: Final = "SAYIIR_TEST_DATABASES"
REQUIRE_ENV: Final = "SAYIIR_REQUIRE_DATABASES"

URL_ENV: Final = {
    POSTGRES: "SAYIIR_TEST_POSTGRES_URL",
    MYSQL: "SAYIIR_TEST_MYSQL_URL",
}
DEFAULT_URLS: Final = {
    POSTGRES: "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    # utf8mb4 spelled out: ids are full Unicode, and MySQL's "utf8" is the 3-byte utf8mb3.
    MYSQL: "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4",
}
# Images for the testcontainers fallback (overridable, e.g. to test another server version).
IMAGE_ENV: Final = {
    POSTGRES: "SAYIIR_TEST_POSTGRES_IMAGE",
    MYSQL: "SAYIIR_TEST_MYSQL_IMAGE",
}
DEFAULT_IMAGES: Final = {
    POSTGRES: "postgres:16-alpine",
    MYSQL: "mariadb:10.11",
}
DISPLAY_NAMES: Final = {POSTGRES: "PostgreSQL", MYSQL: "MySQL/MariaDB"}
HOW_TO_START: Final = {
    POSTGRES: (
        "start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
        "(and `createdb -h 127.0.0.1 -U postgres test`), or point SAYIIR_TEST_POSTGRES_URL at a "
        "running server"
    ),
    MYSQL: (
        "start it with `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd` "
        "(and `mysql -h127.0.0.1 -uroot -e 'CREATE DATABASE IF NOT EXISTS test'`), or point "
        "SAYIIR_TEST_MYSQL_URL at a running server"
    ),
}

CONNECT_TIMEOUT_SECONDS: Final = 5

_TRUTHY: Final = frozenset({"1", "true", "yes", "on"})


# --------------------------------------------------------------------------------------------
# Selection: which kinds a run targets


def parse_selection(value: str | Iterable[str]) -> frozenset[str]:
    """Parse ``"memory,sqlite"`` (or an iterable of names) into a set of kinds.

    Raises ``ValueError`` naming the unknown entries; an empty selection is an error too.
    """
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = {part.strip().lower() for part in parts if part.strip()}
    unknown = sorted(names - set(KINDS))
    if unknown:
        raise ValueError(
            f"unknown database(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}"
        )
    if not names:
        raise ValueError(f"no database selected; choose from {', '.join(KINDS)}")
    return frozenset(names)


def selected_kinds(
    cli_values: list[str] | None, environ: dict[str, str] | None = None
) -> frozenset[str]:
    """The kinds a run targets: ``--db`` values win, then ``SAYIIR_TEST_DATABASES``, else
    ``DEFAULT_KINDS``."""
    env = os.environ if environ is None else environ
    if cli_values:
        return parse_selection(cli_values)
    from_env = env.get(SELECTION_ENV, "").strip()
    if from_env:
        return parse_selection(from_env)
    return frozenset(DEFAULT_KINDS)


def required_kinds(markers: Iterable[str]) -> frozenset[str]:
    """The kinds a test needs, from its marker names; a test with none needs only ``memory``."""
    kinds = frozenset(name for name in markers if name in KINDS)
    return kinds or frozenset({MEMORY})


def databases_required(environ: dict[str, str] | None = None) -> bool:
    """True when an unreachable database must fail the run (``CI=true`` or
    ``SAYIIR_REQUIRE_DATABASES=1``) instead of skipping its tests."""
    env = os.environ if environ is None else environ
    return (
        env.get("CI", "").strip().lower() in _TRUTHY
        or env.get(REQUIRE_ENV, "").strip().lower() in _TRUTHY
    )


# --------------------------------------------------------------------------------------------
# URLs


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe for logs and messages."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # Not a URL SQLAlchemy understands: still never show what looks like a password.
        return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


def database_url(kind: str, *, tmp_path: Path | None = None) -> str:
    """The URL configured for ``kind`` (not checked for reachability).

    ``sqlite`` needs ``tmp_path``: the database is a file in it. ``postgres`` / ``mysql`` come
    from ``SAYIIR_TEST_POSTGRES_URL`` / ``SAYIIR_TEST_MYSQL_URL`` or the local defaults.
    """
    if kind == SQLITE:
        if tmp_path is None:
            raise ValueError("a sqlite URL needs tmp_path (the directory holding the file)")
        return URL.create("sqlite", database=str(tmp_path / "sayiir.sqlite3")).render_as_string()
    if kind in SERVER_KINDS:
        return os.environ.get(URL_ENV[kind], "").strip() or DEFAULT_URLS[kind]
    raise ValueError(f"no URL for database kind {kind!r}; choose from {', '.join(SQL_KINDS)}")


# --------------------------------------------------------------------------------------------
# Reachability and the testcontainers fallback


def _describe(exc: BaseException, url: str) -> str:
    """One line saying why a connection failed, without the password."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else ""
    with contextlib.suppress(Exception):
        password = make_url(url).password
        if password:
            text = text.replace(str(password), "***")
    return f"{type(original).__name__}: {text}" if text else type(original).__name__


def unreachable_reason(url: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> str | None:
    """None when the database at ``url`` answers ``SELECT 1``; otherwise why not."""
    try:
        parsed = make_url(url)
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() in ("postgresql", "mysql", "mariadb"):
            # psycopg2, psycopg and pymysql all take an integer connect_timeout in seconds.
            connect_args["connect_timeout"] = max(1, int(timeout))
        engine = sa.create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    except Exception as exc:  # bad URL, driver not installed
        return _describe(exc, url)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:
        return _describe(exc, url)
    finally:
        engine.dispose()
    return None


def _docker_socket_candidates() -> list[Path]:
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    candidates = [Path("/var/run/docker.sock"), Path.home() / ".docker/run/docker.sock"]
    if runtime_dir:
        candidates.append(Path(runtime_dir) / "docker.sock")
    return candidates


def docker_available() -> bool:
    """True when a Docker engine answers a ping (so testcontainers can start a server)."""
    if not os.environ.get("DOCKER_HOST") and not any(
        path.exists() for path in _docker_socket_candidates()
    ):
        return False  # nothing to ask; spares the Docker SDK's connection attempts
    with warnings.catch_warnings():
        # A failed ping leaves the SDK's socket to the garbage collector; collect it here, where
        # its ResourceWarning is ignored, rather than let `filterwarnings = error` see it later.
        warnings.simplefilter("ignore")
        try:
            docker = importlib.import_module("docker")
            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


def _import_container_class(kind: str) -> Any:
    # testcontainers moved the database modules to testcontainers.community (the old paths
    # remain as deprecated aliases); accept both.
    module_name, class_name = {
        POSTGRES: ("postgres", "PostgresContainer"),
        MYSQL: ("mysql", "MySqlContainer"),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for prefix in ("testcontainers.community.", "testcontainers."):
            try:
                module = importlib.import_module(prefix + module_name)
            except ImportError:
                continue
            return getattr(module, class_name)
    raise ImportError(f"testcontainers has no {class_name} (is testcontainers installed?)")


def start_container(kind: str, stack: contextlib.ExitStack) -> str:
    """Start a throw-away server for ``kind``, stopped when ``stack`` closes; return its URL."""
    image = os.environ.get(IMAGE_ENV[kind], "").strip() or DEFAULT_IMAGES[kind]
    container_class = _import_container_class(kind)
    if kind == POSTGRES:
        container = container_class(image, driver="psycopg2")
    else:
        container = container_class(image, dialect="pymysql").with_command(
            # Multi-megabyte payloads need a large packet; ids are full Unicode.
            "--max-allowed-packet=64M --character-set-server=utf8mb4"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        container.start()
    stack.callback(container.stop)
    url: str = container.get_connection_url()
    if kind == MYSQL and "charset=" not in url:
        url += ("&" if "?" in url else "?") + "charset=utf8mb4"
    return url


def unavailable_message(kind: str, url: str, reason: str) -> str:
    name = DISPLAY_NAMES[kind]
    return (
        f"{name} is not reachable at {mask_url(url)} ({reason}) and no Docker engine answers "
        f"for testcontainers; {HOW_TO_START[kind]}. `bash .ci/run` starts both servers."
    )


def resolve_server_url(kind: str, stack: contextlib.ExitStack) -> str:
    """A reachable URL for a server kind, for the whole session.

    The configured URL if it answers; else a testcontainers server when Docker answers; else
    ``pytest.fail`` when databases are required (CI), ``pytest.skip`` otherwise.
    """
    url = database_url(kind)
    reason = unreachable_reason(url)
    if reason is None:
        return url
    if docker_available():
        container_url = start_container(kind, stack)
        container_reason = unreachable_reason(container_url)
        if container_reason is None:
            return container_url
        reason = f"{reason}; the testcontainers server did not answer either: {container_reason}"
    message = unavailable_message(kind, url, reason)
    if databases_required():
        pytest.fail(
            f"{message} Databases are required here (CI=true or {REQUIRE_ENV}=1).",
            pytrace=False,
        )
    pytest.skip(f"{message} (Set {REQUIRE_ENV}=1 to make this an error.)")


def sql_params() -> list[Any]:
    """``pytest.param`` per SQL kind, with its id and marker: parametrize your own fixtures
    with these (plus a ``memory`` param) to run them over every selected database."""
    return [pytest.param(kind, id=kind, marks=getattr(pytest.mark, kind)) for kind in SQL_KINDS]
