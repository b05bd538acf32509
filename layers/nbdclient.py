"""A blocking, thread-safe NBD client with reconnection, for the NBD layer.

The wire protocol is :mod:`lbd.nbdclient_proto` (sans I/O); this module adds
the sockets and threads.  Callers are worker threads of the frontends: many
at once, each blocking in :meth:`RemoteClient.call` until its replies are in.

- One connection at a time (``_Conn``), with a reader thread that matches
  replies to requests by handle and wakes their callers; read payloads go
  from the socket straight into the caller's buffer.  Any number of requests
  are in flight; requests larger than the server's maximum block size are
  split by the caller (:class:`~lbd.layers.nbdremote.NBDLayer`).
- A supervisor thread reconnects with backoff (0.05 s doubling to 2 s)
  whenever the connection is lost, and checks that the export is still the
  same size (and still writable when we write).
- Every call has a deadline (``timeout`` seconds).  A request whose
  connection is lost before its reply is sent again on the next connection
  (NBD requests are idempotent; an unanswered write may or may not have
  landed, and writing it again is what the client asked for anyway); when
  no reply comes before the deadline the call fails with EIO, and a
  connection that stays silent that long is dropped and remade.

Resource handling: :meth:`RemoteClient.close` disconnects (NBD_CMD_DISC) and
joins both threads.  Error handling: server error replies become
:class:`~lbd.errors.IOFailure` with the matching errno; anything wrong with
the connection is logged once and retried until the deadline.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from lbd import nbdclient_proto as C
from lbd import protocol as P
from lbd.errors import ConfigError, IOFailure

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
CONNECT_TIMEOUT = 10.0
RECV_BUFFER = 256 * 1024

_NBD_TO_ERRNO = {P.EPERM: errno.EPERM, P.EIO: errno.EIO, P.ENOMEM: errno.ENOMEM,
                 P.EINVAL: errno.EINVAL, P.ENOSPC: errno.ENOSPC, P.EOVERFLOW: errno.EOVERFLOW,
                 P.ENOTSUP: errno.ENOTSUP, P.ESHUTDOWN: errno.ESHUTDOWN}


# -- where the remote is ------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A remote export: TCP host and port, or a Unix socket; and an export name."""

    text: str  # as the user wrote it
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    export: str = ""

    def __str__(self) -> str:
        return self.text

    @property
    def uri(self) -> str:
        name = urllib.parse.quote(self.export)
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


def parse_target(text: str, what: str = "-n") -> Target:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``nbd://HOST[:PORT][/EXPORT]`` or
    ``nbd+unix:///[EXPORT]?socket=PATH``."""
    t = text.strip()
    low = t.lower()
    if low.startswith(("nbds://", "nbds+unix://")):
        raise ConfigError(f"{what} {text}: TLS (nbds) is not supported; use nbd:// or "
                          "nbd+unix://")
    if low.startswith("nbd+unix://"):
        u = urllib.parse.urlsplit(t)
        if u.netloc:
            raise ConfigError(f"{what} {text}: an nbd+unix URI has no host "
                              "(nbd+unix:///EXPORT?socket=PATH)")
        query = urllib.parse.parse_qs(u.query)
        sock = query.get("socket", [""])[0]
        if not sock:
            raise ConfigError(f"{what} {text}: the URI needs ?socket=PATH")
        return Target(text, socket_path=sock, export=urllib.parse.unquote(u.path[1:]))
    if low.startswith("nbd://"):
        u = urllib.parse.urlsplit(t)
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"{what} {text}: bad port in the URI") from None
        if not u.hostname:
            raise ConfigError(f"{what} {text}: the URI has no host (nbd://HOST:PORT/EXPORT)")
        return Target(text, host=u.hostname, port=port,
                      export=urllib.parse.unquote(u.path[1:]))
    if "://" in t:
        raise ConfigError(f"{what} {text}: unknown URI scheme; use nbd:// or nbd+unix://")
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or t[end + 1:end + 2] != ":":
            raise ConfigError(f"{what} {text}: not [IPv6]:PORT")
        host, port_s = t[1:end], t[end + 2:]
    elif ":" in t:
        host, port_s = t.rsplit(":", 1)
        if ":" in host:
            raise ConfigError(f"{what} {text}: write an IPv6 address as [ADDRESS]:PORT")
    else:
        raise ConfigError(f"{what} {text}: not HOST:PORT (or an nbd:// URI)")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{what} {text}: {port_s!r} is not a port number") from None
    if not 0 < port <= 65535 or not host:
        raise ConfigError(f"{what} {text}: not HOST:PORT with a port in 1..65535")
    return Target(text, host=host, port=port)


# -- requests and connections ------------------------------------------------------------

_PENDING, _DONE, _LOST = 0, 1, 2


class Request:
    """One NBD request: for READ, ``view`` receives the data; for WRITE, ``payload``."""

    __slots__ = ("cmd", "descs", "error", "flags", "length", "lock", "message", "offset",
                 "payload", "state", "view")

    def __init__(self, cmd: int, offset: int, length: int, flags: int = 0,
                 view: memoryview | None = None,
                 payload: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        self.cmd, self.offset, self.length, self.flags = cmd, offset, length, flags
        self.view = view
        self.payload = payload
        self.descs: list[tuple[int, int]] = []  # block status (base:allocation) replies
        self.error = 0
        self.message = ""
        self.state = _PENDING
        self.lock = threading.Lock()

    def arm(self) -> None:
        self.state = _PENDING
        self.error = 0
        self.message = ""
        self.descs = []
        self.lock = threading.Lock()
        self.lock.acquire()


class _Lost(Exception):
    """The connection died before the request could be sent."""


class _Conn:
    """One negotiated connection and its reader thread."""

    def __init__(self, client: RemoteClient, sock: socket.socket, export: C.RemoteExport,
                 leftover: bytes, number: int) -> None:
        self.client = client
        self.sock = sock
        self.export = export
        self.number = number
        self.t = C.ClientTransmission(export.structured)
        self.t.receive_data(leftover)
        self.lock = threading.Lock()  # the parser's request table, inflight, dead
        self.send_lock = threading.Lock()
        self.inflight: dict[int, Request] = {}
        self.dead = False
        self.reason = ""
        self.alloc_id = export.allocation_context
        self.thread = threading.Thread(target=self._reader, daemon=True,
                                       name=f"nbd-reader {client.target} #{number}")
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.lock:
            if self.dead:
                raise _Lost
            handle = next(self.client.handles)
            header = self.t.request(req.cmd, handle, req.offset, req.length, req.flags)
            self.inflight[handle] = req
        with self.send_lock:
            try:
                self._send([header, *req.payload])
            except OSError as exc:
                # the reader sees the shutdown, and hands every request in flight back
                self.kill(f"sending failed: {exc}")

    def _send(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        sock = self.sock
        while bufs:
            sent = sock.sendmsg(bufs[:1024])
            while sent:
                n = len(bufs[0])
                if sent >= n:
                    sent -= n
                    bufs.pop(0)
                else:
                    bufs[0] = memoryview(bufs[0])[sent:]
                    sent = 0

    def kill(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def disconnect(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close; the reader thread ends."""
        try:
            with self.lock:
                header = self.t.request(P.CMD_DISC, 0, 0, 0)
            with self.send_lock:
                self._send([header])
        except OSError:
            pass
        self.kill("disconnected")
        self.thread.join(30)
        self.sock.close()

    def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self.sock.recv_into(view)
            except TimeoutError:
                continue  # an idle connection is fine; callers time out on their own
            if n == 0:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            return n

    def _reader(self) -> None:
        buf = bytearray(RECV_BUFFER)
        mv = memoryview(buf)
        t = self.t
        lock = self.lock
        inflight = self.inflight
        ReplyData, ReplyDone = C.ReplyData, C.ReplyDone
        reason = ""
        try:
            while True:
                while True:
                    with lock:
                        ev = t.next_event()
                    if ev is None:
                        break
                    typ = type(ev)
                    if typ is ReplyData:
                        req = inflight[ev.handle]
                        assert req.view is not None
                        start = ev.offset - req.offset
                        dest = req.view[start:start + ev.length]
                        pos = t.take(dest)
                        while pos < ev.length:
                            n = self._recv_into(dest[pos:])
                            t.skip_payload(n)
                            pos += n
                    elif typ is ReplyDone:
                        with lock:
                            req = inflight.pop(ev.handle)
                        req.error = ev.error
                        req.state = _DONE
                        req.lock.release()
                    elif isinstance(ev, C.ReplyHole):
                        req = inflight[ev.handle]
                        assert req.view is not None
                        start = ev.offset - req.offset
                        req.view[start:start + ev.length] = bytes(ev.length)
                    elif isinstance(ev, C.ReplyBlockStatus):
                        if ev.context_id == self.alloc_id:
                            inflight[ev.handle].descs += ev.descriptors
                    elif isinstance(ev, C.ReplyError):
                        req = inflight[ev.handle]
                        req.message = req.message or ev.message
                n = self._recv_into(mv)
                t.receive_data(mv[:n])
        except C.RemoteProtocolError as exc:
            reason = f"protocol error from the server: {exc}"
        except OSError as exc:
            reason = exc.strerror or str(exc)
        except Exception as exc:  # a bug: log it, but never leave callers hanging
            log.exception("nbd remote %s: reader failed", self.client.target)
            reason = f"internal error: {exc}"
        finally:
            with lock:
                self.dead = True
                lost = list(inflight.values())
                inflight.clear()
            for req in lost:
                req.state = _LOST
                req.lock.release()
            self.client._lost(self, self.reason or reason)


# -- the client ----------------------------------------------------------------------------


class RemoteClient:
    """A remote export, kept connected; :meth:`call` runs requests on it."""

    def __init__(self, target: Target, *, timeout: float = 30.0, writable: bool = False,
                 what: str = "-n") -> None:
        self.target = target
        self.timeout = timeout
        self.writable = writable
        self.what = what
        self.handles = itertools.count(1)
        self.export: C.RemoteExport | None = None
        self.connects = 0
        self.reconnects = 0
        self.last_error = ""
        self._conn: _Conn | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._supervisor: threading.Thread | None = None

    # -- connecting ------------------------------------------------------------------

    def open(self) -> C.RemoteExport:
        """Connect for the first time; a :class:`ConfigError` says why not."""
        try:
            conn = self._connect()
        except (OSError, C.HandshakeError, C.RemoteProtocolError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{self.what} {self.target}: cannot connect to the NBD server: "
                              f"{why}") from None
        self.export = conn.export
        self._install(conn)
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name=f"nbd-reconnect {self.target}")
        self._supervisor.start()
        return conn.export

    def _connect(self) -> _Conn:
        tgt = self.target
        if tgt.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(tgt.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((tgt.host, tgt.port), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hs = C.ClientHandshake(tgt.export)
            while hs.state == C.NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    raise C.HandshakeError(hs.eof_message())
                hs.receive_data(data)
                out = hs.step()
                if out:
                    sock.sendall(out)
            export = hs.negotiated
            assert export is not None
            if self.export is not None:
                self._check_same(export)
            sock.settimeout(max(self.timeout, 1.0))  # sends never block forever
            self.connects += 1
            return _Conn(self, sock, export, hs.leftover, self.connects)
        except BaseException:
            sock.close()
            raise

    def _check_same(self, export: C.RemoteExport) -> None:
        assert self.export is not None
        if export.size != self.export.size:
            raise C.HandshakeError(f"the export is now {export.size} bytes, not "
                                   f"{self.export.size}; not using it")
        if self.writable and export.readonly:
            raise C.HandshakeError("the export is now read-only; not using it")

    def _install(self, conn: _Conn) -> None:
        with self._cond:
            # a connection that died while it was being made is not installed:
            # its _lost() came too early to clear it
            self._conn = None if conn.dead else conn
            self._cond.notify_all()

    def _lost(self, conn: _Conn, reason: str) -> None:
        with self._cond:
            if self._conn is conn:
                self._conn = None
                self.last_error = reason
                if not self._closed:
                    log.warning("nbd remote %s: connection lost (%s); reconnecting",
                                self.target, reason)
                self._cond.notify_all()

    def _supervise(self) -> None:
        backoff = BACKOFF_FIRST
        failures = 0
        while True:
            with self._cond:
                while not self._closed and self._conn is not None:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                conn = self._connect()
            except (OSError, C.HandshakeError, C.RemoteProtocolError) as exc:
                failures += 1
                self.last_error = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                                   else str(exc))
                level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 \
                    else logging.DEBUG
                log.log(level, "nbd remote %s: reconnect attempt %d failed: %s", self.target,
                        failures, self.last_error)
                with self._cond:
                    if not self._closed:
                        self._cond.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            with self._cond:
                if self._closed:
                    conn.disconnect()
                    return
                self._install(conn)
                self.reconnects += 1
            log.warning("nbd remote %s: reconnected after %d failed attempt(s)", self.target,
                        failures)
            backoff = BACKOFF_FIRST
            failures = 0

    @property
    def connected(self) -> bool:
        c = self._conn
        return c is not None and not c.dead

    def _wait_conn(self, deadline: float) -> _Conn:
        with self._cond:
            while True:
                c = self._conn
                if c is not None and not c.dead:
                    return c
                if self._closed:
                    raise IOFailure(errno.EIO, f"nbd remote {self.target}: closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IOFailure(errno.EIO, f"nbd remote {self.target} is unreachable "
                                    f"({self.last_error or 'not connected'})")
                self._cond.wait(left)

    # -- requests ------------------------------------------------------------------------

    def call(self, reqs: list[Request], timeout: float | None = None) -> None:
        """Run ``reqs`` (all in flight at once) until each has a reply.

        Requests whose connection is lost are sent again on the next one.
        Raises :class:`IOFailure`: the first server error, or EIO when the
        deadline passes without replies.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        todo = reqs
        while todo:
            conn = self._wait_conn(deadline)
            sent: list[Request] = []
            for r in todo:
                r.arm()
                try:
                    conn.submit(r)
                except _Lost:
                    break
                sent.append(r)
            for r in sent:
                left = deadline - time.monotonic()
                if not (left > 0 and r.lock.acquire(timeout=left)):
                    conn.kill(f"no reply within {self.timeout:g} s")
                    raise IOFailure(errno.EIO, f"nbd remote {self.target}: no reply within "
                                    f"{self.timeout:g} s ({P.CMD_NAMES[r.cmd]} at {r.offset})")
            retry = [r for r in todo if r.state != _DONE or r.error == P.ESHUTDOWN]
            for r in todo:
                if r.state == _DONE and r.error and r.error != P.ESHUTDOWN:
                    code = _NBD_TO_ERRNO.get(r.error, errno.EIO)
                    raise IOFailure(code, f"nbd remote {self.target}: {P.CMD_NAMES[r.cmd]} "
                                    f"[{r.offset}, {r.offset + r.length}) failed: "
                                    f"{r.message or errno.errorcode.get(code, code)}")
            if retry and any(r.error == P.ESHUTDOWN for r in retry):
                # the server is going away: wait for the connection to drop
                conn.kill("the server is shutting down")
            todo = retry

    def close(self) -> None:
        with self._cond:
            self._closed = True
            conn = self._conn
            self._cond.notify_all()
        if conn is not None:
            conn.disconnect()
        if self._supervisor is not None:
            self._supervisor.join(30)
