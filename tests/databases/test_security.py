"""Security properties of the package: no SQL built from values, no secret ever shown.

1. **No SQL built by string formatting.** Every statement of the package is a SQLAlchemy
   construct with bound parameters; raw SQL text is allowed only as a constant. An AST scan of
   every module of the package and of the migrations refuses:

   - a call of ``text``, ``exec_driver_sql``, ``literal_column``, ``DDL`` or ``executescript``
     whose SQL is anything but a string constant (or a choice between constants);
   - an ``execute(...)`` of an f-string, a ``%``-formatted, ``.format``-ed or concatenated
     string;
   - an f-string or formatted string that reads like SQL (``SELECT``, ``INSERT INTO``...).

   The scanner is tested on samples of each shape, so that a scanner that sees nothing fails.

2. **Secrets.** A password in the database URL never appears in ``repr(backend)``, in the log
   records of any logger (SQLAlchemy's engine and pool loggers at DEBUG included), in the
   message or the cause chain of an exception, or in the output of the command line, whether
   the password is right (a whole claim cycle and a worker run) or wrong.
"""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import sayiir_persistence
from helpers.databases import sql_params
from helpers.isolated_db import isolated_database
from sayiir_persistence import (
    BackendUnavailableError,
    ClaimLostError,
    NotFoundError,
    PersistenceError,
    SqlBackend,
    WorkflowStatus,
    migrate,
)
from sayiir_persistence.provisioning import MIGRATIONS_DIR
from sayiir_persistence.worker import Pipeline, TaskContext, Worker

SECRET = "s3cret-Pw-" + uuid.uuid4().hex[:8]

# ============================================================================================
# 1. No SQL built by string formatting

#: Calls whose first argument is SQL text: it must be a constant.
_SQL_TEXT_CALLS = frozenset({"text", "exec_driver_sql", "literal_column", "DDL", "executescript"})
_SQL_WORDS = ("SELECT ", "INSERT INTO", "UPDATE ", "DELETE FROM", "CREATE ", "DROP ", "ALTER ")


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _is_constant_text(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return _formats_integers_only(node)
    if isinstance(node, ast.IfExp):  # "BEGIN" if read_only else "BEGIN IMMEDIATE"
        return _is_constant_text(node.body) and _is_constant_text(node.orelse)
    return False


def _formats_integers_only(node: ast.JoinedStr) -> bool:
    """``f"PRAGMA busy_timeout={ms:d}"``: ``:d`` renders an int or raises, it cannot carry SQL."""
    return all(
        isinstance(value.format_spec, ast.JoinedStr) and _string_parts(value.format_spec) == "d"
        for value in node.values
        if isinstance(value, ast.FormattedValue)
    )


def _is_formatted_string(node: ast.expr) -> bool:
    """An f-string, ``"..." % x``, ``"...".format(x)`` or a concatenation with a non-constant."""
    if isinstance(node, ast.JoinedStr):
        return not _formats_integers_only(node)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return not (_is_constant_text(node.left) and _is_constant_text(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
    return False


def _string_parts(node: ast.expr) -> str:
    return " ".join(
        part.value
        for part in ast.walk(node)
        if isinstance(part, ast.Constant) and isinstance(part.value, str)
    )


def sql_formatting_findings(source: str, filename: str = "<source>") -> list[str]:
    """Where ``source`` builds SQL from values, as ``file:line: why`` strings."""
    findings = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            name = _called_name(node)
            first = node.args[0] if node.args else None
            if name in _SQL_TEXT_CALLS and first is not None and not _is_constant_text(first):
                findings.append(f"{filename}:{node.lineno}: {name}() of non-constant SQL")
            elif name == "execute" and first is not None and _is_formatted_string(first):
                findings.append(f"{filename}:{node.lineno}: execute() of a formatted string")
        sql_like = isinstance(node, ast.expr) and any(
            word in _string_parts(node) for word in _SQL_WORDS
        )
        if sql_like and isinstance(node, ast.expr) and _is_formatted_string(node):
            findings.append(f"{filename}:{node.lineno}: SQL built by string formatting")
    return findings


@pytest.mark.parametrize(
    "sample",
    [
        'conn.execute(text(f"SELECT * FROM t WHERE id = {value}"))',
        'conn.execute(text("SELECT * FROM t WHERE id = %s" % value))',
        'conn.exec_driver_sql("DELETE FROM t WHERE id = " + value)',
        'conn.execute(sa.text("SELECT {}".format(value)))',
        'conn.execute(f"UPDATE t SET a = {value}")',
        'cursor.execute(f"PRAGMA busy_timeout={value}")',
        'cursor.execute(f"PRAGMA busy_timeout={value:s}")',
        "query = text(statement)",
        'sql = f"INSERT INTO t VALUES ({value})"',
        'sql = "DROP TABLE %s" % name',
        "cursor.executescript(script)",
    ],
)
def test_the_scanner_finds_sql_built_from_values(sample: str) -> None:
    assert sql_formatting_findings(sample)


@pytest.mark.parametrize(
    "sample",
    [
        'conn.execute(text("SELECT 1"))',
        'conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")',
        'conn.execute(text("SELECT :x"), {"x": value})',
        "conn.execute(select(table).where(table.c.id == value))",
        'message = f"workflow {instance_id!r} is not in progress"',
        'cursor.execute(f"PRAGMA busy_timeout={milliseconds:d}")',
        'conn.exec_driver_sql(f"PRAGMA busy_timeout={milliseconds:d}")',
    ],
)
def test_the_scanner_accepts_bound_parameters_and_constants(sample: str) -> None:
    assert sql_formatting_findings(sample) == []


def _python_files() -> Iterator[Path]:
    package = Path(sayiir_persistence.__file__).parent
    yield from sorted(package.rglob("*.py"))
    if MIGRATIONS_DIR.resolve() != (package / "migrations").resolve():
        yield from sorted(MIGRATIONS_DIR.rglob("*.py"))


def test_no_sql_is_built_by_string_formatting_in_the_package() -> None:
    files = list(_python_files())
    assert any("dialects" in path.parts for path in files), "the scan missed the SQL modules"
    assert any("versions" in path.parts for path in files), "the scan missed the migrations"
    findings = [
        finding
        for path in files
        for finding in sql_formatting_findings(path.read_text(encoding="utf-8"), str(path))
    ]
    assert findings == []


# ============================================================================================
# 2. Secrets: a password in the URL is never shown


def _with_password(url: str, user: str | None = None) -> str:
    parsed = make_url(url).set(password=SECRET)
    if user is not None:
        parsed = parsed.set(username=user)
    return parsed.render_as_string(hide_password=False)


def _exception_text(error: BaseException) -> str:
    """Everything a traceback of ``error`` would show: messages, reprs, the cause chain."""
    texts = ["".join(traceback.format_exception(error))]
    seen: BaseException | None = error
    while seen is not None:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, SQLAlchemy's engine and pool loggers included."""
    noisy = ["sqlalchemy", "sqlalchemy.engine", "sqlalchemy.pool", "alembic"]
    previous = {name: logging.getLogger(name).level for name in noisy}
    caplog.set_level(logging.DEBUG)
    for name in noisy:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def _logged_text(caplog: pytest.LogCaptureFixture) -> str:
    lines = []
    for record in caplog.records:
        lines.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            lines.append(_exception_text(record.exc_info[1]))
    return "\n".join(lines)


@pytest.fixture(params=[param for param in sql_params() if param.id != "sqlite"])
def server_url(request: pytest.FixtureRequest) -> str:
    """Each selected database server (SQLite URLs carry no password)."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def url_with_password(server_url: str) -> Iterator[str]:
    """A private namespace reached through a URL with a password that the server accepts:
    PostgreSQL (trust auth here) ignores it; on MySQL/MariaDB a user is created with it."""
    with isolated_database(server_url) as private_url:
        parsed = make_url(private_url)
        if parsed.get_backend_name() == "postgresql":
            yield _with_password(private_url)
            return
        user = f"sayiir_secret_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(parsed, poolclass=NullPool)
        try:
            with admin.begin() as conn:
                conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{SECRET}'"))
                conn.execute(sa.text(f"GRANT ALL ON `{parsed.database}`.* TO '{user}'@'%'"))
            yield _with_password(private_url, user)
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))
            admin.dispose()


def test_password_never_shown_while_working(
    url_with_password: str, all_logs: pytest.LogCaptureFixture
) -> None:
    errors: list[PersistenceError] = []
    migrate(url_with_password)
    with SqlBackend(url_with_password) as backend:
        assert SECRET not in repr(backend)
        assert SECRET not in repr(backend.engine)
        pipeline = Pipeline("one", "two")
        backend.save_snapshot(pipeline.start("wf", "def", initial_input=b"in"))
        claim = backend.claim_task("wf", "one", "me", timedelta(minutes=1))
        assert claim is not None
        for wrong in (
            lambda: backend.load_snapshot("absent"),
            lambda: backend.release_task_claim("wf", "one", "not-me"),
        ):
            with pytest.raises((NotFoundError, ClaimLostError)) as raised:
                wrong()
            errors.append(raised.value)
        backend.release_task_claim("wf", "one", "me", token=claim.token)

        def step(ctx: TaskContext) -> bytes:
            return ctx.task_id.encode()

        worker = Worker(
            backend, step, pipeline, threads=2, poll_interval=timedelta(milliseconds=20)
        )
        with worker:
            deadline = time.monotonic() + 30
            while backend.load_snapshot("wf").status is not WorkflowStatus.COMPLETED:
                assert time.monotonic() < deadline, "the worker did not finish the workflow"
                time.sleep(0.02)
        assert backend.load_snapshot("wf").status is WorkflowStatus.COMPLETED
    assert all_logs.records, "nothing was logged: the capture is not working"
    assert SECRET not in _logged_text(all_logs)
    for error in errors:
        assert SECRET not in _exception_text(error)


@pytest.mark.parametrize("fault", ["wrong password", "closed port", "absent database"])
def test_password_never_shown_when_connecting_fails(
    server_url: str, fault: str, all_logs: pytest.LogCaptureFixture
) -> None:
    parsed = make_url(server_url)
    if fault == "wrong password" and parsed.get_backend_name() == "postgresql":
        bad = _with_password(server_url, "sayiir_no_such_role")  # trust auth: an unknown role
    elif fault == "wrong password":
        bad = _with_password(server_url)  # not the account's password: the server refuses
    elif fault == "closed port":
        bad = _with_password(parsed.set(port=1).render_as_string(hide_password=False))
    else:
        bad = _with_password(
            parsed.set(database="sayiir_absent").render_as_string(hide_password=False)
        )
    with pytest.raises(BackendUnavailableError) as raised:
        SqlBackend(bad)
    assert raised.value.__cause__ is not None
    assert SECRET not in _exception_text(raised.value)
    assert SECRET not in _logged_text(all_logs)
    assert "***" in str(raised.value)


def test_password_never_shown_by_the_command_line(url_with_password: str) -> None:
    closed = make_url(url_with_password).set(port=1).render_as_string(hide_password=False)
    for arguments in (
        ["migrate", "--url", url_with_password],
        ["list", "--url", url_with_password],
        ["-v", "list", "--url", url_with_password],
        ["list", "--url", closed],
        ["show", "absent", "--url", url_with_password],
    ):
        completed = subprocess.run(
            [sys.executable, "-m", "sayiir_persistence", *arguments],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = completed.stdout + completed.stderr
        assert SECRET not in output, arguments
        assert "Traceback" not in output, output
