"""A bound on each call in flight, for drivers that have no read timeout of their own.

libpq (psycopg2, psycopg 3) waits for an answer for ever: TCP keepalives and
``tcp_user_timeout`` end a connection whose peer stopped acknowledging, but not one whose
packets are still acknowledged by something in between (a proxy, a load balancer, a NAT
that lost its state while its host lives) and whose server never answers. A
:class:`CallWatchdog` ends such a call: each call arms a :class:`Watch` on its connection's
socket with a deadline; when a deadline passes before the call disarmed its watch, the
watchdog shuts the socket down (``shutdown(SHUT_RDWR)``), which wakes the driver blocked in
``recv``/``send``: it raises, the backend translates that into ``BackendUnavailableError``,
and SQLAlchemy invalidates the connection.

Cost per call: one ``os.dup`` and one ``os.close`` (so the watchdog never shuts down a socket
number that the driver closed and the system reused meanwhile), two lock round trips and a
set insertion and removal; no thread per call, no wake-up of the watchdog thread (it sleeps
until the earliest deadline it knows; a later call's deadline is never earlier, except after
a wait for the pool, which then wakes it). One thread per watchdog, started at the first
call, and ended after a whole timeout with nothing in flight.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from types import TracebackType

__all__ = ["CallWatchdog", "Watch"]

logger = logging.getLogger(__name__)

# Every watchdog of the process, so that a forked child starts with fresh ones.
_WATCHDOGS: weakref.WeakSet[CallWatchdog] = weakref.WeakSet()


class Watch:
    """One call's deadline on one socket; a context manager that disarms on exit."""

    __slots__ = ("_fd", "_watchdog", "deadline", "fired")

    def __init__(self, watchdog: CallWatchdog, fd: int, deadline: float) -> None:
        self._watchdog = watchdog
        self._fd = fd
        self.deadline = deadline
        self.fired = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._watchdog._disarm(self)

    def _shut_down(self) -> None:
        """Wake whoever is blocked on the socket (called with the watchdog's lock held, so
        the duplicate descriptor is still open)."""
        self.fired = True
        sock = socket.socket(fileno=self._fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as error:  # already closed by the peer: the call fails anyway
            logger.debug("shutting down an overdue connection: %s", error)
        finally:
            sock.detach()  # the descriptor is the watch's, closed at disarm

    def _close(self) -> None:
        os.close(self._fd)


class CallWatchdog:
    """Shuts down the socket of any call still in flight at its deadline.

    Args:
        timeout: the usual length of a call's budget; the thread sleeps at most this long,
            and exits after that long with nothing in flight.
        name: for the thread's name.
    """

    def __init__(self, timeout: float, name: str) -> None:
        self._timeout = timeout
        self._name = name
        self._reset()
        _WATCHDOGS.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._next_wake = float("inf")
        self._closed = False

    def watch(self, fd: int, deadline: float) -> Watch:
        """Arm a watch on the socket ``fd`` (duplicated: the caller keeps its own) until
        ``deadline`` (``time.monotonic()``); disarm it by leaving the returned context."""
        watch = Watch(self, os.dup(fd), deadline)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None and not self._closed:
                self._start()
            elif deadline < self._next_wake:
                self._wake.set()  # earlier than the thread's planned wake-up
        return watch

    def close(self) -> None:
        """Stop the thread (calls in flight are no longer bounded)."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _disarm(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)
        watch._close()

    def _start(self) -> None:
        self._next_wake = time.monotonic() + self._timeout
        self._thread = threading.Thread(
            target=self._run, name=f"sayiir-call-watchdog {self._name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                now = time.monotonic()
                if self._closed or (not self._watches and now - idle_since >= self._timeout):
                    self._thread = None
                    return
                if self._watches:
                    idle_since = now
                self._next_wake = self._fire_overdue(now)
                self._wake.clear()
            self._wake.wait(max(0.0, self._next_wake - now))

    def _fire_overdue(self, now: float) -> float:
        """Shut down the overdue calls' sockets; when to look again."""
        next_wake = now + self._timeout
        for watch in list(self._watches):
            if watch.deadline <= now:
                self._watches.discard(watch)
                logger.warning(
                    "a call to %s got no answer in time: closing its connection", self._name
                )
                watch._shut_down()
            else:
                next_wake = min(next_wake, watch.deadline)
        return next_wake


def _after_fork_in_child() -> None:
    # The parent's thread does not exist in the child, and its lock may be held.
    for watchdog in list(_WATCHDOGS):
        for watch in watchdog._watches:
            watch._close()
        watchdog._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
