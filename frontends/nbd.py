"""The NBD server frontend: NBD over TCP or a Unix socket onto a Device.

Each connection owns a non-blocking socket, a receive buffer and a queue of
reply buffers.  The receive loop parses every complete request out of each
receive and serves those it can inline (reads from the page cache, writes,
trims, block status), queueing their replies; the whole batch is then sent
with one ``sendmsg``.  Requests that would block (a read of data outside the
page cache, FLUSH, FUA) run as tasks in the connection's nursery and queue
their replies when done, so replies go out of order, as NBD allows.

Resource handling: the server owns its listeners and the connections' tasks;
:meth:`NBDServer.shutdown` stops accepting and stops reading new requests,
lets the requests in flight finish and their replies go out, then closes.
The device itself belongs to the caller.

Error handling: an engine error becomes an NBD error reply (one mapping,
:func:`nbd_errno`) and the connection goes on; a protocol violation closes
that one connection; nothing a client sends can stop the server.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from lbd import protocol as P
from lbd.device import Device
from lbd.errors import IOFailure, WouldBlock
from lbd.layer import WRITTEN, State

log = logging.getLogger(__name__)

RECV_BUFFER = 4 << 20
MAX_REQUEST = 32 << 20  # the largest READ/WRITE we serve (NBD_INFO_BLOCK_SIZE max)
MAX_STATUS_SPAN = 1 << 30  # block status answers at most this much per request
OUTPUT_HIGH_WATER = 64 << 20  # stop reading requests while this much reply data is queued
HANDSHAKE_TIMEOUT = 30.0
SHUTDOWN_GRACE = float(os.environ.get("LBD_SHUTDOWN_GRACE", "30"))  # seconds replies get at stop
STOP_LINGER = 0.25  # at stop, a connection closes once its client has been quiet this long
SENDFILE_MIN = 64 * 1024  # reads this large go out with sendfile when they can
LONE_CLIENT_WAIT = 0.0002  # seconds one connection alone may wait for its next request
LONE_CLIENT_SPIN = float(os.environ.get("LBD_LONE_SPIN_US", "50")) * 1e-6
IOV_MAX = 1024
# the simple reply "OK" for a handle (a C-level partial: the write path maps it)
_READ_CHUNK = P.READ_CHUNK.pack  # a final OFFSET_DATA chunk header
_OK_REPLY = functools.partial(P.SIMPLE_REPLY.pack, P.SIMPLE_REPLY_MAGIC, 0)
_PLAIN = frozenset((bytes, bytearray, memoryview))  # what sendmsg takes as it is
REMOTE_SNDBUF = int(os.environ.get("LBD_REMOTE_SNDBUF", str(4 << 20)))  # clients of remote reads
_ids = itertools.count(1)

_ERRNO_TO_NBD = {errno.EPERM: P.EPERM, errno.EROFS: P.EPERM, errno.EIO: P.EIO,
                 errno.ENOMEM: P.ENOMEM, errno.EINVAL: P.EINVAL, errno.ENOSPC: P.ENOSPC,
                 errno.EDQUOT: P.ENOSPC, errno.EFBIG: P.ENOSPC, errno.EOVERFLOW: P.EOVERFLOW,
                 errno.ENOTSUP: P.ENOTSUP, errno.ESHUTDOWN: P.ESHUTDOWN}

_FLAGS_ALLOWED = {
    P.CMD_READ: P.CMDF_FUA | P.CMDF_DF,
    P.CMD_WRITE: P.CMDF_FUA,
    P.CMD_DISC: P.CMDF_FUA,
    P.CMD_FLUSH: P.CMDF_FUA,
    P.CMD_TRIM: P.CMDF_FUA,
    P.CMD_CACHE: P.CMDF_FUA,
    P.CMD_WRITE_ZEROES: P.CMDF_FUA | P.CMDF_NO_HOLE | P.CMDF_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMDF_FUA | P.CMDF_REQ_ONE,
}


def nbd_errno(exc: BaseException) -> int:
    """The NBD error code for an exception raised while serving a request."""
    if isinstance(exc, IOFailure):
        return _ERRNO_TO_NBD.get(exc.errno, P.EIO)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_TO_NBD.get(exc.errno, P.EIO)
    return P.EIO


class NBDServer:
    """Serves one device as one export (name configurable, "" by default)."""

    def __init__(self, device: Device, *, export_name: str = "", description: str = "",
                 readonly: bool = False, oldstyle: bool = False) -> None:
        self.device = device
        self.export_name = export_name
        self.description = description
        self.readonly = readonly
        self.oldstyle = oldstyle
        self.addresses: list[str] = []  # URIs we listen on
        self.connections: dict[int, Connection] = {}
        self._stopping = False
        self._listen_scopes: list[trio.CancelScope] = []  # one per serve_tcp/serve_unix
        self._idle = trio.Event()
        self._idle.set()

    # -- exports -----------------------------------------------------------------

    def export(self) -> P.Export:
        """The export as a connecting client sees it now."""
        flags = (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_DF
                 | P.TF_CAN_MULTI_CONN | P.TF_SEND_CACHE)
        if self.readonly or not self.device.writable:
            flags |= P.TF_READ_ONLY
        else:
            flags |= P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO
        return P.Export(self.export_name, self.device.size, flags, self.description,
                        min_block=1, preferred_block=4096, max_block=MAX_REQUEST)

    def _lookup(self, name: str) -> P.Export | None:
        return self.export() if name == self.export_name else None

    def _list(self) -> list[P.Export]:
        return [self.export()]

    # -- listening ---------------------------------------------------------------

    async def serve_tcp(self, host: str | None, port: int, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (all addresses if host is None); reports the port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        socks = [lst.socket for lst in listeners]
        bound = socks[0].getsockname()[1]
        for s in socks:
            h, p = s.getsockname()[:2]
            self.addresses.append(f"nbd://{'[' + h + ']' if ':' in h else h}:{p}/"
                                  f"{self.export_name}")
        task_status.started(bound)
        await self._accept_all(socks)

    async def serve_unix(self, path: str, *,
                         task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a Unix socket at ``path`` (a stale socket file is replaced)."""
        if os.path.exists(path):
            if not _is_stale_socket(path):
                raise OSError(errno.EADDRINUSE, f"{path} exists and is not a stale socket")
            os.unlink(path)
        # Bound under a temporary name and renamed once listening: a client that
        # sees the socket file can connect (between bind and listen it would be
        # refused, and a client waiting for the file would fail)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = path + "~"
        if os.path.exists(tmp) and _is_stale_socket(tmp):
            os.unlink(tmp)  # left by a server that was killed while starting
        if len(os.fsencode(tmp)) >= 108 or os.path.exists(tmp):
            tmp = path
        try:
            raw.bind(tmp)
            raw.listen(128)
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            raw.close()
            raise
        sock = trio.socket.from_stdlib_socket(raw)
        self.addresses.append(f"nbd+unix:///{self.export_name}?socket={path}")
        task_status.started(path)
        try:
            await self._accept_all([sock])
        finally:
            sock.close()
            if os.path.exists(path):
                os.unlink(path)

    async def _accept_all(self, socks: list[trio.socket.SocketType]) -> None:
        scope = trio.CancelScope()  # a scope can be entered once: one per listener set
        if self._stopping:
            scope.cancel()
        self._listen_scopes.append(scope)
        try:
            async with trio.open_nursery() as nursery:
                with scope:
                    async with trio.open_nursery() as accept_nursery:
                        for s in socks:
                            accept_nursery.start_soon(self._accept_loop, s, nursery)
        finally:
            self._listen_scopes.remove(scope)
            for s in socks:
                s.close()

    async def _accept_loop(self, lsock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn, addr = await lsock.accept()
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            raw = socket.socket(fileno=conn.detach())
            raw.setblocking(False)
            if raw.family in (socket.AF_INET, socket.AF_INET6):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = "unix"
            if self._stopping:
                raw.close()
                continue
            nursery.start_soon(self._run_connection, raw, peer)

    async def _run_connection(self, raw: socket.socket, peer: str) -> None:
        cid = next(_ids)
        conn = Connection(self, raw, cid, peer)
        self.connections[cid] = conn
        self._idle = trio.Event()
        try:
            await conn.run()
        except* trio.ClosedResourceError:
            log.warning("conn %d (%s): closed by the server before its replies went out",
                        cid, peer)
        except* Exception:
            log.exception("conn %d (%s): internal error; closing this connection", cid, peer)
        finally:
            raw.close()
            del self.connections[cid]
            if not self.connections:
                self._idle.set()

    async def shutdown(self) -> None:
        """Stop accepting, finish the requests in flight, close every connection."""
        self._stopping = True
        for scope in self._listen_scopes:
            scope.cancel()
        for conn in list(self.connections.values()):
            conn.stop()
        with trio.move_on_after(SHUTDOWN_GRACE) as waited:
            await self._idle.wait()
        if waited.cancelled_caught:
            # a client that stopped reading its replies must not hold us forever
            log.warning("%d connection(s) still busy after %g s; closing them",
                        len(self.connections), SHUTDOWN_GRACE)
            for conn in list(self.connections.values()):
                conn.abort()
            await self._idle.wait()

    def clients(self) -> list[dict[str, object]]:
        return [c.info() for c in self.connections.values()]


class FileSlice:
    """Reply data still in a file: sent with sendfile(2), no copy through Python.

    Sent from a worker thread, so data outside the page cache never stalls
    the event loop; the thread waits for the socket itself.
    """

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length = fd, offset, length

    def __len__(self) -> int:
        return self.length

    def cached(self) -> bool:
        """Are the first and last pages in the page cache (a cheap hint)?"""
        probe = bytearray(1)
        try:
            for off in (self.offset, self.offset + self.length - 1):
                if os.preadv(self.fd, [probe], off, os.RWF_NOWAIT) != 1:
                    return False
        except OSError:
            return False
        return True

    async def send_inline(self, sock: socket.socket) -> None:
        off, left = self.offset, self.length
        sock_fd = sock.fileno()
        while left:
            try:
                n = os.sendfile(sock_fd, self.fd, off, left)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            if n == 0:
                raise OSError(errno.EIO, "sendfile: unexpected end of file")
            off += n
            left -= n

    def send_to(self, sock_fd: int) -> None:
        off, left = self.offset, self.length
        while left:
            try:
                n = os.sendfile(sock_fd, self.fd, off, left)
            except BlockingIOError:
                select.select([], [sock_fd], [])
                continue
            if n == 0:  # the file is shorter than it should be: never send short
                raise OSError(errno.EIO, "sendfile: unexpected end of file")
            off += n
            left -= n


class _Spliced(FileSlice):
    """Reply data a remote layer keeps in a pipe (Device.read_start with splice):
    sent like a FileSlice, with splice(2) instead of sendfile."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        super().__init__(-1, 0, len(data))
        self.data = data

    def cached(self) -> bool:
        return True

    async def send_inline(self, sock: socket.socket) -> None:
        await self.data.send_inline(sock)

    def send_to(self, sock_fd: int) -> None:
        self.data.send_to(sock_fd)


def _is_stale_socket(path: str) -> bool:
    import stat

    if not stat.S_ISSOCK(os.stat(path).st_mode):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


class Connection:
    """One client: handshake, then the request loop."""

    def __init__(self, server: NBDServer, raw: socket.socket, cid: int, peer: str) -> None:
        self.server = server
        self.device = server.device
        self.raw = raw
        self.cid = cid
        self.peer = peer
        self.export_name = ""
        self.readonly = True
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.requests = 0
        self.refused = 0  # requests answered ESHUTDOWN because the server is stopping
        self._park: trio.CancelScope | None = None  # set while the receive waits in the loop
        self._out: list[Any] = []  # buffers and FileSlices
        self._out_bytes = 0
        self._sending = False
        self._drained = trio.Event()
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        self._dead = False
        # aligned writes waiting for _commit_writes: (offset, payload), their
        # handles, and the positions of those with FUA
        self._wbatch: list[tuple[int, memoryview]] = []
        self._whandles: list[int] = []
        self._wfua: list[int] = []
        # remote reads and writes started without a task (_read_remote,
        # _write_remote) and the sender of their replies
        self._remote_inflight = 0
        self._sender_lot: trio.lowlevel.ParkingLot | None = None
        self._kicked = False
        self._sender_exit = False
        self._drained_remote: trio.Event | None = None

    def info(self) -> dict[str, object]:
        return {"id": self.cid, "peer": self.peer, "export": self.export_name,
                "readonly": self.readonly, "structured_replies": self.structured,
                "requests": self.requests}

    def abort(self) -> None:
        """Give up on this client: wake every task waiting on its socket."""
        self._dead = True
        self._out.clear()
        trio.lowlevel.notify_closing(self.raw)
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def stop(self) -> None:
        """Serve no new requests; the ones in flight finish and are answered.

        The socket is not shut for reading: a client still sending requests
        (or the payload of queued writes) would get EPIPE and could lose the
        replies already on their way.  New requests get NBD_ESHUTDOWN, as the
        protocol asks, and the connection closes once the client is quiet.
        """
        self._stopping = True
        if self._park is not None:
            self._park.cancel()

    # -- socket plumbing ------------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return self.raw.recv_into(view)
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                return 0
            if self._stopping:
                # answer (with ESHUTDOWN) what the client still sends; close once it is quiet
                with trio.move_on_after(STOP_LINGER):
                    await trio.lowlevel.wait_readable(self.raw)
                    continue
                return 0
            lone = self._lone()
            if lone and self._spin():
                continue
            if lone and select.select([self.raw], [], [], LONE_CLIENT_WAIT)[0]:
                # A lone client waiting for our reply sends its next request
                # within microseconds: a short wait in the kernel is far
                # cheaper than a round trip through the event loop.
                continue
            with trio.CancelScope() as self._park:  # stop() cancels it
                await trio.lowlevel.wait_readable(self.raw)
            self._park = None

    def _lone(self) -> bool:
        """This is the only client, and may block the event loop briefly.

        Not with a remote layer (its replies come through the event loop), nor
        while requests of this connection run in tasks: blocking the loop
        would hold back their replies.
        """
        return len(self.server.connections) == 1 and self.device.local and not (
            self._nursery is not None and self._nursery.child_tasks)

    def _spin(self) -> bool:
        if LONE_CLIENT_SPIN <= 0:
            return False
        deadline = time.perf_counter() + LONE_CLIENT_SPIN
        fd = self.raw
        while time.perf_counter() < deadline:
            os.sched_yield()
            if select.select([fd], [], [], 0)[0]:
                return True
        return False

    async def _send_all(self, data: bytes) -> None:
        self._queue(data)
        await self._flush()

    def _queue(self, *bufs: bytes | bytearray | memoryview | FileSlice) -> None:
        for b in bufs:
            if len(b):
                self._out.append(b)
                self._out_bytes += len(b)

    async def _flush(self) -> None:
        """Send everything queued; if another task is already sending, it will."""
        if self._sending or self._dead:
            return
        self._sending = True
        try:
            while self._out:
                bufs, self._out = self._out, []
                size = sum(map(len, bufs))  # before sending trims partly sent buffers
                if _PLAIN.issuperset(map(type, bufs)):
                    await self._sendmsg_all(bufs)
                else:  # file slices (or other sendable kinds) among them
                    await self._sendv(bufs)
                self._out_bytes -= size
        except OSError as exc:
            log.info("conn %d: send failed (%s); dropping the connection", self.cid, exc)
            self._dead = True
            self._out.clear()
            self._out_bytes = 0
            try:  # wake the receive loop, which may wait for a client waiting for us
                self.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            self._sending = False
            if self._out_bytes < OUTPUT_HIGH_WATER:
                self._drained.set()

    async def _sendv(self, bufs: list[Any]) -> None:
        """Send buffers in order; file slices go out with sendfile in a thread."""
        start = 0
        for i, b in enumerate(bufs):
            if isinstance(b, FileSlice):
                if i > start:
                    await self._sendmsg_all(bufs[start:i])
                if b.cached():
                    await b.send_inline(self.raw)
                else:
                    await trio.to_thread.run_sync(b.send_to, self.raw.fileno())
                start = i + 1
        if start < len(bufs):
            await self._sendmsg_all(bufs[start:])

    async def _sendmsg_all(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        raw = self.raw
        i = 0
        n_bufs = len(bufs)
        while i < n_bufs:
            chunk = bufs if not i and n_bufs <= IOV_MAX else bufs[i:i + IOV_MAX]
            try:
                sent = raw.sendmsg(chunk)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(raw)
                continue
            if sent == sum(map(len, chunk)):  # the usual case: all of it
                i += len(chunk)
                continue
            while sent and i < n_bufs:
                n = len(bufs[i])
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    bufs[i] = memoryview(bufs[i])[sent:]
                    sent = 0

    # -- the connection ----------------------------------------------------------------

    async def run(self) -> None:
        srv = self.server
        # oldstyle has no export names: its client gets the one export, whatever its name
        lookup = (lambda _name: srv.export()) if srv.oldstyle else srv._lookup
        hs = P.ServerHandshake(lookup, srv._list, oldstyle=srv.oldstyle)
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as timeout:
            await self._send_all(hs.start())
            buf = bytearray(64 * 1024)
            mv = memoryview(buf)
            while hs.state == P.NEED_DATA and not self._dead:
                n = await self._recv_into(mv)
                if n == 0:
                    return
                hs.receive_data(mv[:n])
                await self._send_all(hs.step())
        if timeout.cancelled_caught:
            log.info("conn %d (%s): handshake timed out", self.cid, self.peer)
            return
        if hs.state != P.DONE or hs.negotiated is None:
            log.info("conn %d (%s): closed during handshake: %s", self.cid, self.peer,
                     hs.close_reason or "client went away")
            return
        neg = hs.negotiated
        self.export_name = neg.export.name
        self.readonly = bool(neg.export.flags & P.TF_READ_ONLY)
        self.structured = neg.structured
        self.contexts = neg.contexts
        log.info("conn %d (%s): export %r, %s, %s replies%s", self.cid, self.peer,
                 self.export_name, "read-only" if self.readonly else "writable",
                 "structured" if self.structured else "simple",
                 f", contexts {sorted(self.contexts.values())}" if self.contexts else "")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._serve(hs.leftover)
            await self._remote_drain()
        await self._flush()
        log.info("conn %d (%s): closed after %d requests%s", self.cid, self.peer, self.requests,
                 f" ({self.refused} more refused: shutting down)" if self.refused else "")

    async def _serve(self, leftover: bytes) -> None:
        buf = bytearray(RECV_BUFFER)
        mv = memoryview(buf)
        start = 0
        end = len(leftover)
        buf[:end] = leftover
        req = P.REQUEST
        req_size = req.size
        magic_ok = P.REQUEST_MAGIC
        read_cmd = P.CMD_READ
        write_cmd = P.CMD_WRITE
        max_request = MAX_REQUEST
        small_read = SENDFILE_MIN - 1
        device = self.device
        size = device.size
        read_cached = device.read_cached
        wbatch_add = self._wbatch.append
        whandles_add = self._whandles.append
        simple_ok = P.SIMPLE_REPLY.pack
        SIMPLE_MAGIC = P.SIMPLE_REPLY_MAGIC
        # the final OFFSET_DATA chunk of a structured read reply (28 bytes)
        chunk_pack = P.READ_CHUNK.pack
        SR_MAGIC, SR_DONE, SR_DATA = (P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                      P.REPLY_TYPE_OFFSET_DATA)
        structured = self.structured
        out_bytes = 0  # reply bytes queued by the read hot path, added per receive
        # plain writes may skip _write's checks (the export and stack are
        # writable and local); re-read per receive since a layer may be pushed
        batchable = False
        n_requests = 0  # added to self.requests per receive (and at the end)
        try:
            while not self._dead:
                batchable = not self.readonly and device.local and device.writable
                remote = not device.local
                if self._stopping:
                    start, end = await self._refuse(buf, mv, start, end)
                    if start < 0:
                        return
                    continue
                # parse and serve every complete request in the buffer
                out_extend = self._out.extend  # _flush replaces the list between receives
                while end - start >= req_size:
                    magic, flags, cmd, handle, offset, length = req.unpack_from(buf, start)
                    if magic != magic_ok:
                        self._commit_writes()
                        log.warning("conn %d: bad request magic %#x; closing", self.cid, magic)
                        return
                    if cmd == write_cmd:
                        if length > max_request:
                            self._commit_writes()  # _discard may reuse the buffer
                            start += req_size
                            start, end = await self._discard(buf, mv, start, end, length)
                            if start < 0:
                                return
                            out_extend = self._out.extend  # a _flush may have run meanwhile
                            self._error(cmd, handle, P.EOVERFLOW, f"write of {length} bytes "
                                        f"exceeds the maximum {MAX_REQUEST}")
                            continue
                        total = req_size + length
                        if end - start < total:
                            self._commit_writes()  # their payloads may be moved below
                            if total > len(buf) - start:
                                # make room: move the partial request to the front of
                                # the buffer, or of a bigger one for a large write
                                if total > len(buf):
                                    bigger = bytearray(total)
                                    bigger[:end - start] = buf[start:end]
                                    buf, mv = bigger, memoryview(bigger)
                                else:
                                    buf[:end - start] = buf[start:end]
                                end -= start
                                start = 0
                            break
                        n_requests += 1
                        if (not flags and not (offset | length) & 511 and 0 < length
                                and offset + length <= size and batchable):
                            # the hot path: a plain aligned write, committed with the
                            # others of this receive (_commit_writes)
                            wbatch_add((offset, mv[start + req_size:start + total]))
                            whandles_add(handle)
                        else:
                            self._write(flags, handle, offset, length,
                                        mv[start + req_size:start + total])
                        start += total
                        continue
                    start += req_size
                    n_requests += 1
                    if (cmd == read_cmd and not flags and length <= small_read
                            and 0 < length and offset + length <= size):
                        # the hot path: a small plain read, served from the page cache
                        if self._wbatch:
                            self._commit_writes()
                        if remote:  # a stack with a remote layer: read_start tries inline
                            if not self._read_remote(handle, offset, length):
                                self._spawn(self._read_async, handle, offset, length)
                            continue
                        try:
                            data = read_cached(offset, length)
                        except WouldBlock:
                            if not self._read_remote(handle, offset, length):
                                self._spawn(self._read_async, handle, offset, length)
                            continue
                        except Exception as exc:
                            self._fail(cmd, handle, exc)
                            continue
                        if structured:
                            out_extend((chunk_pack(SR_MAGIC, SR_DONE, SR_DATA, handle,
                                                   length + 8, offset), data))
                            out_bytes += length + 28
                        else:
                            out_extend((simple_ok(SIMPLE_MAGIC, 0, handle), data))
                            out_bytes += length + 16
                        continue
                    self._commit_writes()
                    if cmd == P.CMD_DISC:
                        log.debug("conn %d: disconnect requested", self.cid)
                        return
                    self._dispatch(cmd, flags, handle, offset, length)
                self._commit_writes()
                self.requests += n_requests
                n_requests = 0
                self._out_bytes += out_bytes
                out_bytes = 0
                if self._out:
                    await self._flush()
                    if self._out_bytes >= OUTPUT_HIGH_WATER:
                        self._drained = trio.Event()
                        await self._drained.wait()
                if start == end:
                    start = end = 0
                    if len(buf) > RECV_BUFFER:
                        buf = bytearray(RECV_BUFFER)
                        mv = memoryview(buf)
                elif len(buf) - end < req_size or start > len(buf) // 2:
                    buf[:end - start] = buf[start:end]
                    end -= start
                    start = 0
                n = await self._recv_into(mv[end:])
                if n == 0:
                    return
                end += n
        finally:
            self.requests += n_requests
            self._out_bytes += out_bytes

    async def _refuse(self, buf: bytearray, mv: memoryview, start: int,
                      end: int) -> tuple[int, int]:
        """While stopping: answer every complete request in the buffer ESHUTDOWN.

        Returns the new ``(start, end)``, or ``(-1, -1)`` when the connection
        should close (the client is quiet, gone, or sent DISC).
        """
        req = P.REQUEST
        while True:
            while end - start >= req.size:
                magic, _flags, cmd, handle, _offset, length = req.unpack_from(buf, start)
                if magic != P.REQUEST_MAGIC or cmd == P.CMD_DISC:
                    return -1, -1
                start += req.size
                if cmd == P.CMD_WRITE:
                    start, end = await self._discard(buf, mv, start, end, length)
                    if start < 0:
                        return -1, -1
                self.refused += 1
                self._error(cmd, handle, P.ESHUTDOWN, "the server is shutting down")
            await self._flush()
            if start == end:
                start = end = 0
            elif start:
                buf[:end - start] = buf[start:end]
                end -= start
                start = 0
            n = await self._recv_into(mv[end:])
            if n == 0:
                return -1, -1
            end += n

    async def _discard(self, buf: bytearray, mv: memoryview, start: int, end: int,
                       length: int) -> tuple[int, int]:
        """Skip ``length`` payload bytes of a refused request; (-1, -1) on EOF."""
        have = min(end - start, length)
        start += have
        left = length - have
        if not left:
            return start, end
        while left:  # never read past the payload: what follows is the next request
            n = await self._recv_into(mv[:min(left, len(buf))])
            if n == 0:
                return -1, -1
            left -= n
        return 0, 0

    # -- replies ---------------------------------------------------------------------------

    def _ok(self, handle: int) -> None:
        self._queue(P.simple_reply(handle))

    def _error(self, cmd: int, handle: int, err: int, message: str) -> None:
        log.debug("conn %d: %s failed: %s", self.cid, P.CMD_NAMES.get(cmd, cmd), message)
        if self.structured and cmd in (P.CMD_READ, P.CMD_BLOCK_STATUS):
            self._queue(P.error_chunk(handle, err, message))
        else:
            self._queue(P.simple_reply(handle, err))

    def _fail(self, cmd: int, handle: int, exc: BaseException) -> None:
        if not isinstance(exc, IOFailure):
            log.error("conn %d: %s failed unexpectedly", self.cid, P.CMD_NAMES.get(cmd, cmd),
                      exc_info=exc)
        self._error(cmd, handle, nbd_errno(exc), str(exc))

    def _read_reply(self, handle: int, offset: int,
                    data: bytearray | memoryview | FileSlice) -> None:
        """Queue a read's reply (``data`` is never empty: reads are at least a byte)."""
        n = len(data)
        if self.structured:
            self._out.extend((_READ_CHUNK(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                          P.REPLY_TYPE_OFFSET_DATA, handle, n + 8, offset),
                              data))
            self._out_bytes += n + 28
        else:
            self._out.extend((P.simple_reply(handle), data))
            self._out_bytes += n + 16

    # -- requests ----------------------------------------------------------------------------

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> str | None:
        allowed = _FLAGS_ALLOWED.get(cmd)
        if allowed is None:
            return f"unknown command {cmd}"
        if flags & ~allowed:
            return f"flags {flags:#x} not valid for {P.CMD_NAMES[cmd]}"
        if cmd == P.CMD_READ and flags & P.CMDF_DF and not self.structured:
            return "DF requires structured replies"
        if cmd == P.CMD_FLUSH:  # offset and length are reserved and MUST be zero
            return f"FLUSH with offset {offset} and length {length}" if offset or length else None
        if length == 0:
            return f"zero-length {P.CMD_NAMES[cmd]}"
        if cmd == P.CMD_READ and length > MAX_REQUEST:
            return f"read of {length} bytes exceeds the maximum {MAX_REQUEST}"
        return None

    def _dispatch(self, cmd: int, flags: int, handle: int, offset: int, length: int) -> None:
        problem = self._validate(cmd, flags, offset, length)
        if problem is not None:
            err = P.EOVERFLOW if "maximum" in problem else P.EINVAL
            self._error(cmd, handle, err, problem)
            return
        if offset + length > self.device.size:
            write_like = cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES)
            self._error(cmd, handle, P.ENOSPC if write_like else P.EINVAL,
                        f"[{offset}, {offset + length}) is beyond the end of the device")
            return
        device = self.device
        if not device.local and cmd != P.CMD_READ and cmd != P.CMD_FLUSH:
            # a remote layer may wait on its network: never on the event loop
            self._spawn(self._dispatch_async, cmd, flags, handle, offset, length, None)
            return
        try:
            if cmd == P.CMD_READ:
                if length >= SENDFILE_MIN:
                    where = device.locate(offset, length)
                    if where is not None:  # one contiguous piece of one file
                        piece = FileSlice(*where, length)
                        # only from the page cache: once its header is out, a read
                        # error (a bad sector) could not become an EIO reply
                        if piece.cached():
                            self._read_reply(handle, offset, piece)
                            return
                    if not device.local:  # aread tries each layer inline first anyway
                        if not self._read_remote(handle, offset, length):
                            self._spawn(self._read_async, handle, offset, length)
                        return
                try:
                    data = device.read(offset, length, nowait=True)
                except WouldBlock:
                    if device.local or not self._read_remote(handle, offset, length):
                        self._spawn(self._read_async, handle, offset, length)
                    return
                self._read_reply(handle, offset, data)
            elif cmd == P.CMD_FLUSH:
                self._durable_reply(cmd, [handle])
            elif cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                if self.readonly:
                    raise IOFailure(errno.EPERM, "read-only export")
                device.zero(offset, length, trim=cmd == P.CMD_TRIM,
                            no_hole=bool(flags & P.CMDF_NO_HOLE),
                            fast=bool(flags & P.CMDF_FAST_ZERO))
                if flags & P.CMDF_FUA:
                    self._durable_reply(cmd, [handle])
                else:
                    self._ok(handle)
            elif cmd == P.CMD_BLOCK_STATUS:
                self._block_status(flags, handle, offset, length)
            elif cmd == P.CMD_CACHE:
                device.cache(offset, length)
                self._ok(handle)
        except Exception as exc:
            self._fail(cmd, handle, exc)

    def _write(self, flags: int, handle: int, offset: int, length: int,
               payload: memoryview) -> None:
        problem = self._validate(P.CMD_WRITE, flags, offset, length)
        if problem is None and offset + length > self.device.size:
            self._error(P.CMD_WRITE, handle, P.ENOSPC,
                        f"[{offset}, {offset + length}) is beyond the end of the device")
            return
        if problem is not None:
            self._error(P.CMD_WRITE, handle, P.EINVAL, problem)
            return
        fua = bool(flags & P.CMDF_FUA)
        if not self.device.local:
            # the payload lives in the receive buffer, which is reused: copy it
            data = bytes(payload)
            if not self._write_remote(flags, handle, offset, data):  # else a task
                self._spawn(self._dispatch_async, P.CMD_WRITE, flags, handle, offset, length,
                            data)
            return
        if not (offset | length) & 511 and not self.readonly:
            # aligned writes of one receive are committed together (_commit_writes)
            self._wbatch.append((offset, payload))
            self._whandles.append(handle)
            if fua:
                self._wfua.append(len(self._wbatch) - 1)
            return
        self._commit_writes()
        self._write_one(handle, offset, payload, fua)

    def _write_one(self, handle: int, offset: int, payload: memoryview, fua: bool) -> None:
        try:
            if self.readonly:
                raise IOFailure(errno.EPERM, "read-only export")
            self.device.write(offset, payload)
        except Exception as exc:
            self._fail(P.CMD_WRITE, handle, exc)
            return
        if fua:
            self._durable_reply(P.CMD_WRITE, [handle])
        else:
            self._ok(handle)

    def _commit_writes(self) -> None:
        """Apply the batched writes in order, then queue their replies.

        Called before any other request is served (so it sees the writes)
        and before the receive buffer their payloads live in is reused.
        """
        batch = self._wbatch
        if not batch:
            return
        # the lists are emptied in place: _serve holds their append methods
        handles, fua = self._whandles, self._wfua
        try:
            # checked: every write here is aligned, non-empty and in range
            # (_serve and _write check), and the export is writable
            self.device.write_batch(batch, checked=True)
        except Exception:
            items = list(zip(handles, batch, [i in fua for i in range(len(batch))]))
            batch.clear()
            handles.clear()
            fua.clear()
            for handle, (offset, payload), durable in items:  # one by one, for exact errors
                self._write_one(handle, offset, payload, durable)
            return
        batch.clear()
        out = self._out
        if fua:
            durable = set(fua)
            pack = P.SIMPLE_REPLY.pack
            magic = P.SIMPLE_REPLY_MAGIC
            for i, handle in enumerate(handles):
                if i not in durable:
                    out.append(pack(magic, 0, handle))
            self._out_bytes += P.SIMPLE_REPLY.size * (len(handles) - len(fua))
            self._durable_reply(P.CMD_WRITE, [handles[i] for i in fua])
            fua.clear()
        else:
            out.append(b"".join(map(_OK_REPLY, handles)))  # one buffer for all
            self._out_bytes += P.SIMPLE_REPLY.size * len(handles)
        handles.clear()

    async def _dispatch_async(self, cmd: int, flags: int, handle: int, offset: int,
                              length: int, payload: bytes | None) -> None:
        """Serve a request in a worker thread (a stack with a remote layer)."""
        device = self.device
        fua = bool(flags & P.CMDF_FUA)
        try:
            if cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) and self.readonly:
                raise IOFailure(errno.EPERM, "read-only export")
            if cmd == P.CMD_WRITE:
                assert payload is not None
                if device.top.local and not (offset | length) & 511:
                    # a local top (a change file over the remote): as on a local
                    # stack, an aligned write is written inline, no thread hop
                    device.write(offset, payload)
                else:
                    await device.awrite(offset, payload)
            elif cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                trim = cmd == P.CMD_TRIM
                await trio.to_thread.run_sync(
                    lambda: device.zero(offset, length, trim=trim,
                                        no_hole=bool(flags & P.CMDF_NO_HOLE),
                                        fast=bool(flags & P.CMDF_FAST_ZERO)))
            elif cmd == P.CMD_BLOCK_STATUS:
                runs = None
                if self.contexts:
                    runs = await trio.to_thread.run_sync(
                        device.block_status, offset, min(length, MAX_STATUS_SPAN))
                self._block_status(flags, handle, offset, length, runs)
                await self._flush()
                return
            elif cmd == P.CMD_CACHE:
                await trio.to_thread.run_sync(device.cache, offset, length)
            if fua:
                await device.aflush()
        except Exception as exc:
            self._fail(cmd, handle, exc)
        else:
            self._ok(handle)
        await self._flush()

    def _block_status(self, flags: int, handle: int, offset: int, length: int,
                      runs: list[tuple[int, State, int]] | None = None) -> None:
        if not self.contexts:
            self._error(P.CMD_BLOCK_STATUS, handle, P.EINVAL, "no metadata context negotiated")
            return
        if runs is None:
            runs = self.device.block_status(offset, min(length, MAX_STATUS_SPAN))
        items = list(self.contexts.items())
        for i, (cid, name) in enumerate(items):
            if name == P.CONTEXT_BASE_ALLOCATION:
                desc = _merge([(n, 0 if st == State.DATA else P.STATE_HOLE | P.STATE_ZERO)
                               for n, st, _ in runs])
            else:
                desc = _merge([(n, depth) for n, _, depth in runs])
            if flags & P.CMDF_REQ_ONE:
                desc = desc[:1]
            self._queue(P.block_status_chunk(handle, cid, desc, done=i == len(items) - 1))

    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def _write_remote(self, flags: int, handle: int, offset: int, payload: bytes) -> bool:
        """Start a write to a remote top layer (``-N``) with no task (Device.write_start).

        Its reply is queued by the remote connection's reader, like a remote
        read's.  A FUA write goes this way when the remote takes FUA itself.
        False: start nothing (unaligned, FUA the remote cannot do in the same
        request, not such a stack).
        """
        if self.readonly:
            return False

        def done(exc: BaseException | None) -> None:
            if exc is None:
                self._ok(handle)
            else:
                self._fail(P.CMD_WRITE, handle, exc)
            self._remote_done()

        try:
            started = self.device.write_start(offset, payload, done,
                                              fua=bool(flags & P.CMDF_FUA))
            if not started:
                return False
        except Exception as exc:
            self._fail(P.CMD_WRITE, handle, exc)
            return True
        if started == WRITTEN:  # done already (-X's cache): replied with this receive's
            self._ok(handle)
            return True
        self._remote_inflight += 1
        if self._sender_lot is None:
            self._start_sender()
        return True

    def _start_sender(self) -> None:
        if self._sender_lot is None:
            self._sender_lot = trio.lowlevel.ParkingLot()
            self._spawn(self._sender)
            if REMOTE_SNDBUF:
                try:  # whole large replies fit: fewer waits for the client
                    self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, REMOTE_SNDBUF)
                except OSError:
                    pass

    def _read_remote(self, handle: int, offset: int, length: int) -> bool:
        """Start a read of a stack with a remote layer with no task (Device.read_start).

        The remote connection's reader queues the reply and wakes this
        connection's sender (``_kick``), which sends every reply queued
        since it last ran at once.  False: start nothing, use _read_async.
        """
        def done(exc: BaseException | None) -> None:
            if exc is None:
                self._read_reply(handle, offset, data)
            else:
                self._fail(P.CMD_READ, handle, exc)
            self._remote_done()

        try:
            started = self.device.read_start(offset, length, done,
                                             splice=length >= SENDFILE_MIN)
        except Exception as exc:
            self._fail(P.CMD_READ, handle, exc)
            return True
        if started is None:
            return False
        data, waiting = started
        if not isinstance(data, (bytearray, memoryview)):
            data = _Spliced(data)  # the data waits in a pipe: sent with splice
        if waiting:
            self._remote_inflight += 1
            if self._sender_lot is None:
                self._start_sender()
        else:
            self._read_reply(handle, offset, data)
        return True

    def _remote_done(self) -> None:
        """A remote request's reply is queued: wake the sender; the last one
        in flight also wakes _remote_drain."""
        self._remote_inflight -= 1
        self._kick()
        if not self._remote_inflight and self._drained_remote is not None:
            self._drained_remote.set()

    def _kick(self) -> None:
        """Have the sender send what is queued, once the current task yields."""
        if not self._kicked:
            self._kicked = True
            if self._sender_lot is not None:
                self._sender_lot.unpark()

    async def _sender(self) -> None:
        """Sends the replies of remote reads (_read_remote), a batch at a time."""
        lot = self._sender_lot
        assert lot is not None
        while True:
            if not self._kicked:
                await lot.park()
            self._kicked = False
            await self._flush()
            if self._sender_exit:
                return

    async def _remote_drain(self) -> None:
        """Wait for the remote requests still in flight (replies queued); stop the sender."""
        if self._remote_inflight:
            self._drained_remote = trio.Event()
            await self._drained_remote.wait()
        self._sender_exit = True
        self._kick()

    async def _read_async(self, handle: int, offset: int, length: int) -> None:
        try:
            data = await self.device.aread(offset, length)
        except Exception as exc:
            self._fail(P.CMD_READ, handle, exc)
        else:
            self._read_reply(handle, offset, data)
        await self._flush()

    def _durable_reply(self, cmd: int, handles: list[int]) -> None:
        """Answer ``handles`` (a FLUSH, or FUA writes) once what they wrote is durable.

        At once when nothing is pending (``Device.flush_pending``); on the
        event loop for the only client of a local stack, which waits for
        this anyway (a thread round trip costs ~130 us here, about as much
        as the ``fdatasync``); else in a worker thread.
        """
        if not self.device.flush_pending():
            self._answer(cmd, handles, None)
        elif self._lone():
            try:
                self.device.flush()
            except Exception as exc:
                self._answer(cmd, handles, exc)
            else:
                self._answer(cmd, handles, None)
        else:
            self._spawn(self._flush_async, cmd, handles)

    async def _flush_async(self, cmd: int, handles: list[int]) -> None:
        try:
            await self.device.aflush()
        except Exception as exc:
            self._answer(cmd, handles, exc)
        else:
            self._answer(cmd, handles, None)
        await self._flush()

    def _answer(self, cmd: int, handles: list[int], exc: BaseException | None) -> None:
        for handle in handles:
            if exc is None:
                self._ok(handle)
            else:
                self._fail(cmd, handle, exc)


def _merge(desc: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, f in desc:
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, f))
    return out
