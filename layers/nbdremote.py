"""The NBD layer: a remote NBD export (nbdkit, qemu-nbd, nbd-server, another LBD).

``-n TARGET`` read-only, ``-N TARGET`` writable (write-through), ``-X TARGET``
writable with a write-back cache that assumes this LBD is the export's only
writer.  TARGET is ``HOST:PORT``, ``[IPv6]:PORT``, ``nbd://HOST[:PORT]/EXPORT``
or ``nbd+unix:///EXPORT?socket=PATH``.

The layer is not local (``local = False``): ``read_present(nowait=True)``
raises :class:`~lbd.errors.WouldBlock` unless the cache holds the whole
range.  Reads from the event loop start with :meth:`NBDLayer.read_submit`
(or :meth:`NBDLayer.read_splice`, the data in a pipe) and end in a callback,
with no task; so do aligned ``-N`` writes (:meth:`NBDLayer.write_submit`;
a ``-X`` one goes into the cache at once); other writes await
:meth:`NBDLayer.awrite`; the frontends call everything else in worker
threads, where this layer blocks on the network
(:mod:`lbd.layers.nbdclient`).  Requests larger than the remote's
maximum block size are split and sent all at once.

Caches (:mod:`lbd.layers.blockcache`): ``-n`` with ``--nbd-cache SIZE`` keeps
remote reads in memory; ``-X`` always has a cache (``--nbd-cache``, default
64 MiB) holding both reads and writes.  Its dirty data is written back on
FLUSH, on FUA, when the cache is full of it, and at shutdown, and it is only
forgotten once the remote has acknowledged a FLUSH after the write-back.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from lbd import protocol as P
from lbd.errors import ConfigError, IOFailure, WouldBlock
from lbd.layer import FILLED, ID_IMAGE, WRITTEN, Buffer, Identity, Layer, State

from .blockcache import BlockCache
from .flat import fingerprint
from .nbdclient import PipeData, RemoteClient, Request, Target, parse_target

log = logging.getLogger(__name__)

SECTOR = 512
DEFAULT_WRITEBACK_CACHE = 64 << 20
CLOSE_TIMEOUT = 300.0  # how long shutdown keeps trying to write back dirty data
MAX_REQUEST = 32 << 20  # never more per request, whatever the server allows
MAX_STATUS = 1 << 30  # block status asks for at most this much at once
ASYNC_CONNECTIONS = int(os.environ.get("LBD_NBD_CONNECTIONS", "4"))  # event-loop reads


class _Reader:
    """What flat.fingerprint needs: ``pread(length, offset)``."""

    def __init__(self, layer: NBDLayer) -> None:
        self.layer = layer

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.layer._remote_read(offset, memoryview(buf))
        return bytes(buf)


class NBDLayer(Layer):
    kind = "nbd"
    local = False

    def __init__(self, target: Target | str, size: int, writable: bool, *,
                 writeback: bool = False, cache: int = 0, timeout: float = 30.0,
                 keepalive: float = 5.0) -> None:
        super().__init__(size, writable or writeback)
        if isinstance(target, str):
            target = parse_target(target, "-X" if writeback else "-N" if writable else "-n")
        self.target = target
        self.writeback = writeback
        self.flag = "-X" if writeback else "-N" if writable else "-n"
        self.client = RemoteClient(target, timeout=timeout, writable=self.writable,
                                   what=self.flag, keepalive=keepalive)
        # Reads from the event loop go on connections of their own (no threads).
        # A writable remote must promise that every connection sees the others'
        # writes (CAN_MULTI_CONN); the read-only case needs no promise.
        export = self.client.open(ASYNC_CONNECTIONS)
        try:
            if export.size != size:
                raise ConfigError(
                    f"{self.flag} {target}: the remote export is {export.size} bytes but the "
                    f"device is {size} bytes; an NBD layer must be exactly the device size"
                    + (f" (use -s {export.size})" if export.size % SECTOR == 0 else ""))
            if self.writable and export.readonly:
                raise ConfigError(f"{self.flag} {target}: the remote export is read-only; "
                                  "use -n for a read-only layer (with a change file on top)")
            if export.min_block > SECTOR:
                raise ConfigError(f"{self.flag} {target}: the remote needs requests aligned "
                                  f"to {export.min_block} bytes; LBD sends 512-byte sectors")
        except BaseException:
            self.client.close()
            raise
        self.export = export
        mx = min(export.max_block, MAX_REQUEST)
        self.max_block = max(SECTOR, mx - mx % max(export.preferred_block, SECTOR)
                             if mx >= export.preferred_block else mx - mx % SECTOR)
        if writeback:
            cache = cache or DEFAULT_WRITEBACK_CACHE
        self.bcache = BlockCache(cache) if cache else None
        self._wb_lock = threading.Lock()  # write-backs and zeroing, one at a time
        self._awb: trio.Event | None = None  # set when the event loop's write-back ends
        self._identity: Identity | None = None
        self._dirty = False  # -N: written since the last flush
        log.info("%s %s: %d bytes, %s, %s replies, max request %d%s%s", self.flag, target,
                 export.size, "read-only" if export.readonly else "writable",
                 "structured" if export.structured else "simple", self.max_block,
                 ", block status" if export.allocation_context is not None else "",
                 f", cache {self.bcache.capacity >> 20} MiB" if self.bcache else "")

    # -- description ------------------------------------------------------------------

    def describe(self) -> str:
        return str(self.target)

    def identity(self) -> Identity:
        """The remote's content fingerprint: the same sampling as a flat image's.

        A change file made over a flat copy of the image fits the remote
        serving that image, and the other way round.
        """
        if self._identity is None or self.writable:
            if self.writeback:
                self._write_back()  # the fingerprint is taken from the remote itself
            self._identity = Identity(ID_IMAGE, fingerprint(_Reader(self), self.size),  # type: ignore[arg-type]
                                      self.target.export or str(self.target))
        return self._identity

    def info(self) -> dict[str, Any]:
        d = super().info()
        remote: dict[str, Any] = {"connected": self.client.connected,
                                  "reconnects": self.client.reconnects,
                                  "uri": self.target.uri}
        if self.client.last_error:
            remote["last_error"] = self.client.last_error
        if self.bcache is not None:
            remote["cache"] = {"capacity": self.bcache.capacity, "used": self.bcache.size,
                               "dirty": self.bcache.dirty_bytes(), "hits": self.bcache.hits,
                               "misses": self.bcache.misses, "writeback": self.writeback}
        d["remote"] = remote
        return d

    # -- remote requests -----------------------------------------------------------------

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        mb = self.max_block
        return [(o, min(mb, offset + length - o)) for o in range(offset, offset + length, mb)]

    def _read_requests(self, offset: int, view: memoryview) -> list[Request]:
        return [Request(P.CMD_READ, o, n, view=view[o - offset:o - offset + n])
                for o, n in self._pieces(offset, len(view))]

    def _write_requests(self, offset: int, buffers: Sequence[Buffer], nbytes: int,
                        fua: bool) -> tuple[int, list[Request]]:
        """The WRITE requests for one write, split to the remote's maximum block
        size, and their flags (FUA only where the remote takes it)."""
        flags = P.CMDF_FUA if fua and self.export.can(P.TF_SEND_FUA) else 0
        if nbytes <= self.max_block:
            return flags, [Request(P.CMD_WRITE, offset, nbytes, flags, payload=list(buffers))]
        whole = b"".join(buffers) if len(buffers) > 1 else buffers[0]
        mv = memoryview(whole).cast("B")
        return flags, [Request(P.CMD_WRITE, o, n, flags, payload=[mv[o - offset:o - offset + n]])
                       for o, n in self._pieces(offset, nbytes)]

    def _remote_read(self, offset: int, view: memoryview) -> None:
        self.client.call(self._read_requests(offset, view))

    def _remote_write(self, offset: int, buffers: Sequence[Buffer], nbytes: int,
                      fua: bool) -> None:
        flags, reqs = self._write_requests(offset, buffers, nbytes, fua)
        self.client.call(reqs)
        if fua and not flags:
            self._remote_flush()

    def _remote_flush(self) -> None:
        if self.export.can(P.TF_SEND_FLUSH):
            self.client.call([Request(P.CMD_FLUSH, 0, 0)])

    def _remote_zero(self, offset: int, length: int, *, may_trim: bool, fast: bool,
                     fua: bool) -> None:
        ex = self.export
        flags = P.CMDF_FUA if fua and ex.can(P.TF_SEND_FUA) else 0
        if ex.can(P.TF_SEND_WRITE_ZEROES):
            if not may_trim:
                flags |= P.CMDF_NO_HOLE
            if fast:
                if not ex.can(P.TF_SEND_FAST_ZERO):
                    raise IOFailure(errno.ENOTSUP, f"{self.target}: the remote cannot tell "
                                    "whether zeroing is fast")
                flags |= P.CMDF_FAST_ZERO
            self.client.call([Request(P.CMD_WRITE_ZEROES, o, n, flags)
                              for o, n in self._pieces(offset, length)])
        else:
            if fast:
                raise IOFailure(errno.ENOTSUP, f"{self.target}: the remote has no "
                                "WRITE_ZEROES; zeroing means writing zeros")
            chunk = bytes(min(length, self.max_block))
            for o, n in self._pieces(offset, length):
                self.client.call([Request(P.CMD_WRITE, o, n, flags,
                                          payload=[memoryview(chunk)[:n]])])
        if fua and not flags & P.CMDF_FUA:
            self._remote_flush()

    # -- reads --------------------------------------------------------------------------

    def read_present(self, offset: int, view: memoryview, nowait: bool) -> list[tuple[int, int]]:
        cache = self.bcache
        if cache is None:
            if nowait:
                raise WouldBlock
            self._remote_read(offset, view)
        else:
            missing = cache.lookup(offset, view)
            if missing:
                if nowait:
                    raise WouldBlock
                for o, n in missing:
                    fill = cache.begin_fill(o, n)
                    part = view[o - offset:o - offset + n]
                    try:
                        self._remote_read(o, part)
                    except BaseException:
                        cache.end_fill(fill, None)
                        raise
                    cache.end_fill(fill, part)
        self.reads += 1
        self.read_bytes += len(view)
        return []

    async def aread_present(self, offset: int, view: memoryview) -> list[tuple[int, int]]:
        """The event loop's read: requests go out and replies come back without a thread."""
        if not self.client.aconns:
            return await super().aread_present(offset, view)  # a worker thread
        cache = self.bcache
        if cache is None:
            await self.client.acall(self._read_requests(offset, view))
        else:
            for o, n in cache.lookup(offset, view):
                fill = cache.begin_fill(o, n)
                part = view[o - offset:o - offset + n]
                try:
                    await self.client.acall(self._read_requests(o, part))
                except BaseException:
                    cache.end_fill(fill, None)
                    raise
                cache.end_fill(fill, part)
        self.reads += 1
        self.read_bytes += len(view)
        return []

    def read_submit(self, pieces: list[tuple[int, memoryview]],
                    done: Callable[[BaseException | None], object]) -> bool | str:
        """Start reading ``pieces`` (offset, buffer) from the remote; no task waits.

        ``done(None)`` or ``done(exc)`` is called from the event loop once
        every piece is in its buffer (:meth:`RemoteClient.submit`).  False
        (nothing started) when this path cannot serve it: no event-loop
        connection up; the caller then uses ``aread_present``.  With a cache,
        what it holds is copied at once and only the rest is asked for; if
        it held everything, :data:`~lbd.layer.FILLED` (no callback follows).
        """
        if self.bcache is not None:
            return self._read_submit_cached(pieces, done)
        if len(pieces) == 1:
            o, v = pieces[0]
            n = len(v)
            reqs = ([Request(P.CMD_READ, o, n, view=v)] if n <= self.max_block
                    else self._read_requests(o, v))
        else:
            n = sum(len(v) for _, v in pieces)
            reqs = [r for o, v in pieces for r in self._read_requests(o, v)]
        if not self.client.submit(reqs, done):
            return False
        self.reads += 1
        self.read_bytes += n
        return True

    def _read_submit_cached(self, pieces: list[tuple[int, memoryview]],
                            done: Callable[[BaseException | None], object]) -> bool | str:
        cache = self.bcache
        assert cache is not None
        if not self.client.aconns:
            return False
        fills: list[tuple[Any, memoryview]] = []
        reqs: list[Request] = []
        n = 0
        for o, v in pieces:
            n += len(v)
            for mo, mn in cache.lookup(o, v):  # copies what the cache holds into v
                part = v[mo - o:mo - o + mn]
                fills.append((cache.begin_fill(mo, mn), part))
                reqs += self._read_requests(mo, part)

        def filled(exc: BaseException | None) -> object:
            for fill, part in fills:
                cache.end_fill(fill, None if exc is not None else part)
            return done(exc)

        if reqs and not self.client.submit(reqs, filled):
            for fill, _part in fills:
                cache.end_fill(fill, None)
            return False
        self.reads += 1
        self.read_bytes += n
        return True if reqs else FILLED  # FILLED: all in the cache, no callback follows

    def read_submit1(self, offset: int, view: memoryview,
                     done: Callable[[BaseException | None], object]) -> bool | str:
        """:meth:`read_submit` of one piece (the common case, with less work)."""
        n = len(view)
        if self.bcache is not None or n > self.max_block:
            return self.read_submit([(offset, view)], done)
        if not self.client.submit1(Request(P.CMD_READ, offset, n, view=view), done):
            return False
        self.reads += 1
        self.read_bytes += n
        return True

    def read_splice(self, offset: int, length: int,
                    done: Callable[[BaseException | None], object]) -> PipeData | None:
        """Start reading ``[offset, offset + length)`` into a pipe (:class:`PipeData`).

        For a frontend that sends the data on with ``send_inline``: the bytes
        go from the remote's socket to the client's with no copy through
        Python.  ``done`` as with :meth:`read_submit`.  None (nothing
        started) when this path does not apply.
        """
        if self.bcache is not None or length > self.max_block:
            return None
        data = PipeData.make(length)
        if data is None:
            return None
        req = Request(P.CMD_READ, offset, length)
        req.pipe = data
        if not self.client.submit([req], done):
            return None  # the pipe goes back to the pool when data is dropped
        self.reads += 1
        self.read_bytes += length
        return data

    def extents(self, offset: int, length: int) -> list[tuple[int, int, State]]:
        out = self._remote_extents(offset, length)
        if self.bcache is not None and self.writeback:
            held = self.bcache.held_ranges(offset, length)
            if held:
                out = _overlay(out, held)
        return out

    def _remote_extents(self, offset: int, length: int) -> list[tuple[int, int, State]]:
        if self.export.allocation_context is None:
            return [(offset, length, State.DATA)]
        out: list[tuple[int, int, State]] = []
        pos, end = offset, offset + length
        while pos < end:
            req = Request(P.CMD_BLOCK_STATUS, pos, min(end - pos, MAX_STATUS))
            self.client.call([req])
            start = pos
            for n, flags in req.descs:
                n = min(n, end - pos)
                if n <= 0:
                    break
                state = State.ZERO if flags & P.STATE_ZERO else State.DATA
                if out and out[-1][2] == state and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n, state)
                else:
                    out.append((pos, n, state))
                pos += n
            if pos == start:  # nothing useful came back: say data, never loop
                out.append((pos, end - pos, State.DATA))
                pos = end
        # keep every extent sector-aligned, as the device expects
        return _align(out, offset, end)

    # -- writes ---------------------------------------------------------------------------

    def write(self, offset: int, buffers: Sequence[Buffer], nbytes: int, fua: bool) -> None:
        if self.writeback:
            assert self.bcache is not None
            while not self.bcache.write(offset, buffers, nbytes):
                self._write_back()  # full of dirty data: make room
            if fua:
                self.flush()
        else:
            self._dirty = True
            self._remote_write(offset, buffers, nbytes, fua)
            if self.bcache is not None:
                self.bcache.drop(offset, nbytes)
        self.writes += 1
        self.written_bytes += nbytes

    async def awrite(self, offset: int, buffers: Sequence[Buffer], nbytes: int,
                     fua: bool) -> None:
        """-N writes from the event loop go out on its connections, like reads.

        A ``-X`` write waits for room in the cache: the event loop writes the
        cache back (:meth:`_awrite_back`) when it is full of dirty data.
        """
        if self.writeback and not fua and self.client.aconns:
            assert self.bcache is not None
            while not self.bcache.write(offset, buffers, nbytes):
                await self._awrite_back()
            self.writes += 1
            self.written_bytes += nbytes
            return
        if self.writeback or not self.client.aconns:
            await super().awrite(offset, buffers, nbytes, fua)  # a worker thread
            return
        self._dirty = True
        flags, reqs = self._write_requests(offset, buffers, nbytes, fua)
        try:
            await self.client.acall(reqs)
        finally:
            self._dirty = True  # a FLUSH that ran meanwhile may not cover this write
        if self.bcache is not None:
            self.bcache.drop(offset, nbytes)  # after: a fill racing the write goes stale
        if fua and not flags:
            await trio.to_thread.run_sync(self._remote_flush)
        self.writes += 1
        self.written_bytes += nbytes

    def write_submit(self, offset: int, data: Buffer,
                     done: Callable[[BaseException | None], object],
                     fua: bool = False) -> bool | str:
        """Start a ``-N`` write on the event loop's connections; no task waits.

        ``done(None)`` or ``done(exc)`` once the remote has answered (as
        :meth:`read_submit`).  With ``-X`` the data goes into the cache at once:
        :data:`~lbd.layer.WRITTEN`, and no callback.  False (nothing started) when the
        ``-X`` cache is full of dirty data or no event-loop connection is up,
        and for a FUA write the remote cannot take in the same request (and
        any FUA write to ``-X``): use :meth:`awrite`.
        """
        if not self.writable:
            return False
        nbytes = len(data)
        if self.writeback:
            if fua:  # needs a write-back and FLUSH first: awrite
                return False
            # -X: into the cache, at once, unless it is full of dirty data
            # (then the caller's awrite waits for a write-back)
            assert self.bcache is not None
            cache = self.bcache
            if not cache.write(offset, [data], nbytes):
                return False
            self.writes += 1
            self.written_bytes += nbytes
            if (self._awb is None and self.client.aconns
                    and cache.dirty_blocks * 2 >= cache.capacity_blocks):
                # half full of dirty data: write it back in the background, so
                # new writes find room instead of waiting for a write-back
                self._awb = trio.Event()
                trio.lowlevel.spawn_system_task(self._awrite_back_bg,
                                                name=f"{self.flag} write-back")
            return WRITTEN
        if not self.client.aconns:
            return False
        flags, reqs = self._write_requests(offset, [data], nbytes, fua)
        if fua and not flags:  # the remote has no FUA: awrite flushes after the write
            return False

        def finished(exc: BaseException | None) -> object:
            if self.bcache is not None:
                self.bcache.drop(offset, nbytes)  # after: a fill racing the write goes stale
            # dirty again once answered: a FLUSH that started while this write
            # was in flight (and cleared the flag) may not cover it
            self._dirty = True
            if exc is None:
                self.writes += 1
                self.written_bytes += nbytes
            return done(exc)

        self._dirty = True
        return self.client.submit(reqs, finished)

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool, fast: bool,
             fua: bool) -> None:
        # A trimmed range reads as zeros in LBD: send WRITE_ZEROES (which may punch)
        with self._wb_lock:
            if self.bcache is not None:
                self.bcache.drop(offset, length)
            self._dirty = True
            self._remote_zero(offset, length, may_trim=trim or not no_hole, fast=fast,
                              fua=fua)

    def flush(self) -> None:
        if self.writeback:
            self._write_back()
        elif self._dirty:
            self._dirty = False
            try:
                self._remote_flush()
            except BaseException:
                self._dirty = True
                raise

    def _write_back_requests(self, runs: list[tuple[int, bytearray]]) -> list[Request]:
        """WRITE requests for the dirty runs of ``BlockCache.take_dirty``, split
        to the remote's maximum block size."""
        return [Request(P.CMD_WRITE, o, n, payload=[memoryview(data)[o - off:o - off + n]])
                for off, data in runs for o, n in self._pieces(off, len(data))]

    def _write_back(self) -> None:
        """Write every dirty sector to the remote, then FLUSH it; only then forget them."""
        assert self.bcache is not None
        with self._wb_lock:
            while True:
                connects = self.client.connects
                runs = self.bcache.take_dirty()
                ok = False
                try:
                    reqs = self._write_back_requests(runs)
                    if reqs:
                        self.client.call(reqs)
                    if reqs or self._dirty:
                        self._dirty = False
                        self._remote_flush()
                    # Writes acknowledged on a connection that has since been lost
                    # may not have survived the server: write them all again.
                    ok = self.client.connects == connects
                finally:
                    self.bcache.written(ok)
                if ok:
                    break
                self._dirty = True
                log.warning("%s %s: the connection was remade during a write-back; writing "
                            "back again", self.flag, self.target)
            if runs:
                log.debug("%s %s: wrote back %d bytes", self.flag, self.target,
                          sum(len(d) for _, d in runs))

    async def _awrite_back_bg(self) -> None:
        try:
            await self._awrite_back(started=True)
        except Exception as exc:  # the data stays dirty: FLUSH or the next write-back retries
            log.warning("%s %s: writing back in the background failed: %s", self.flag,
                        self.target, exc)

    async def _awrite_back(self, started: bool = False) -> None:
        """:meth:`_write_back` on the event loop's connections, without threads.

        One at a time: a caller that finds one running waits for it to end.
        ``started``: the caller has already set ``_awb`` (the background task).
        """
        assert self.bcache is not None
        if self._awb is not None and not started:
            await self._awb.wait()
            return
        if self._awb is None:
            self._awb = trio.Event()
        ev = self._awb
        try:
            if not self._wb_lock.acquire(blocking=False):
                # a worker thread is writing back (a FLUSH): wait for it, then go on
                await trio.to_thread.run_sync(self._wb_lock.acquire)
            try:
                await self._awrite_back_locked()
            finally:
                self._wb_lock.release()
        finally:
            self._awb = None
            ev.set()

    async def _awrite_back_locked(self) -> None:
        assert self.bcache is not None
        client = self.client
        connects, losses = client.connects, client.aconn_losses
        runs = self.bcache.take_dirty()
        ok = False
        try:
            reqs = self._write_back_requests(runs)
            if reqs:
                await client.acall(reqs)
            if reqs or self._dirty:
                self._dirty = False
                if self.export.can(P.TF_SEND_FLUSH):
                    await client.acall([Request(P.CMD_FLUSH, 0, 0)])
            # Writes acknowledged on a connection lost since may not have
            # survived the server: they stay dirty and are written again.
            ok = client.connects == connects and client.aconn_losses == losses
        finally:
            self.bcache.written(ok)
            if not ok:
                self._dirty = True

    def cache(self, offset: int, length: int) -> None:
        """Prefetch into our cache, or ask the remote to (NBD_CMD_CACHE)."""
        if self.bcache is not None:
            buf = bytearray(length)
            self.read_present(offset, memoryview(buf), False)
        elif self.export.can(P.TF_SEND_CACHE):
            self.client.call([Request(P.CMD_CACHE, o, n)
                              for o, n in self._pieces(offset, length)])

    def close(self) -> None:
        try:
            if self.writeback:
                self._close_write_back()
            elif self._dirty:
                self.flush()
        finally:
            self.client.close()

    def _close_write_back(self) -> None:
        assert self.bcache is not None
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            try:
                self._write_back()
                return
            except IOFailure as exc:
                left = deadline - time.monotonic()
                dirty = self.bcache.dirty_bytes()
                if left <= 0:
                    raise IOFailure(errno.EIO, f"{self.flag} {self.target}: {dirty} bytes of "
                                    f"written data could not be written back: {exc}") from exc
                log.error("%s %s: writing back %d dirty bytes at shutdown failed (%s); "
                          "retrying for %d s more", self.flag, self.target, dirty, exc, left)
                time.sleep(min(1.0, left))


def _overlay(runs: list[tuple[int, int, State]],
             held: list[tuple[int, int]]) -> list[tuple[int, int, State]]:
    """``runs`` with the ``held`` ranges marked DATA."""
    out: list[tuple[int, int, State]] = []
    for o, n, st in runs:
        pos, end = o, o + n
        for h0, hn in held:
            h1 = h0 + hn
            if h1 <= pos or h0 >= end:
                continue
            if h0 > pos:
                out.append((pos, h0 - pos, st))
            a, z = max(h0, pos), min(h1, end)
            out.append((a, z - a, State.DATA))
            pos = z
        if pos < end:
            out.append((pos, end - pos, st))
    merged: list[tuple[int, int, State]] = []
    for o, n, st in out:
        if merged and merged[-1][2] == st and merged[-1][0] + merged[-1][1] == o:
            merged[-1] = (merged[-1][0], merged[-1][1] + n, st)
        else:
            merged.append((o, n, st))
    return merged


def _align(runs: list[tuple[int, int, State]], offset: int,
           end: int) -> list[tuple[int, int, State]]:
    """Round extent edges to sectors: a sector partly data is data."""
    out: list[tuple[int, int, State]] = []
    for o, n, st in runs:
        a = o - o % SECTOR if st == State.DATA else -(-o // SECTOR) * SECTOR
        z = -(-(o + n) // SECTOR) * SECTOR if st == State.DATA else (o + n) - (o + n) % SECTOR
        if out:
            a = max(a, out[-1][0] + out[-1][1])
        a, z = max(a, offset), min(z, end)
        if z <= a:
            continue
        if out and out[-1][0] + out[-1][1] < a:  # a gap left by rounding: data
            g = out[-1][0] + out[-1][1]
            out.append((g, a - g, State.DATA))
        if out and out[-1][2] == st and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + z - a, st)
        else:
            out.append((a, z - a, st))
    if out and out[-1][0] + out[-1][1] < end:
        g = out[-1][0] + out[-1][1]
        out.append((g, end - g, State.DATA))
    return out
