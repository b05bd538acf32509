"""The device: a fixed-size stack of layers over an implicit null layer.

This is the engine both frontends drive.  It validates every request once
(range, read-only, alignment), routes reads run by run to the topmost layer
holding each sector, sends writes to the top layer, and answers which ranges
are data or zero and at which depth they live.  It knows nothing of NBD or
FUSE.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import trio

from lbd.errors import IOFailure, WouldBlock
from lbd.layer import FILLED, WRITTEN, Buffer, Layer, State
from lbd.layers.null import NullLayer

SECTOR = 512
_MASK = SECTOR - 1


class Device:
    """A stack of layers, bottom first in ``layers``; the null layer is added below."""

    def __init__(self, size: int, layers: list[Layer]) -> None:
        if size <= 0 or size % SECTOR:
            raise ValueError(f"device size must be a positive multiple of 512, not {size}")
        for layer in layers[:-1]:
            if layer.writable:
                raise ValueError("only the topmost layer may be writable")
        self.size = size
        self._null = NullLayer(size)
        self._stack: list[Layer] = [*reversed(layers), self._null]  # top first
        self.local = all(layer.local for layer in self._stack)

    # -- the stack -------------------------------------------------------------
    #
    # ``local`` is True when every layer does only local file I/O.  Then the
    # synchronous calls (write, zero, cache, block_status) are short enough
    # for a frontend to make on its event loop.  When it is False (a remote
    # NBD or RBD layer), any call except ``read(nowait=True)`` and ``locate``
    # may wait on a network: frontends run them in worker threads.

    @property
    def layers(self) -> list[Layer]:
        """Every layer, top first, the null layer last."""
        return list(self._stack)

    @property
    def top(self) -> Layer:
        return self._stack[0]

    @property
    def writable(self) -> bool:
        return self._stack[0].writable

    def push_layer(self, layer: Layer) -> Layer:
        """Make ``layer`` the new top; the old top becomes read-only.

        The swap happens between two requests of the event loop, so a write
        acknowledged before it is in the old top and one after it in the new.
        The caller flushes the old top (returned) afterwards.
        """
        old = self._stack[0]
        old.writable = False
        self._stack.insert(0, layer)
        self.local = self.local and layer.local
        return old

    def info(self) -> list[dict[str, Any]]:
        return [layer.info() for layer in self._stack]

    # -- validation ----------------------------------------------------------------

    def _check(self, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise IOFailure(errno.ENOSPC if write else errno.EINVAL,
                            f"request [{offset}, {offset + length}) is beyond the end of the "
                            f"device ({self.size} bytes)")
        if write and not self._stack[0].writable:
            raise IOFailure(errno.EPERM, "the device is read-only")

    # -- reads -------------------------------------------------------------------

    def read(self, offset: int, length: int, nowait: bool = False) -> bytearray | memoryview:
        """Read ``length`` bytes at ``offset`` through the stack.

        With ``nowait``, raises :class:`WouldBlock` instead of waiting for
        data that is not in the page cache.
        """
        self._check(offset, length, write=False)
        a0 = offset & ~_MASK
        a1 = (offset + length + _MASK) & ~_MASK
        buf = bytearray(a1 - a0)
        if a1 > a0:
            self._read_aligned(a0, memoryview(buf), nowait)
        if a0 == offset and a1 == offset + length:
            return buf
        return memoryview(buf)[offset - a0:offset - a0 + length]

    def read_cached(self, offset: int, length: int) -> bytearray | memoryview:
        """``read(offset, length, nowait=True)`` for a range the caller has checked.

        The frontends' hot path for small reads: when one layer holds the
        whole range as one piece, it is read straight into the buffer that
        is returned, with no per-layer bookkeeping.  Raises
        :class:`WouldBlock` for data outside the page cache.
        """
        if not (offset | length) & _MASK:
            for layer in self._stack:
                data = layer.read_fast(offset, length)
                if data is False:
                    continue
                if data is not None:
                    return data
                break
        return self.read(offset, length, nowait=True)

    def _read_aligned(self, offset: int, view: memoryview, nowait: bool) -> None:
        pending = [(offset, len(view))]
        for layer in self._stack:
            if len(pending) == 1:
                o, n = pending[0]
                pending = layer.read_present(o, view[o - offset:o - offset + n], nowait)
            else:
                nxt: list[tuple[int, int]] = []
                for o, n in pending:
                    nxt += layer.read_present(o, view[o - offset:o - offset + n], nowait)
                pending = nxt
            if not pending:
                return

    def locate(self, offset: int, length: int) -> tuple[int, int] | None:
        """``(fd, file_offset)`` when an aligned range is one piece of one file.

        For frontends that can send file data without copying it (sendfile);
        None means: read it with :meth:`read`.
        """
        if (offset | length) & _MASK or offset + length > self.size:
            return None
        for layer in self._stack:
            where = layer.locate(offset, length)
            if where is False:
                continue
            return where if isinstance(where, tuple) else None
        return None

    async def aread(self, offset: int, length: int) -> bytearray | memoryview:
        """Read inline when the page cache has it, else in a worker thread.

        A stack with a remote layer is read layer by layer instead: each
        layer that would block is awaited with ``Layer.aread_present``
        (a worker thread, or the layer's own asynchronous path).
        """
        if self.local:
            try:
                return self.read(offset, length, nowait=True)
            except WouldBlock:
                return await trio.to_thread.run_sync(self.read, offset, length)
        self._check(offset, length, write=False)
        a0 = offset & ~_MASK
        a1 = (offset + length + _MASK) & ~_MASK
        buf = bytearray(a1 - a0)
        view = memoryview(buf)
        pending = [(a0, a1 - a0)]
        for layer in list(self._stack):
            nxt: list[tuple[int, int]] = []
            for o, n in pending:
                part = view[o - a0:o - a0 + n]
                try:
                    nxt += layer.read_present(o, part, True)
                except WouldBlock:
                    nxt += await layer.aread_present(o, part)
            pending = nxt
            if not pending:
                break
        if a0 == offset and a1 == offset + length:
            return buf
        return view[offset - a0:offset - a0 + length]

    def read_start(self, offset: int, length: int,
                   done: Callable[[BaseException | None], object], splice: bool = False
                   ) -> tuple[Any, bool] | None:
        """Start a read of a stack with a remote layer, with no task waiting for it.

        The layers above the remote one are read at once (from the page
        cache; their data wins); what none of them holds is handed to the
        first layer that can read without a task (``read_submit``: the NBD
        layer's event-loop connections, or at once from its cache when that
        holds it all, :data:`~lbd.layer.FILLED`).  Returns
        ``(data, started)``: with ``started``, ``data`` is complete once
        ``done(None)`` is called (or ``done(exc)`` reports the failure),
        never before this returns; without it, ``data`` is complete now.
        None when this way does not apply (nothing was started): use
        :meth:`aread`.  The caller has checked the range.

        With ``splice``, an aligned read wholly on the remote may come back
        as the layer's own object (``read_splice``: the data in a pipe) with
        ``len()`` and ``send_inline(sock)``, for a frontend that can send it.
        """
        a0 = offset & ~_MASK
        a1 = (offset + length + _MASK) & ~_MASK
        if a0 == offset and a1 == offset + length:
            # the common case, an aligned range none of the layers above the
            # remote one holds: straight to the remote, nothing read twice
            for layer in self._stack:
                if layer.absent(offset, length):
                    continue
                submit1 = getattr(layer, "read_submit1", None)
                if submit1 is not None:  # the remote layer
                    if splice:
                        data = layer.read_splice(offset, length, done)  # type: ignore[attr-defined]
                        if data is not None:
                            return data, True
                    buf = bytearray(length)
                    started = submit1(offset, memoryview(buf), done)
                    if started:
                        return buf, started != FILLED
                break
        buf = bytearray(a1 - a0)
        view = memoryview(buf)
        pending = [(a0, a1 - a0)]
        started = False
        for layer in self._stack:
            submit = getattr(layer, "read_submit", None)
            if submit is not None:  # a remote layer: asked first, it holds every piece
                if (splice and len(pending) == 1 and pending[0][1] == length
                        and a0 == offset):
                    data = layer.read_splice(offset, length, done)  # type: ignore[attr-defined]
                    if data is not None:
                        return data, True
                submitted = submit([(o, view[o - a0:o - a0 + n]) for o, n in pending], done)
                if submitted:
                    started = submitted != FILLED  # FILLED: a cache held it all
                    break
            nxt: list[tuple[int, int]] = []
            try:
                for o, n in pending:
                    nxt += layer.read_present(o, view[o - a0:o - a0 + n], True)
            except WouldBlock:
                return None
            pending = nxt
            if not pending:
                break
        if a0 == offset and a1 == offset + length:
            return buf, started
        return view[offset - a0:offset - a0 + length], started

    # -- writes --------------------------------------------------------------------

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        length = len(data)
        self._check(offset, length, write=True)
        if length == 0:
            return
        top = self._stack[0]
        if not (offset | length) & _MASK:
            top.write(offset, [data], length, fua)
            return
        # Unaligned: read-modify-write the partial head and tail sectors.
        a0 = offset & ~_MASK
        a1 = (offset + length + _MASK) & ~_MASK
        end = offset + length
        if a1 - a0 == SECTOR:
            sector = bytearray(self.read(a0, SECTOR))
            sector[offset - a0:end - a0] = data
            top.write(a0, [sector], SECTOR, fua)
            return
        mv = memoryview(data)
        buffers: list[Buffer] = []
        if offset != a0:
            head = bytearray(self.read(a0, SECTOR))
            cut = a0 + SECTOR - offset
            head[offset - a0:] = mv[:cut]
            buffers.append(head)
            mv = mv[cut:]
        tail = None
        if end != a1:
            tail = bytearray(self.read(a1 - SECTOR, SECTOR))
            keep = end - (a1 - SECTOR)
            tail[:keep] = mv[len(mv) - keep:]
            mv = mv[:len(mv) - keep]
        buffers.append(mv)
        if tail is not None:
            buffers.append(tail)
        top.write(a0, buffers, a1 - a0, fua)

    async def awrite(self, offset: int, data: Buffer) -> None:
        """:meth:`write` for the event loop (a stack with a remote layer).

        An aligned write is awaited with the top layer's ``awrite`` (a worker
        thread, or the layer's own asynchronous path); an unaligned one is
        read-modify-written in a worker thread.
        """
        length = len(data)
        self._check(offset, length, write=True)
        if length and not (offset | length) & _MASK:
            await self._stack[0].awrite(offset, [data], length, False)
        elif length:
            await trio.to_thread.run_sync(self.write, offset, data)

    def write_start(self, offset: int, data: Buffer,
                    done: Callable[[BaseException | None], object],
                    fua: bool = False) -> bool | str:
        """Start an aligned write to a remote top layer with no task waiting for it.

        The top layer's ``write_submit`` (the NBD layer, ``-N``) sends it and
        calls ``done(None)`` or ``done(exc)`` from the event loop once the
        remote has answered, never before this returns.  :data:`WRITTEN`:
        the write is already done (``-X``'s cache took it) and ``done`` is
        not called.  With ``fua`` the write is durable on the remote when
        ``done(None)`` comes.  False (nothing started) when this way does not
        apply: use :meth:`awrite`.  The caller has checked the range.
        """
        n = len(data)
        top = self._stack[0]
        submit = getattr(top, "write_submit", None)
        if submit is None or not n or (offset | n) & _MASK or not top.writable:
            return False
        started = submit(offset, data, done, fua)
        return started if started == WRITTEN else bool(started)

    def write_batch(self, items: list[tuple[int, Buffer]], *, checked: bool = False) -> None:
        """Sector-aligned writes ``(offset, data)``, applied in order, merged where the top can.

        Used by frontends that receive many writes at once; all of them
        succeed or the batch raises (and the caller may retry one by one).
        ``checked``: the caller has already checked that every write is
        aligned, non-empty and inside the device, and that the stack is
        writable (the NBD frontend's hot path does, while parsing).
        """
        top = self._stack[0]
        if not checked:
            size = self.size
            for offset, data in items:
                n = len(data)
                if offset < 0 or offset + n > size or not top.writable:
                    self._check(offset, n, write=True)
                if (offset | n) & _MASK:
                    raise ValueError("write_batch takes sector-aligned writes only")
        top.write_blocks(items)

    def zero(self, offset: int, length: int, *, trim: bool = False, no_hole: bool = False,
             fast: bool = False, fua: bool = False) -> None:
        """WRITE_ZEROES (``trim=False``) or TRIM (``trim=True``) a range."""
        self._check(offset, length, write=True)
        a0 = (offset + _MASK) & ~_MASK
        a1 = (offset + length) & ~_MASK
        if not trim:
            # partial sectors at either end are written as real zeros
            if a1 <= a0:
                self.write(offset, bytes(length), fua)
                return
            if offset < a0:
                self.write(offset, bytes(a0 - offset))
            if offset + length > a1:
                self.write(a1, bytes(offset + length - a1))
        if a1 > a0:
            self._stack[0].zero(a0, a1 - a0, trim=trim, no_hole=no_hole, fast=fast, fua=fua)

    def flush(self) -> None:
        """Make every acknowledged write durable.

        Every layer is asked, not only the writable top: after
        :meth:`push_layer` the old top is read-only but may still hold
        acknowledged writes that are not yet on stable storage (a layer with
        nothing pending returns at once).  Iterates over a copy, because this
        runs in a worker thread while the event loop may push a layer.
        """
        for layer in list(self._stack):
            layer.flush()

    async def aflush(self) -> None:
        await trio.to_thread.run_sync(self.flush)

    def flush_pending(self) -> bool:
        """Whether a FLUSH has anything to make durable (see Layer.flush_pending)."""
        return any(layer.flush_pending() for layer in self._stack)

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length, write=False)
        a0 = offset & ~_MASK
        a1 = (offset + length + _MASK) & ~_MASK
        for layer in self._stack:
            layer.cache(a0, a1 - a0)

    # -- allocation ------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> list[tuple[int, State, int]]:
        """``(length, state, depth)`` runs covering the range, in order.

        ``state`` is DATA or ZERO as the topmost layer holding each sector
        sees it; ``depth`` is 1 for the top layer, 2 for the one below, ...,
        and 0 for the null layer (nothing allocated anywhere).
        """
        self._check(offset, length, write=False)
        a0 = offset & ~_MASK
        a1 = (offset + length + _MASK) & ~_MASK
        found: list[tuple[int, int, State, int]] = []
        pending = [(a0, a1 - a0)]
        depth_of_null = len(self._stack)
        for depth, layer in enumerate(self._stack, start=1):
            nxt: list[tuple[int, int]] = []
            for o, n in pending:
                for s, m, state in layer.extents(o, n):
                    if state == State.ABSENT:
                        nxt.append((s, m))
                    else:
                        found.append((s, m, state, 0 if depth == depth_of_null else depth))
            pending = nxt
            if not pending:
                break
        found.sort()
        out: list[tuple[int, State, int]] = []
        for s, m, state, depth in found:
            s0, e0 = max(s, offset), min(s + m, offset + length)
            if e0 <= s0:
                continue
            if out and out[-1][1] == state and out[-1][2] == depth:
                out[-1] = (out[-1][0] + e0 - s0, state, depth)
            else:
                out.append((e0 - s0, state, depth))
        return out

    def iter_extents(self, chunk: int = 1 << 30) -> Iterator[tuple[int, int, State, int]]:
        """``(offset, length, state, depth)`` over the whole device."""
        pos = 0
        while pos < self.size:
            n = min(chunk, self.size - pos)
            for m, state, depth in self.block_status(pos, n):
                yield pos, m, state, depth
                pos += m

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close every layer, top first; report the first failure."""
        first: BaseException | None = None
        for layer in self._stack:
            try:
                layer.close()
            except BaseException as exc:  # close the others anyway
                first = first or exc
        if first is not None:
            raise first
