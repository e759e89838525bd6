"""The call watchdog on plain sockets, and the timeouts the dialects give the drivers.

The watchdog is what bounds a PostgreSQL call on a silent network (libpq has no read
timeout); here a thread blocked in ``recv`` on a socket pair stands for the driver.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.engine import make_url

from sayiir_persistence.sql.dialects import MySqlDialect, PostgresDialect
from sayiir_persistence.sql.dialects.base import Timeouts
from sayiir_persistence.sql.watchdog import CallWatchdog

TIMEOUTS = Timeouts(connect=timedelta(seconds=10), call=timedelta(seconds=60))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


@pytest.fixture
def watchdog() -> Iterator[CallWatchdog]:
    dog = CallWatchdog(5.0, "test")
    yield dog
    dog.close()


def blocked_recv(sock: socket.socket) -> tuple[threading.Thread, list[bytes]]:
    received: list[bytes] = []
    thread = threading.Thread(target=lambda: received.append(sock.recv(10)), daemon=True)
    thread.start()
    return thread, received


def test_an_overdue_call_is_woken_at_its_deadline(
    pair: tuple[socket.socket, socket.socket], watchdog: CallWatchdog
) -> None:
    left, _ = pair
    started = time.monotonic()
    with watchdog.watch(left.fileno(), started + 0.3) as watch:
        thread, received = blocked_recv(left)
        thread.join(5)
        assert not thread.is_alive(), "the blocked recv was not woken"
    elapsed = time.monotonic() - started
    assert received == [b""]  # the socket was shut down: end of stream
    assert watch.fired
    assert 0.3 <= elapsed < 1.5


def test_a_call_that_ends_in_time_is_left_alone(
    pair: tuple[socket.socket, socket.socket], watchdog: CallWatchdog
) -> None:
    left, right = pair
    with watchdog.watch(left.fileno(), time.monotonic() + 0.2) as watch:
        pass
    time.sleep(0.4)
    assert not watch.fired
    right.sendall(b"x")
    assert left.recv(10) == b"x"  # still open, both ways


def test_an_earlier_deadline_than_planned_wakes_the_watchdog(
    pair: tuple[socket.socket, socket.socket], watchdog: CallWatchdog
) -> None:
    left, right = pair
    with watchdog.watch(right.fileno(), time.monotonic() + 4.0):
        time.sleep(0.1)  # the thread has started and looked: it sleeps until that deadline
        # A call whose budget was mostly spent waiting
        # for a connection arrives with a deadline just ahead.
        started = time.monotonic()
        with watchdog.watch(left.fileno(), started + 0.2):
            thread, _ = blocked_recv(left)
            thread.join(3)
            assert not thread.is_alive()
        assert time.monotonic() - started < 1.5


def test_watches_leave_no_descriptor_behind(
    pair: tuple[socket.socket, socket.socket], watchdog: CallWatchdog
) -> None:
    left, _ = pair
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        with watchdog.watch(left.fileno(), time.monotonic() + 60):
            pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_postgres_options_of_the_url_come_after_the_backends() -> None:
    url = make_url("postgresql+psycopg2://u@h/db?options=-cstatement_timeout%3D5&connect_timeout=3")
    args = PostgresDialect().engine_options(url, 1024, TIMEOUTS)["connect_args"]
    assert isinstance(args, dict)
    assert args["options"] == (
        "-c statement_timeout=60000 -c idle_in_transaction_session_timeout=60000 "
        "-cstatement_timeout=5"
    )
    assert "connect_timeout" not in args  # the URL's own wins
    assert args["keepalives_idle"] == 10


def test_no_server_side_timeouts_without_a_call_timeout() -> None:
    unbounded = Timeouts(connect=timedelta(seconds=10), call=None)
    pg = PostgresDialect().engine_options(make_url("postgresql://u@h/db"), 1024, unbounded)
    assert "options" not in pg["connect_args"]  # type: ignore[operator]
    assert "pool_timeout" not in pg
    mysql = MySqlDialect().engine_options(make_url("mysql+pymysql://u@h/db"), 1024, unbounded)
    assert "init_command" not in mysql["connect_args"]  # type: ignore[operator]


def test_pymysql_gets_read_write_and_server_timeouts() -> None:
    args = MySqlDialect().engine_options(make_url("mysql+pymysql://u@h/db"), 1024, TIMEOUTS)[
        "connect_args"
    ]
    assert isinstance(args, dict)
    assert args["connect_timeout"] == args["read_timeout"] == 10.0  # the handshake
    assert args["write_timeout"] == 60.0
    assert "/*M!, SESSION max_statement_time = 60.000" in str(args["init_command"])
