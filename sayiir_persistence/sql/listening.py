"""PostgreSQL ``LISTEN``: wake idle workers of every process when work is announced.

Writers that make a task runnable without claiming it send ``NOTIFY sayiir_work`` in their
transaction (``PostgresDialect.announce_work``); PostgreSQL delivers it at commit, once per
transaction, to every connection listening on the channel, in this process and others.

:class:`PostgresWorkWaiter` holds one connection of its own (outside the pool, in
autocommit) listening on the channel. A connection that fails is dropped and opened again at
a later wait; meanwhile the waiter only sleeps, and workers fall back on polling.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import Engine

__all__ = ["CHANNEL", "PostgresWorkWaiter", "listens"]

logger = logging.getLogger(__name__)

CHANNEL = "sayiir_work"
_LISTEN = "LISTEN sayiir_work"  # the channel above, as a constant statement
# After a failed connection, how long before the next attempt.
_RECONNECT_SECONDS = 1.0


def listens(engine: Engine) -> bool:
    """Whether :class:`PostgresWorkWaiter` can listen with this engine's driver."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver in ("psycopg2", "psycopg")


class PostgresWorkWaiter:
    """A :class:`~sayiir_persistence.wakeups.WorkWaiter` on ``LISTEN sayiir_work``.

    Not thread-safe: one per waiting thread.

    Args:
        engine: whose pool lends the connection (detached from it for good).
        bounded: wraps the ``LISTEN`` call on a new connection (given the DBAPI connection),
            e.g. to bound how long it may wait for the server. Waits for notifications
            have their own timeout.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        bounded: Callable[[Any], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self._engine = engine
        self._bounded = bounded or (lambda _connection: nullcontext())
        self._driver = engine.dialect.driver
        self._connection: Any = None
        self._retry_at = 0.0

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        connection = self._connected()
        if connection is None:
            time.sleep(max(0.0, min(timeout, self._retry_at - time.monotonic())))
            return False
        try:
            if self._driver == "psycopg2":
                return self._wait_psycopg2(connection, timeout)
            return self._wait_psycopg(connection, deadline)
        except Exception as error:  # the driver's own errors: drop the connection, poll
            logger.info("listening for work stopped (%s); polling until it reconnects", error)
            self._drop()
            return False

    def close(self) -> None:
        self._drop()

    def _connected(self) -> Any:
        if self._connection is not None:
            return self._connection
        if time.monotonic() < self._retry_at:
            return None
        try:
            pooled = self._engine.raw_connection()
            pooled.detach()  # ours for good: not returned to the pool, closed by us
            connection: Any = pooled.dbapi_connection
            connection.autocommit = True
            with self._bounded(connection):
                cursor = connection.cursor()
                cursor.execute(_LISTEN)
                cursor.close()
        except Exception as error:
            logger.info("cannot listen for work (%s); polling meanwhile", error)
            self._retry_at = time.monotonic() + _RECONNECT_SECONDS
            return None
        self._connection = connection
        return connection

    @staticmethod
    def _wait_psycopg2(connection: Any, timeout: float) -> bool:
        connection.poll()
        if not connection.notifies:
            readable, _, _ = select.select([connection], [], [], timeout)
            if readable:
                connection.poll()
        woken = bool(connection.notifies)
        connection.notifies.clear()
        return woken

    @staticmethod
    def _wait_psycopg(connection: Any, deadline: float) -> bool:
        remaining = max(0.0, deadline - time.monotonic())
        return any(True for _ in connection.notifies(timeout=remaining, stop_after=1))

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._retry_at = time.monotonic() + _RECONNECT_SECONDS
        if connection is not None:
            try:
                connection.close()
            except Exception:
                logger.debug("closing the listening connection failed", exc_info=True)
