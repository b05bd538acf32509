"""A blocking, thread-safe NBD client with reconnection, for the NBD layer.

The wire protocol is :mod:`lbd.nbdclient_proto` (sans I/O); this module adds
the sockets and threads.  Callers are worker threads of the frontends
(:meth:`RemoteClient.call`, blocking until the replies are in) and the event
loop (:meth:`RemoteClient.acall`, awaited; :meth:`RemoteClient.submit`, with
a callback: no task waits), each on connections of its own.

- One connection at a time (``_Conn``), with a reader thread that matches
  replies to requests by handle and wakes their callers; read payloads go
  from the socket straight into the caller's buffer.  Any number of requests
  are in flight; requests larger than the server's maximum block size are
  split by the caller (:class:`~lbd.layers.nbdremote.NBDLayer`).
- A supervisor thread reconnects with backoff (0.05 s doubling to 2 s)
  whenever the connection is lost, and checks that the export is still the
  same size (and still writable when we write).
- A remote that stops gracefully may wait for its clients to leave (nbdkit
  answers ESHUTDOWN and waits).  The first ESHUTDOWN closes every connection
  to it, and the supervisor probes its connection when it has been idle for
  ``keepalive`` seconds, so an idle LBD lets the remote go too (and notices
  one that stopped answering).
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
import os
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from lbd import nbdclient_proto as C
from lbd import protocol as P
from lbd.errors import ConfigError, IOFailure

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
CONNECT_TIMEOUT = 10.0
PROBE_TIMEOUT = 3.0  # a server that takes one connection (qemu-nbd's default) never answers
RECV_BUFFER = 64 * 1024  # replies are parsed from here; larger payloads go straight to callers
BIG_READ = 64 * 1024  # reads at least this large ...
HEADER_RECV = 4096  # ... make the event-loop reader receive this little at a time
STICKY = int(os.environ.get("LBD_NBD_STICKY", "32"))  # requests in flight before another conn

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

    __slots__ = ("cmd", "descs", "error", "event", "flags", "length", "lock", "message",
                 "offset", "payload", "pipe", "state", "view", "wake")

    def __init__(self, cmd: int, offset: int, length: int, flags: int = 0,
                 view: memoryview | None = None,
                 payload: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        self.cmd, self.offset, self.length, self.flags = cmd, offset, length, flags
        self.view = view
        self.pipe: PipeData | None = None  # a READ whose data goes into a pipe (no view)
        self.payload = payload
        self.descs: list[tuple[int, int]] = []  # block status (base:allocation) replies
        self.error = 0
        self.message = ""
        self.state = _PENDING
        self.lock: threading.Lock | None = None  # a thread waits on it (arm)
        self.event: trio.Event | None = None
        self.wake: Callable[[], object] = _nothing

    def arm(self) -> None:
        """Ready for (another) submission by a thread, which waits on ``lock``."""
        self.state = _PENDING
        self.error = 0
        self.message = ""
        self.descs = []
        self.lock = threading.Lock()
        self.lock.acquire()
        self.wake = self.lock.release

    def arm_async(self, token: trio.lowlevel.TrioToken) -> trio.Event:
        """Ready for submission from the event loop; the reader sets the returned event."""
        self.state = _PENDING
        self.error = 0
        self.message = ""
        self.descs = []
        ev = self.event = trio.Event()

        def wake() -> None:
            try:
                token.run_sync_soon(ev.set)
            except trio.RunFinishedError:  # nobody waits any more
                pass

        self.wake = wake
        return ev


def _nothing() -> None:
    pass


# -- read data kept in a pipe ----------------------------------------------------------------

SPLICE_MIN = 64 * 1024  # reads at least this large may be spliced (no copy through Python)
SPLICE_MAX = 512 * 1024  # ... and at most this large
MAX_PIPES = int(os.environ.get("LBD_NBD_PIPES", "128"))  # pipes made at most (2 fds each)
PIPE_BYTES = int(os.environ.get("LBD_NBD_PIPE_BYTES", "0"))  # tests: force this pipe size
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031


class _PipePool:
    """Empty pipes for :class:`PipeData`, kept for reuse; at most MAX_PIPES exist."""

    def __init__(self) -> None:
        self.free: dict[int, list[tuple[int, int]]] = {}  # by capacity
        self.made = 0
        self.broken = not hasattr(os, "splice")

    def get(self, length: int) -> tuple[int, int, int] | None:
        """``(read_fd, write_fd, capacity)`` of an empty pipe holding ``length`` bytes."""
        # twice the payload: a pipe holds a number of pieces, not of bytes
        cap = PIPE_BYTES or max(65536, 1 << (2 * length - 1).bit_length())
        free = self.free.get(cap)
        if free:
            r, w = free.pop()
            return r, w, cap
        if self.broken or self.made >= MAX_PIPES:
            return None
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, cap)
        except OSError as exc:  # over the user's pipe memory: copy instead
            os.close(r)
            os.close(w)
            log.debug("nbd remote: a %d-byte pipe was refused (%s); copying reads", cap, exc)
            return None
        self.made += 1
        return r, w, cap

    def put(self, r: int, w: int, cap: int) -> None:
        self.free.setdefault(cap, []).append((r, w))

    def discard(self, r: int, w: int) -> None:
        self.made -= 1
        os.close(r)
        os.close(w)


PIPES = _PipePool()


class PipeData:
    """The data of one READ, held in a pipe: spliced from the remote's socket into
    it, and from it into the client's socket, so the bytes never pass through
    Python.  If the data could not go into the pipe (it came in several
    chunks, or the pipe filled up), it is in ``buffer`` instead.

    A frontend sends it with :meth:`send_inline`; once sent (or dropped), the
    pipe goes back to the pool.
    """

    __slots__ = ("buffer", "cap", "filled", "length", "r", "w")

    def __init__(self, length: int, r: int, w: int, cap: int) -> None:
        self.length = length
        self.r, self.w, self.cap = r, w, cap
        self.filled = 0  # bytes in the pipe
        self.buffer: memoryview | None = None

    @classmethod
    def make(cls, length: int) -> PipeData | None:
        if not SPLICE_MIN <= length <= SPLICE_MAX:
            return None
        got = PIPES.get(length)
        return None if got is None else cls(length, *got)

    def __len__(self) -> int:
        return self.length

    def to_buffer(self) -> memoryview:
        """Switch to a buffer holding what the pipe holds so far; the pipe goes."""
        if self.buffer is None:
            buf = memoryview(bytearray(self.length))
            pos = 0
            while pos < self.filled:
                n = os.readv(self.r, [buf[pos:self.filled]])
                if n <= 0:
                    break
                pos += n
            self.buffer = buf
            self._release(empty=False)
        return self.buffer

    def _release(self, empty: bool) -> None:
        if self.r < 0:
            return
        r, w = self.r, self.w
        self.r = self.w = -1
        if empty:
            PIPES.put(r, w, self.cap)
        else:
            PIPES.discard(r, w)

    def __del__(self) -> None:
        if self.r >= 0:
            try:
                self._release(empty=False)
            except Exception:  # at interpreter exit
                pass

    async def send_inline(self, sock: socket.socket) -> None:
        """Send all of the data to ``sock`` (non-blocking; waits in the event loop)."""
        fd = sock.fileno()
        if self.buffer is not None:
            view = self.buffer
            while view:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
            return
        left = self.length
        assert self.filled == left
        try:
            while left:
                try:
                    n = os.splice(self.r, fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                if n == 0:
                    raise OSError(errno.EIO, "splice: the pipe ran dry")
                left -= n
        finally:
            self.filled = left
            self._release(empty=not left)

    def send_to(self, sock_fd: int) -> None:
        """Send all of the data to ``sock_fd`` from a worker thread."""
        import select

        if self.buffer is not None:
            view = self.buffer
            while view:
                try:
                    view = view[os.write(sock_fd, view):]
                except BlockingIOError:
                    select.select([], [sock_fd], [])
            return
        left = self.length
        try:
            while left:
                try:
                    n = os.splice(self.r, sock_fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    select.select([], [sock_fd], [])
                    continue
                if n == 0:
                    raise OSError(errno.EIO, "splice: the pipe ran dry")
                left -= n
        finally:
            self.filled = left
            self._release(empty=not left)


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
        self.sent = 0  # requests registered so far (the keepalive's idle test)
        self.let_go = False  # closed because the server is shutting down
        self.dead = False
        self.reason = ""
        self.alloc_id = export.allocation_context
        self.thread = threading.Thread(target=self._reader, daemon=True,
                                       name=f"nbd-reader {client.target} #{number}")
        self.thread.start()

    def _register(self, req: Request) -> bytes:
        with self.lock:
            if self.dead:
                raise _Lost
            handle = next(self.client.handles)
            header = self.t.request(req.cmd, handle, req.offset, req.length, req.flags)
            self.inflight[handle] = req
            self.sent += 1
        return header

    def submit(self, req: Request) -> None:
        """Send a request (blocking; from a worker thread)."""
        with self.send_lock:
            header = self._register(req)
            self._send_or_kill([header, *req.payload])

    def _send_or_kill(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        try:
            self._send(bufs)
        except OSError as exc:
            # the reader sees the shutdown, and hands every request in flight back
            self.kill(f"sending failed: {exc}")

    async def asubmit(self, req: Request) -> None:
        """Send a request from the event loop without blocking it.

        The send lock is taken only if free and the socket takes the bytes
        at once (a READ is 28 of them); anything else finishes in a thread.
        """
        if not self.send_lock.acquire(blocking=False):
            await trio.to_thread.run_sync(self.submit, req)
            return
        try:
            header = self._register(req)
            bufs = [header, *req.payload]
            total = sum(len(b) for b in bufs)
            try:
                sent = self.sock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.kill(f"sending failed: {exc}")
                return
            if sent < total:
                _trim(bufs, sent)
                await trio.to_thread.run_sync(self._send_or_kill, bufs)
        finally:
            self.send_lock.release()

    def _send(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        # the socket blocks, but SO_SNDTIMEO ends a send the server does not read
        sock = self.sock
        while bufs:
            _trim(bufs, sock.sendmsg(bufs[:1024]))

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

    def _recv_into(self, view: memoryview, flags: int = 0) -> int:
        n = self.sock.recv_into(view, 0, flags)  # blocks; kill() shuts the socket down
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
                            # the rest straight from the socket, in one wait if it can
                            n = self._recv_into(dest[pos:], socket.MSG_WAITALL)
                            t.skip_payload(n)
                            pos += n
                    elif typ is ReplyDone:
                        with lock:
                            req = inflight.pop(ev.handle)
                        req.error = ev.error
                        req.state = _DONE
                        req.wake()
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
                req.wake()
            self.client._lost(self, self.reason or reason)


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def _trim(bufs: list[bytes | bytearray | memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``bufs``."""
    i = 0
    n_bufs = len(bufs)
    while sent and i < n_bufs:
        n = len(bufs[i])
        if sent >= n:
            sent -= n
            i += 1
        else:
            bufs[i] = memoryview(bufs[i])[sent:]
            sent = 0
    del bufs[:i]


class _Call:
    """The requests of one :meth:`RemoteClient.acall` on the event loop's connection."""

    __slots__ = ("deadline", "event", "remaining")

    def __init__(self, n: int, deadline: float) -> None:
        self.remaining = n
        self.deadline = deadline  # trio time; the watchdog drops a connection past it
        self.event = trio.Event()

    def one_done(self) -> None:
        self.remaining -= 1
        if not self.remaining:
            self.event.set()


class _Batch:
    """The requests of one :meth:`RemoteClient.submit`: no task waits for them.

    When the last is answered (or lost with its connection), ``done`` is
    called from the event loop: ``done(None)``, or ``done(exc)`` with an
    :class:`IOFailure`.  Requests lost with their connection are sent again
    (by a system task, the rare path) until the deadline.
    """

    __slots__ = ("client", "conn", "deadline", "done", "remaining", "reqs")

    def __init__(self, client: RemoteClient, conn: _AsyncConn, reqs: list[Request],
                 done: Callable[[BaseException | None], object], deadline: float) -> None:
        self.client = client
        self.conn = conn
        self.reqs = reqs
        self.done = done
        self.deadline = deadline
        self.remaining = len(reqs)

    def one_done(self) -> None:
        self.remaining -= 1
        if self.remaining:
            return
        reqs = self.reqs
        if len(reqs) == 1:  # the common case, inline
            r = reqs[0]
            if r.state == _DONE and not r.error:
                _deliver(self.done, None)
                return
        try:
            retry = self.client._finished(self.conn, reqs)
        except IOFailure as exc:
            _deliver(self.done, exc)
            return
        if not retry:
            _deliver(self.done, None)
            return
        try:
            trio.lowlevel.spawn_system_task(self._retry, retry, name="nbd remote retry")
        except RuntimeError:  # the event loop is ending: nobody to send them again
            _deliver(self.done, IOFailure(errno.EIO, f"nbd remote {self.client.target}: "
                                          "the connection was lost at shutdown"))

    async def _retry(self, reqs: list[Request]) -> None:
        left = self.deadline - trio.current_time()
        try:
            if left <= 0:
                raise IOFailure(errno.EIO, f"nbd remote {self.client.target}: no reply "
                                f"within {self.client.timeout:g} s")
            await self.client.acall(reqs, left)
        except IOFailure as exc:
            _deliver(self.done, exc)
        except Exception as exc:  # a bug: never leave the caller waiting
            log.exception("nbd remote %s: retrying failed", self.client.target)
            _deliver(self.done, IOFailure(errno.EIO, f"internal error: {exc}"))
        else:
            _deliver(self.done, None)


def _deliver(done: Callable[[BaseException | None], object],
             exc: BaseException | None) -> None:
    """Call a completion callback; its failure must not take the connection down."""
    try:
        done(exc)
    except Exception:
        log.exception("nbd remote: a completion callback failed")


class _AsyncConn:
    """A connection used only from the event loop, with no thread.

    Its replies are read by a trio system task, which moves read payloads
    straight into their buffers and tells their owners (a waiting
    :meth:`RemoteClient.acall`, or the callback of a
    :meth:`RemoteClient.submit`); requests are queued by the callers and
    sent by a second system task, everything queued since it last ran in
    one ``sendmsg``.  Both start on first use.  Everything runs on the one
    trio loop: no locks.  Any failure drops the connection, and its requests
    are sent again on another; the client's watchdog drops a connection
    whose oldest request is past its deadline.
    """

    def __init__(self, client: RemoteClient, sock: socket.socket, export: C.RemoteExport,
                 leftover: bytes) -> None:
        sock.setblocking(False)
        self.client = client
        self.sock = sock
        self.export = export
        self.t = C.ClientTransmission(export.structured)
        self.t.receive_data(leftover)
        self.alloc_id = export.allocation_context
        self.inflight: dict[int, tuple[Request, _Call | _Batch]] = {}
        self.let_go = False  # closed because the server is shutting down
        self.dead = False
        self.reason = ""
        self.reader_running = False
        self.out: list[bytes | bytearray | memoryview] = []
        self.buf = bytearray(RECV_BUFFER)
        self.big_reads = 0  # reads in flight whose payload is worth receiving directly
        self._wlot = trio.lowlevel.ParkingLot()
        self._wparked = False
        # trio.current_time(); in one call once the tasks run (_start)
        self.now: Callable[[], float] = trio.current_time

    def kill(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.reason = reason
        self.client.aconn_losses += 1
        log.info("nbd remote %s: event-loop connection dropped: %s", self.client.target, reason)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which ends
        except OSError:
            pass
        self.out.clear()
        if self._wparked:
            self._wlot.unpark_all()
        lost = list(self.inflight.values())
        self.inflight.clear()
        self.t.fail_all()
        self.big_reads = 0
        for req, owner in lost:
            req.state = _LOST
            owner.one_done()

    def close(self) -> None:
        if not self.dead:
            try:
                self.sock.send(self.t.request(P.CMD_DISC, 0, 0, 0), socket.MSG_DONTWAIT)
            except OSError:
                pass
        self.dead = True
        if self._wparked:
            self._wlot.unpark_all()
        self.sock.close()

    def _start(self) -> None:
        self.reader_running = True
        self.now = trio.lowlevel.current_clock().current_time
        name = f"nbd {self.client.target}"
        trio.lowlevel.spawn_system_task(self._reader, name=f"{name} reader")
        trio.lowlevel.spawn_system_task(self._writer, name=f"{name} writer")
        self.client._watch()

    def queue(self, reqs: list[Request], owner: _Call | _Batch) -> None:
        """Queue ``reqs`` for the writer; ``owner.one_done()`` once for each reply."""
        if not self.reader_running:
            self._start()
        out = self.out
        handles = self.client.handles
        request = self.t.request
        inflight = self.inflight
        for r in reqs:
            if r.pipe is not None and (r.pipe.filled or r.state != _PENDING):
                r.view = r.pipe.to_buffer()  # sent again: into a buffer this time
                r.pipe = None
            r.state = _PENDING
            r.error = 0
            if r.message:
                r.message = ""
            if r.descs:
                r.descs = []
            h = next(handles)
            out.append(request(r.cmd, h, r.offset, r.length, r.flags))
            if r.payload:
                out += r.payload
            if r.length >= BIG_READ and r.cmd == P.CMD_READ:
                self.big_reads += 1
            inflight[h] = (r, owner)
        if self._wparked:
            self._wparked = False
            self._wlot.unpark()

    def queue1(self, r: Request, owner: _Call | _Batch) -> None:
        """:meth:`queue` of one request never sent before (the common case)."""
        if not self.reader_running:
            self._start()
        h = next(self.client.handles)
        self.out.append(self.t.request(r.cmd, h, r.offset, r.length, r.flags))
        if r.payload:
            self.out += r.payload
        elif r.length >= BIG_READ and r.cmd == P.CMD_READ:
            self.big_reads += 1
        self.inflight[h] = (r, owner)
        if self._wparked:
            self._wparked = False
            self._wlot.unpark()

    async def run(self, reqs: list[Request], deadline: float) -> None:
        """Send ``reqs`` and wait until each is answered or lost (trio time ``deadline``)."""
        if self.dead:
            raise _Lost
        call = _Call(len(reqs), deadline)
        self.queue(reqs, call)
        if call.remaining:
            with trio.move_on_at(deadline):
                await call.event.wait()
            if call.remaining:
                self._timed_out()

    def _timed_out(self) -> None:
        self.kill(f"no reply within {self.client.timeout:g} s")
        raise IOFailure(errno.EIO, f"nbd remote {self.client.target}: no reply within "
                        f"{self.client.timeout:g} s")

    async def _writer(self) -> None:
        """Send what is queued, all of it in one ``sendmsg`` when it can."""
        sock = self.sock
        lot = self._wlot
        try:
            while not self.dead:
                if not self.out:
                    self._wparked = True
                    await lot.park()
                    continue
                bufs, self.out = self.out, []
                while bufs:
                    try:
                        _trim(bufs, sock.sendmsg(bufs[:1024]))
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                    if self.dead:
                        return
        except (OSError, trio.ClosedResourceError) as exc:
            self.kill(f"sending failed: {exc}")
        except trio.Cancelled:
            self.kill("the event loop is ending")
            raise
        except Exception as exc:  # a bug: never crash the event loop, never hang callers
            log.exception("nbd remote %s: writer failed", self.client.target)
            self.kill(f"internal error: {exc}")
        finally:
            self._wparked = False

    async def _recv(self, view: memoryview) -> int:
        sock = self.sock
        while True:
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                if self.dead:
                    raise ConnectionAbortedError(errno.ECONNABORTED,
                                                 "connection dropped") from None
                continue
            if n == 0:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            return n

    async def _splice_in(self, req: Request, length: int) -> memoryview | None:
        """Move a READ's payload into its pipe; None when all of it is there.

        Returns the buffer to receive the rest into when the pipe cannot take
        it (the remote sent it in more pieces than the pipe has room for).
        """
        pipe = req.pipe
        assert pipe is not None and pipe.r >= 0
        t = self.t
        w = pipe.w
        if t.buffered:  # the start of the payload came with the header
            head = bytearray(min(t.buffered, length))
            t.take(head)
            try:
                pipe.filled = os.write(w, head)
            except BlockingIOError:
                pipe.filled = 0
            if pipe.filled < len(head):  # never short for a fresh pipe; but if it is
                dest = pipe.to_buffer()
                dest[pipe.filled:len(head)] = memoryview(head)[pipe.filled:]
                req.view = dest
                return dest[len(head):]
        sock = self.sock
        fd = sock.fileno()
        while pipe.filled < length:
            try:
                n = os.splice(fd, w, length - pipe.filled, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                if _readable(sock):  # the socket has data: the pipe is full
                    req.view = dest = pipe.to_buffer()
                    return dest[pipe.filled:]
                await trio.lowlevel.wait_readable(sock)
                if self.dead:
                    raise ConnectionAbortedError(errno.ECONNABORTED,
                                                 "connection dropped") from None
                continue
            if n == 0:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            t.skip_payload(n)
            pipe.filled += n
        return None

    async def _reader(self) -> None:
        """Receive and hand out every reply until the connection ends."""
        t = self.t
        inflight = self.inflight
        mv = memoryview(self.buf)
        ReplyData, ReplyDone = C.ReplyData, C.ReplyDone
        read_reply = t.read_reply
        try:
            while not self.dead:
                fast = read_reply()
                if fast is not None:  # all of a READ's data: no events
                    handle, length = fast
                    req, owner = inflight[handle]
                    dest = req.view
                    if dest is None:
                        dest = await self._splice_in(req, length)
                    if dest is not None:
                        pos = t.take(dest)
                        end = len(dest)
                        while pos < end:
                            n = await self._recv(dest[pos:])
                            t.skip_payload(n)
                            pos += n
                    del inflight[handle]
                    req.state = _DONE
                    if length >= BIG_READ:
                        self.big_reads -= 1
                    owner.one_done()
                    continue
                ev = t.next_event()
                if ev is None:
                    # While large reads are out, take little at a time: their
                    # payloads then go straight to their buffers, not via ours.
                    n = await self._recv(mv[:HEADER_RECV] if self.big_reads else mv)
                    t.receive_data(mv[:n])
                    continue
                typ = type(ev)
                if typ is ReplyData:
                    req = inflight[ev.handle][0]
                    if req.view is None and req.pipe is not None:
                        req.view = req.pipe.to_buffer()  # chunks: into the buffer
                    assert req.view is not None
                    start = ev.offset - req.offset
                    dest = req.view[start:start + ev.length]
                    pos = t.take(dest)
                    while pos < ev.length:
                        n = await self._recv(dest[pos:])
                        t.skip_payload(n)
                        pos += n
                elif typ is ReplyDone:
                    req, owner = inflight.pop(ev.handle)
                    req.error = ev.error
                    req.state = _DONE
                    if req.length >= BIG_READ and req.cmd == P.CMD_READ:
                        self.big_reads -= 1
                    owner.one_done()
                elif isinstance(ev, C.ReplyHole):
                    req = inflight[ev.handle][0]
                    if req.view is None and req.pipe is not None:
                        req.view = req.pipe.to_buffer()
                    assert req.view is not None
                    start = ev.offset - req.offset
                    req.view[start:start + ev.length] = bytes(ev.length)
                elif isinstance(ev, C.ReplyBlockStatus):
                    if ev.context_id == self.alloc_id:
                        inflight[ev.handle][0].descs += ev.descriptors
                elif isinstance(ev, C.ReplyError):
                    req = inflight[ev.handle][0]
                    req.message = req.message or ev.message
        except C.RemoteProtocolError as exc:
            self.kill(f"protocol error from the server: {exc}")
        except (OSError, trio.ClosedResourceError) as exc:
            self.kill(getattr(exc, "strerror", None) or str(exc))
        except trio.Cancelled:
            self.kill("the event loop is ending")
            raise
        except Exception as exc:  # a bug: never crash the event loop, never hang callers
            log.exception("nbd remote %s: reader failed", self.client.target)
            self.kill(f"internal error: {exc}")
        finally:
            self.reader_running = False


# -- the client ----------------------------------------------------------------------------


class RemoteClient:
    """A remote export, kept connected; :meth:`call` runs requests on it."""

    def __init__(self, target: Target, *, timeout: float = 30.0, writable: bool = False,
                 what: str = "-n", keepalive: float = 5.0) -> None:
        self.target = target
        self.timeout = timeout
        self.keepalive = keepalive
        self.writable = writable
        self.what = what
        self.handles = itertools.count(1)
        self.export: C.RemoteExport | None = None
        self.connects = 0
        self.reconnects = 0
        self.aconn_losses = 0  # event-loop connections dropped (their unflushed writes may be gone)
        self.last_error = ""
        self._conn: _Conn | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._supervisor: threading.Thread | None = None
        # the event loop's connections (reads), made at open; an empty list
        # when the server takes only one connection: reads then use threads
        self.aconns: list[_AsyncConn] = []
        self.async_slots = 0
        self._aconn_making: trio.Event | None = None
        self._remake_after = 0.0  # no background remake before this (monotonic time)
        self._watching = False  # the watchdog task runs
        self._last: _AsyncConn | None = None  # the connection _pick chose last

    # -- connecting ------------------------------------------------------------------

    def _open_async(self, n: int) -> None:
        """Make the event loop's connections; none if the server takes only one."""
        made: list[_AsyncConn] = []
        for _ in range(n):
            try:
                sock, export, leftover = self._handshake(PROBE_TIMEOUT)
            except (OSError, C.HandshakeError, C.RemoteProtocolError) as exc:
                log.info("nbd remote %s: a second connection failed (%s): reads use worker "
                         "threads", self.target, exc)
                for c in made:
                    c.close()
                return
            made.append(_AsyncConn(self, sock, export, leftover))
        self.aconns = made
        self.async_slots = n

    def open(self, async_connections: int = 0) -> C.RemoteExport:
        """Connect for the first time; a :class:`ConfigError` says why not."""
        try:
            conn = self._connect()
        except (OSError, C.HandshakeError, C.RemoteProtocolError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{self.what} {self.target}: cannot connect to the NBD server: "
                              f"{why}") from None
        self.export = conn.export
        self._install(conn)
        if not self.writable or conn.export.can(P.TF_CAN_MULTI_CONN):
            self._open_async(async_connections)
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name=f"nbd-reconnect {self.target}")
        self._supervisor.start()
        return conn.export

    def _connect(self) -> _Conn:
        sock, export, leftover = self._handshake()
        try:
            # blocking, but a send that the server does not take within the
            # timeout fails (EAGAIN) instead of hanging the sender for good
            t = max(self.timeout, 1.0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("@ll", int(t), int(t % 1 * 1e6)))
            self.connects += 1
            return _Conn(self, sock, export, leftover, self.connects)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, timeout: float = CONNECT_TIMEOUT
                   ) -> tuple[socket.socket, C.RemoteExport, bytes]:
        """Connect and negotiate; a blocking socket, the export, bytes read past it."""
        tgt = self.target
        if tgt.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(tgt.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((tgt.host, tgt.port), timeout=timeout)
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
            sock.settimeout(None)
            return sock, export, hs.leftover
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
            idle: _Conn | None = None
            with self._cond:
                while not self._closed and self._conn is not None:
                    conn = self._conn
                    sent = conn.sent
                    if self._cond.wait(self.keepalive or None):
                        continue
                    if self._conn is conn and conn.sent == sent and not conn.inflight:
                        idle = conn
                        break
                if self._closed:
                    return
            if idle is not None:
                self._probe(idle)
                continue
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

    def _probe(self, conn: _Conn) -> None:
        """The keepalive: read one sector on an idle connection.

        ESHUTDOWN says the server is stopping (and may wait for us to go):
        every connection is closed.  No reply within the timeout drops this
        connection, and the supervisor makes a new one.
        """
        assert self.export is not None
        n = min(512, self.export.size)
        if n <= 0:
            return
        r = Request(P.CMD_READ, 0, n, view=memoryview(bytearray(n)))
        r.arm()
        try:
            conn.submit(r)
        except _Lost:
            return
        assert r.lock is not None
        if not r.lock.acquire(timeout=self.timeout):
            conn.kill(f"no reply to a keepalive within {self.timeout:g} s")
        elif r.state == _DONE and r.error == P.ESHUTDOWN:
            self._server_going()

    def _server_going(self) -> None:
        """The server said it is shutting down: close every connection to it.

        A server stopping gracefully may wait for its clients to leave
        (nbdkit does), so connections that are idle must go too.  Shutting
        a socket down is safe from any thread: each connection's reader (or
        its next request) sees it and hands its requests back to be sent
        again on a new connection, to the server's successor.
        """
        why = "the server is shutting down"
        conns: list[_Conn | _AsyncConn] = [*self.aconns]
        conn = self._conn
        if conn is not None:
            conns.append(conn)
        going = [c for c in conns if not (c.dead or c.let_go)]
        if not going:
            return
        log.warning("nbd remote %s: %s; closing every connection to it", self.target, why)
        self.last_error = why
        for c in going:
            c.let_go = True
            if c is conn:
                conn.kill(why)
                continue
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
                assert r.lock is not None
                if not (left > 0 and r.lock.acquire(timeout=left)):
                    conn.kill(f"no reply within {self.timeout:g} s")
                    raise IOFailure(errno.EIO, f"nbd remote {self.target}: no reply within "
                                    f"{self.timeout:g} s ({P.CMD_NAMES[r.cmd]} at {r.offset})")
            todo = self._finished(conn, todo)

    async def acall(self, reqs: list[Request], timeout: float | None = None) -> None:
        """:meth:`call` for the event loop: on a connection of its own, without threads."""
        left = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + left
        trio_deadline = trio.current_time() + left
        todo = reqs
        while todo:
            conn = await self._aconn_get(deadline)
            try:
                await conn.run(todo, trio_deadline)
            except _Lost:
                continue
            todo = self._finished(conn, todo)

    def submit(self, reqs: list[Request],
               done: Callable[[BaseException | None], object]) -> bool:
        """Send ``reqs`` from the event loop; ``done(exc)`` is called once all are answered.

        No task waits: the connection's reader calls ``done`` (``None``, or
        an :class:`IOFailure`), never before this returns.  Requests whose
        connection is lost are sent again until the deadline, as with
        :meth:`acall`.  False (and nothing sent) when no event-loop
        connection is up: use :meth:`acall`, which waits for one.
        """
        conn = self._pick()
        if conn is None:
            return False
        conn.queue(reqs, _Batch(self, conn, reqs, done, conn.now() + self.timeout))
        return True

    def submit1(self, req: Request, done: Callable[[BaseException | None], object]) -> bool:
        """:meth:`submit` of one new request (the common case, with less work)."""
        conn = self._last  # _pick's first choice, inline
        if conn is None or conn.dead or len(conn.inflight) >= STICKY:
            conn = self._pick()
            if conn is None:
                return False
        conn.queue1(req, _Batch(self, conn, [req], done, conn.now() + self.timeout))
        return True

    def _pick(self) -> _AsyncConn | None:
        """A live event-loop connection (lost ones are remade meanwhile).

        The last one used while it has fewer than ``STICKY`` requests in
        flight, so the requests of one burst go out (and their replies come
        back) together; else the least busy.
        """
        last = self._last
        if last is not None and not last.dead and len(last.inflight) < STICKY:
            return last
        best = None
        alive = 0
        for c in self.aconns:
            if not c.dead:
                alive += 1
                if best is None or len(c.inflight) < len(best.inflight):
                    best = c
        if best is not None and alive < self.async_slots and self._aconn_making is None \
                and time.monotonic() >= self._remake_after:
            self._aconn_making = trio.Event()
            trio.lowlevel.spawn_system_task(self._remake_one, self._aconn_making)
        self._last = best
        return best

    def _watch(self) -> None:
        """Start the watchdog (once per event loop): it enforces the deadlines."""
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watchdog, name=f"nbd {self.target} watchdog")

    async def _watchdog(self) -> None:
        """Drop an event-loop connection whose oldest request is past its deadline.

        Its requests are then lost: :meth:`acall` and :class:`_Batch` send
        them again, or fail them with EIO once their own deadline has passed.
        """
        period = min(1.0, max(self.timeout / 4, 0.01))
        try:
            while not self._closed:
                await trio.sleep(period)
                now = trio.current_time()
                for c in list(self.aconns):
                    if c.dead or not c.inflight:
                        continue
                    oldest = next(iter(c.inflight.values()))[1]  # handles grow: in order
                    if oldest.deadline <= now:
                        c.kill(f"no reply within {self.timeout:g} s")
        finally:
            self._watching = False

    async def _aconn_get(self, deadline: float) -> _AsyncConn:
        """The least busy event-loop connection.

        Lost ones are made again in the background while others are left;
        with none left, the caller waits for one (until its deadline).
        """
        while True:
            best = self._pick()
            making = self._aconn_making
            if best is not None:
                return best
            if making is None:
                break
            with trio.move_on_after(max(0.0, deadline - time.monotonic())):
                await making.wait()
            if time.monotonic() >= deadline:
                raise self._unreachable()
        self._aconn_making = making = trio.Event()
        try:
            while True:
                conn = await self._make_aconn(deadline)
                if conn is not None:
                    return conn
                if time.monotonic() >= deadline:
                    raise self._unreachable()
                await trio.sleep(min(BACKOFF_MAX, max(0.0, deadline - time.monotonic())))
        finally:
            self._aconn_making = None
            making.set()

    def _unreachable(self) -> IOFailure:
        return IOFailure(errno.EIO, f"nbd remote {self.target} is unreachable "
                         f"({self.last_error or 'not connected'})")

    async def _remake_one(self, making: trio.Event) -> None:
        """A system task: replace one lost event-loop connection (one attempt)."""
        try:
            if await self._make_aconn(time.monotonic() + CONNECT_TIMEOUT) is None:
                self._remake_after = time.monotonic() + BACKOFF_MAX
        except Exception as exc:  # never crash the event loop
            log.debug("nbd remote %s: remaking a connection failed: %s", self.target, exc)
            self._remake_after = time.monotonic() + BACKOFF_MAX
        finally:
            if self._aconn_making is making:
                self._aconn_making = None
            making.set()

    async def _make_aconn(self, deadline: float) -> _AsyncConn | None:
        """One attempt at a new event-loop connection; None if it failed."""
        # the supervisor's connection being up says the remote is reachable
        await trio.to_thread.run_sync(self._wait_conn, deadline)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            sock, export, leftover = await trio.to_thread.run_sync(
                self._handshake, min(CONNECT_TIMEOUT, left))
        except (OSError, C.HandshakeError, C.RemoteProtocolError) as exc:
            self.last_error = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                               else str(exc))
            return None
        if self._closed:
            sock.close()
            raise IOFailure(errno.EIO, f"nbd remote {self.target}: closed")
        conn = _AsyncConn(self, sock, export, leftover)
        self.aconns = [c for c in self.aconns if not c.dead] + [conn]
        return conn

    def _finished(self, conn: _Conn, todo: list[Request]) -> list[Request]:
        """Raise the first server error among ``todo``; return what must be sent again."""
        for r in todo:
            if r.state == _DONE and r.error and r.error != P.ESHUTDOWN:
                code = _NBD_TO_ERRNO.get(r.error, errno.EIO)
                raise IOFailure(code, f"nbd remote {self.target}: {P.CMD_NAMES[r.cmd]} "
                                f"[{r.offset}, {r.offset + r.length}) failed: "
                                f"{r.message or errno.errorcode.get(code, code)}")
        retry = [r for r in todo if r.state != _DONE or r.error == P.ESHUTDOWN]
        if any(r.error == P.ESHUTDOWN for r in retry):
            conn.kill("the server is shutting down")  # reconnect to its successor
            self._server_going()  # and let it go: it may wait for every connection
        return retry

    def close(self) -> None:
        with self._cond:
            self._closed = True
            conn = self._conn
            self._cond.notify_all()
        if conn is not None:
            conn.disconnect()
        for c in self.aconns:
            c.close()
        if self._supervisor is not None:
            self._supervisor.join(30)
