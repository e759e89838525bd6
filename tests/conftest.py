"""Test-suite wiring: database selection (``--db``), database URL fixtures, Hypothesis profiles.

Fixtures:

- ``sqlite_url``: a SQLite file URL in the test's temporary directory (function scope).
- ``postgres_url`` / ``mysql_url``: a reachable server URL for the session (skipped or failed
  as described in ``helpers/databases.py`` when there is none).
- ``sql_url``: parametrized over sqlite, postgres and mysql (ids and markers of the same names);
  a test using it runs once per *selected* database.

Selection: ``pytest --db sqlite --db postgres`` (repeatable; choices memory, sqlite, postgres,
mysql), else ``SAYIIR_TEST_DATABASES=memory,sqlite``, else all. A test runs only when every
database marker it carries is selected; a test with no database marker counts as ``memory``, so
the pure tests run once (in tox's ``sqlite`` environment), not once per database.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.clusters import GaleraCluster, StandbyPair, server_directory
from helpers.databases import (
    KINDS,
    SELECTION_ENV,
    SERVER_KINDS,
    database_url,
    databases_required,
    mask_url,
    required_kinds,
    resolve_server_url,
    selected_kinds,
    sql_params,
)
from helpers.isolated_db import isolated_database
from sayiir_persistence import migrate

# The conformance suite lives in the package: let pytest explain its failed asserts too.
pytest.register_assert_rewrite("sayiir_persistence.testing")

# The worker tests' stores (fixtures ``store`` and ``real_time_store``) and the telemetry
# tests' OpenTelemetry SDK (fixture ``telemetry``).
pytest_plugins = ["helpers.worker_stores", "helpers.otel"]

_SELECTED = pytest.StashKey[frozenset[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        action="append",
        choices=KINDS,
        dest="sayiir_db",
        metavar="DB",
        help=(
            f"run the tests of this database (repeatable; one of {', '.join(KINDS)}). "
            f"Default: ${SELECTION_ENV} (comma list), else all. Unmarked tests count as memory."
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        selection = selected_kinds(config.getoption("sayiir_db"))
    except ValueError as exc:
        raise pytest.UsageError(f"{SELECTION_ENV}: {exc}") from exc
    config.stash[_SELECTED] = selection
    _load_hypothesis_profile(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    selection = config.stash[_SELECTED]
    shown = []
    for kind in KINDS:
        if kind not in selection:
            continue
        shown.append(f"{kind} ({mask_url(database_url(kind))})" if kind in SERVER_KINDS else kind)
    required = "fail" if databases_required() else "skip"
    return [
        f"sayiir databases: {', '.join(shown)}; an unreachable database will {required} its tests"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selection = config.stash[_SELECTED]
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        needed = required_kinds(marker.name for marker in item.iter_markers())
        (keep if needed <= selection else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _load_hypothesis_profile(config: pytest.Config) -> None:
    # Database round trips make per-example timing meaningless: no deadline. In CI, print the
    # reproduction blob of a failure so it can be replayed locally. `--hypothesis-profile` or
    # HYPOTHESIS_PROFILE choose another.
    try:
        from hypothesis import settings
    except ImportError:  # pragma: no cover - hypothesis is in the test extra
        return
    settings.register_profile("dev", deadline=None)
    settings.register_profile("ci", deadline=None, print_blob=True)
    if config.getoption("--hypothesis-profile", None):
        return  # hypothesis' own plugin loads it
    default = "ci" if databases_required() else "dev"
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", default))


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for this test."""
    return database_url("sqlite", tmp_path=tmp_path)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A reachable PostgreSQL URL (``SAYIIR_TEST_POSTGRES_URL``), shared by the session."""
    with contextlib.ExitStack() as stack:
        yield resolve_server_url("postgres", stack)


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A reachable MySQL/MariaDB URL (``SAYIIR_TEST_MYSQL_URL``), shared by the session."""
    with contextlib.ExitStack() as stack:
        yield resolve_server_url("mysql", stack)


@pytest.fixture(params=sql_params())
def sql_url(request: pytest.FixtureRequest) -> str:
    """Each selected SQL database in turn (ids and markers: sqlite, postgres, mysql).

    Server databases are shared by the whole session: a test must leave no state behind that
    another test could trip on (drop what it created, or use its own tables/ids).
    """
    kind: str = request.param
    url: str = request.getfixturevalue(f"{kind}_url")
    return url


@pytest.fixture
def store_url(sql_url: str) -> Iterator[str]:
    """A provisioned, empty database of this test's own on each selected SQL database."""
    with isolated_database(sql_url) as url:
        migrate(url)
        yield url


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[GaleraCluster]:
    """A 3-node Galera cluster for the session (about 30 s to start), stopped and deleted at
    its end. A test that kills a node must leave the others to the next tests: it restarts
    nothing, so such tests come last or use a cluster of their own."""
    with server_directory("sayiir-galera-") as directory:
        cluster = GaleraCluster.start(directory)
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture
def standby_pair() -> Iterator[StandbyPair]:
    """A fresh PostgreSQL primary with a synchronous standby for one test (a failover leaves
    the pair unusable for the next), stopped and deleted after it."""
    with server_directory("sayiir-pair-") as directory:
        pair = StandbyPair.start(directory)
        try:
            yield pair
        finally:
            pair.stop()
