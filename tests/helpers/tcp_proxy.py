"""A loopback TCP proxy that breaks database connections on demand (fault-injection tests).

Put it between a ``SqlBackend`` and its server (:meth:`TcpProxy.proxied_url`) and it forwards
bytes both ways until told otherwise:

- :meth:`TcpProxy.cut`: abort every open connection at once, both sides, with a TCP reset
  (``SO_LINGER`` 0): the client sees its connection die in the middle of whatever it was
  doing, the server sees its session vanish and rolls back what was not committed;
- :meth:`TcpProxy.refuse` / :meth:`TcpProxy.accept`: close the listening socket (new connections
  are refused, as by a server that is down) and open it again on the same port;
- :meth:`TcpProxy.cut_when`: a one-shot hook on the client-to-server stream that cuts at a
  precise point: just before a chunk matching a trigger is forwarded (the statement never
  reaches the server), or once the server answered it with the answer thrown away
  (``deliver=True``: the server ran it, e.g. committed, but the client never learns);
- :meth:`TcpProxy.cut_after`: cut once a number of further client-to-server bytes went
  through, e.g. in the middle of a large payload being streamed to the server;
- :meth:`TcpProxy.blackhole` / :meth:`TcpProxy.restore`: a silent network. Connections, open
  and new, stay up and are still accepted, but nothing is forwarded either way, and nothing
  is reset or closed: what each side sends waits in the proxy's socket buffers (the proxy's
  kernel acknowledges it, as a middlebox would, so TCP keepalives and ``TCP_USER_TIMEOUT``
  do not fire). A client that does not bound its own waits hangs. :meth:`restore` forwards
  again, as a network that heals: what waited is delivered (a client that gave up meanwhile
  has closed its side, and that connection then ends).

Each proxied connection has two pumping threads (one per direction) that poll their socket with
a short timeout, so a cut takes effect within a few milliseconds; a hook-triggered cut happens
in the pumping thread itself, before anything else of that connection is forwarded. Triggers see
one ``recv`` chunk at a time: small messages (such as ``COMMIT``) arrive whole, since database
clients wait for the answer to one message before sending the next.

The proxy listens on a port below the kernel's ephemeral range, so that no outgoing connection
can take the port while it is refusing and :meth:`accept` can bind it again.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy.engine import make_url

Trigger = Callable[[bytes], bool]
"""Decides from one client-to-server chunk whether an armed cut fires."""

_POLL_SECONDS = 0.005
_CHUNK = 256 * 1024
_CONNECT_TIMEOUT_SECONDS = 5.0
_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def matches(pattern: bytes) -> Trigger:
    """A trigger firing on chunks that contain ``pattern``."""
    return lambda chunk: pattern in chunk


@dataclass
class _Rule:
    """An armed one-shot cut (see :meth:`TcpProxy.cut_when` and :meth:`TcpProxy.cut_after`)."""

    trigger: Trigger | None
    budget: int | None
    deliver: bool
    fired: threading.Event = field(default_factory=threading.Event)


class _Link:
    """One proxied connection: a client socket, a server socket and their two pumps."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.dead = threading.Event()  # the pumps stop
        self.closed = threading.Event()  # both sockets are closed
        self.abort = False  # close with a reset (a cut) rather than a clean close
        self.cut_on_reply: _Rule | None = None
        self._lock = threading.Lock()
        self._pumps_left = 2
        for sock in (client, server):
            sock.settimeout(_POLL_SECONDS)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.threads = [
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True),
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def kill(self) -> None:
        """Ask the pumps to stop and close both sockets with a reset."""
        self.abort = True
        self.dead.set()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while not self.dead.is_set():
                if self.proxy.silent.is_set():
                    self.dead.wait(_POLL_SECONDS)  # read nothing: it waits in the buffers
                    continue
                try:
                    data = source.recv(_CHUNK)
                except TimeoutError:
                    continue
                except OSError:
                    break
                # Read just as the network went silent: held (an end of stream too) until
                # it is restored.
                while self.proxy.silent.is_set() and not self.dead.is_set():
                    self.dead.wait(_POLL_SECONDS)
                if not data:
                    break
                if upstream:
                    data, cut = self.proxy._inspect_upstream(self, data)
                else:
                    data, cut = self.proxy._inspect_downstream(self, data)
                if data and not self._send(sink, data):
                    break
                if cut:
                    self.proxy._cut_all(wait=False)
                    break
        finally:
            self._pump_done()

    def _send(self, sink: socket.socket, data: bytes) -> bool:
        """Send all of ``data`` unless the link dies meanwhile; whether it was all sent."""
        view = memoryview(data)
        while view:
            if self.dead.is_set():
                return False
            try:
                sent = sink.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return True

    def _pump_done(self) -> None:
        # Only the last pump out closes the sockets: closing a socket that the other pump is
        # still polling could hand its file descriptor number to somebody else.
        self.dead.set()
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if not last:
            return
        for sock in (self.client, self.server):
            if self.abort:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
            sock.close()
        self.proxy._forget(self)
        self.closed.set()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``; break it on demand.

    Use as a context manager (or call :meth:`close`): every socket and thread is gone after.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = _free_port_below_ephemeral_range(self.host)
        self.connections_accepted = 0
        self._lock = threading.Condition()
        self._links: set[_Link] = set()
        self._rule: _Rule | None = None
        self.silent = threading.Event()  # blackhole(): forward nothing, keep every connection
        self._want_listening = True
        self._listening = False
        self._stopping = threading.Event()
        self._listener: socket.socket | None = self._listen()
        self._listening = True
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        """A proxy in front of the server that ``url`` (a SQLAlchemy URL) names."""
        parsed = make_url(url)
        default_port = 5432 if parsed.get_backend_name() == "postgresql" else 3306
        return cls(parsed.host or "127.0.0.1", parsed.port or default_port)

    def proxied_url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parsed = make_url(url).set(host=self.host, port=self.port)
        return parsed.render_as_string(hide_password=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening, cut every connection and wait for every thread."""
        self._stopping.set()
        self._acceptor.join()
        self._cut_all(wait=True)

    # -- faults -------------------------------------------------------------------------------

    def cut(self) -> int:
        """Abort every open connection now (reset both sides); how many there were."""
        return self._cut_all(wait=True)

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused until :meth:`accept`."""
        self._set_listening(False)

    def accept(self) -> None:
        """Listen again (on the same port) after :meth:`refuse`."""
        self._set_listening(True)

    def blackhole(self) -> None:
        """Forward nothing either way from now on, without closing or resetting anything;
        new connections are still accepted (and get no answer)."""
        self.silent.set()

    def restore(self) -> None:
        """Forward again after :meth:`blackhole`."""
        self.silent.clear()

    def cut_when(self, trigger: Trigger | bytes, *, deliver: bool = False) -> threading.Event:
        """Arm a one-shot cut on the next client-to-server chunk matching ``trigger``.

        ``deliver=False``: cut before forwarding the chunk (the server never sees it).
        ``deliver=True``: forward it, then cut as soon as the server's answer arrives, which is
        dropped (the server executed it; the client does not know).
        Returns an event set when the cut fired. Replaces any armed rule.
        """
        if isinstance(trigger, bytes):
            trigger = matches(trigger)
        return self._arm(_Rule(trigger, None, deliver))

    def cut_after(self, budget: int) -> threading.Event:
        """Arm a one-shot cut once ``budget`` more bytes went from clients to the server (the
        chunk crossing the budget is forwarded up to it, the rest dropped)."""
        return self._arm(_Rule(None, budget, False))

    def disarm(self) -> None:
        """Drop the armed rule, if any (one that is waiting for a server answer included)."""
        with self._lock:
            self._rule = None
            for link in self._links:
                link.cut_on_reply = None

    # -- internals ------------------------------------------------------------------------------

    def _arm(self, rule: _Rule) -> threading.Event:
        with self._lock:
            self._rule = rule
        return rule.fired

    def _inspect_upstream(self, link: _Link, data: bytes) -> tuple[bytes, bool]:
        """What to forward of a client chunk, and whether to cut after forwarding it."""
        with self._lock:
            rule = self._rule
            if rule is None:
                return data, False
            if rule.budget is not None:
                if len(data) < rule.budget:
                    rule.budget -= len(data)
                    return data, False
                self._rule = None
                rule.fired.set()
                return data[: rule.budget], True
            assert rule.trigger is not None
            if not rule.trigger(data):
                return data, False
            self._rule = None
            if rule.deliver:
                link.cut_on_reply = rule
                return data, False
            rule.fired.set()
            return b"", True

    def _inspect_downstream(self, link: _Link, data: bytes) -> tuple[bytes, bool]:
        with self._lock:
            rule, link.cut_on_reply = link.cut_on_reply, None
        if rule is None:
            return data, False
        rule.fired.set()
        return b"", True

    def _cut_all(self, *, wait: bool) -> int:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.kill()
        if wait:
            for link in links:
                link.closed.wait()
                for thread in link.threads:
                    if thread is not threading.current_thread():
                        thread.join()
        return len(links)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _set_listening(self, listening: bool) -> None:
        with self._lock:
            self._want_listening = listening
            if not self._lock.wait_for(lambda: self._listening == listening, timeout=10):
                raise RuntimeError(f"the proxy on port {self.port} could not change state")

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
            listener.settimeout(_POLL_SECONDS * 4)
        except OSError:
            listener.close()
            raise
        return listener

    def _accept_loop(self) -> None:
        # The only thread that touches the listening socket (see _Link._pump_done for why).
        try:
            while not self._stopping.is_set():
                with self._lock:
                    want = self._want_listening
                if want != (self._listener is not None):
                    self._switch_listener(want)
                if self._listener is None:
                    self._stopping.wait(_POLL_SECONDS)
                    continue
                try:
                    client, _ = self._listener.accept()
                except (TimeoutError, OSError):
                    continue
                self._open_link(client)
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def _switch_listener(self, listening: bool) -> None:
        if listening:
            try:
                self._listener = self._listen()
            except OSError:
                return  # the port is not free again yet: try at the next turn
        else:
            assert self._listener is not None
            # Connections still waiting in the backlog are reset, as by a dead server.
            self._listener.close()
            self._listener = None
        with self._lock:
            self._listening = listening
            self._lock.notify_all()

    def _open_link(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT_SECONDS)
        except OSError:
            # The server is down: the client sees its connection reset at once.
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
            client.close()
            return
        link = _Link(self, client, server)
        with self._lock:
            self._links.add(link)
            self.connections_accepted += 1
        link.start()


def _free_port_below_ephemeral_range(host: str) -> int:
    """A free port that the kernel never hands out to outgoing connections."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} on {host}")
