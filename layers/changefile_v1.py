"""The original Java LBD's change-file format (version 1); spec in docs/format.md.

The file is an array of 512-byte units.  Tables are 512 bytes: 64 big-endian
u64 entries.  The root table is at offset 0 and its entry 63 holds the magic
``4C 42 44 58 01 01 01 01``.  A block number is looked up through six levels,
six bits each (level L uses bits ``(5-L)*6 .. (5-L)*6+5``); entries of levels
0..4 are byte offsets of child tables, level-5 entries byte offsets of the
512-byte data block, 0 means "not here".  An empty file is an empty layer.

:class:`V1ChangeFile` reads the whole tree once when opened into the same
in-memory :class:`~lbd.extentmap.ExtentMap` the native format uses, so the
expandable layer serves both the same way, and writes in the original's way:
a rewrite of a block overwrites it in place, a new block is appended with
the tables it needs, and the parent entry is written last.  The format has no
sizes, identities, checksums or zero state; what that means for LBD is in
docs/format.md.  This module is the only code that parses version 1.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lbd.errors import ConfigError, CorruptionError
from lbd.extentmap import ExtentMap
from lbd.layer import Identity

from .changefile import Stats
from .fileio import Buffer, FileIO

log = logging.getLogger(__name__)

SECTOR = 512
MAGIC = bytes.fromhex("4c42445801010101")
VERSION = 1
LEVELS = 6
FANOUT = 64
MAGIC_SLOT = 63  # root entry holding the magic
# Root entry 63 is the magic, so blocks whose top six bits are 63 cannot be stored.
MAX_BLOCKS = MAGIC_SLOT << ((LEVELS - 1) * 6)
_TABLE = struct.Struct(">64Q")
_U64 = struct.Struct(">Q")

# what each 512-byte unit of the file is (open() builds this map)
U_FREE, U_TABLE, U_DATA, U_SHARED = 0, 1, 2, 3


def _fingerprint(io: FileIO) -> bytes:
    from .flat import fingerprint  # the same content fingerprint as a flat image

    return fingerprint(io, io.size())


@dataclass
class V1Header:
    """What a v1 file can say about itself (nearly nothing: no size, no parent)."""

    device_size: int
    uuid: bytes  # not stored: the file's content fingerprint, see docs/format.md
    parent: Identity = field(default_factory=Identity)
    created_ns: int = 0
    generation: int = 0
    index_area: int = 0
    version: int = VERSION


@dataclass
class V1Check:
    """Findings of a strict walk of the tree (``lbd-inspect --check``)."""

    problems: list[str] = field(default_factory=list)  # corruption
    tables: int = 0
    data_blocks: int = 0
    shared_blocks: int = 0  # data units referenced by more than one entry
    leaked_bytes: int = 0  # units neither a table nor data, below the end of the file
    max_block: int = -1


class V1ChangeFile:
    """An open version-1 change file, API-compatible with ``ChangeFile`` for the layer.

    Thread safety: the map and the append position are guarded by one lock,
    as in :class:`~lbd.layers.changefile.ChangeFile`.
    """

    version = VERSION

    def __init__(self, io: FileIO, device_size: int) -> None:
        self.io = io
        self.device_size = device_size
        self.map = ExtentMap()
        self.lock = threading.RLock()
        self.tables: dict[tuple[int, int], int] = {}  # (level, block prefix) -> offset
        self.shared: set[int] = set()  # data locations referenced more than once
        self.end = 0  # where the next table or data block goes
        self.seq = 0  # writes so far; the layer flushes when seq != durable_seq
        self.durable_seq = 0
        self.recycled_bytes = 0  # v1 never recycles (the layer's space info shows it)
        self.data_units = 0
        self.check = V1Check()
        self.dropped_tail = 0
        self._uuid: bytes | None = None

    @property
    def header(self) -> V1Header:
        # The identity is the content fingerprint: recomputed while the file
        # can change, cached once it cannot.
        if self._uuid is None or self.io.writable:
            self._uuid = _fingerprint(self.io)
        return V1Header(self.device_size, self._uuid)

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, writable: bool, device_size: int | None = None,
             io_factory: Callable[..., FileIO] = FileIO, strict: bool = True) -> V1ChangeFile:
        """Open a v1 file and read its whole tree into the map.

        ``device_size`` None (the tools, on a lone file) takes the size the
        highest block written needs.  ``strict`` raises
        :class:`CorruptionError` at the first structural problem; otherwise
        problems are collected in :attr:`check` (``lbd-inspect --check``).
        """
        io = io_factory(path, writable=writable)
        try:
            io.lock("change file")
            cf = cls(io, device_size or 0)
            cf._walk(strict)
            if device_size is None:
                cf.device_size = (cf.check.max_block + 1) * SECTOR
            elif cf.check.max_block >= device_size // SECTOR:
                raise ConfigError(
                    f"{path}: version-1 file holds block {cf.check.max_block}, beyond a "
                    f"device of {device_size} bytes")
            if writable and device_size is not None and device_size > MAX_BLOCKS * SECTOR:
                raise ConfigError(f"{path}: a version-1 file holds at most {MAX_BLOCKS} blocks; "
                                  f"the device is {device_size // SECTOR}")
        except BaseException:
            io.close()
            raise
        return cf

    def _walk(self, strict: bool) -> None:
        size = self.io.size()
        chk = self.check
        if size == 0:
            return
        units = bytearray((size + SECTOR - 1) // SECTOR)
        root = self.io.pread(SECTOR, 0)
        if len(root) < SECTOR or root[504:512] != MAGIC:
            raise ConfigError(f"{self.io.path}: not a version-1 LBD change file (bad magic)")

        def problem(msg: str) -> None:
            if strict:
                raise CorruptionError(f"{self.io.path}: version-1 file: {msg}")
            chk.problems.append(msg)

        units[0] = U_TABLE
        self.tables[(0, 0)] = 0
        chk.tables = 1
        # depth first, children in index order, so blocks arrive in increasing order
        stack: list[tuple[int, int, bytes]] = [(0, 0, root)]
        run_s = run_n = run_loc = -1
        while stack:
            level, prefix, raw = stack.pop()
            entries = _TABLE.unpack(raw)
            children = []
            for idx in range(FANOUT):
                v = entries[idx]
                if v == 0 or (level == 0 and idx == MAGIC_SLOT):
                    continue
                child = (prefix << 6) | idx
                if v % SECTOR or v + SECTOR > size:
                    problem(f"level-{level} table for prefix {prefix:#x} entry {idx} points "
                            f"to {v:#x}, outside the file ({size} bytes) or unaligned")
                    continue
                u = v // SECTOR
                if level < LEVELS - 1:
                    if units[u] != U_FREE:
                        problem(f"table at {v:#x} is also used as another table or data")
                        continue
                    units[u] = U_TABLE
                    chk.tables += 1
                    self.tables[(level + 1, child)] = v
                    children.append((level + 1, child, v))
                    continue
                if units[u] == U_TABLE:
                    problem(f"block {child} points to {v:#x}, which is a table")
                    continue
                if units[u] == U_FREE:
                    units[u] = U_DATA
                    self.data_units += 1
                else:
                    units[u] = U_SHARED
                    self.shared.add(v)
                chk.data_blocks += 1
                chk.max_block = max(chk.max_block, child)
                if run_n > 0 and run_s + run_n == child and run_loc + run_n * SECTOR == v:
                    run_n += 1
                else:
                    if run_n > 0:
                        self.map.set(run_s, run_n, run_loc)
                    run_s, run_n, run_loc = child, 1, v
            for lvl, child, off in reversed(children):
                stack.append((lvl, child, self.io.pread(SECTOR, off)))
        if run_n > 0:
            self.map.set(run_s, run_n, run_loc)
        chk.shared_blocks = len(self.shared)
        chk.leaked_bytes = units.count(U_FREE) * SECTOR
        self.end = len(units) * SECTOR

    # -- writing -----------------------------------------------------------------

    def write(self, sector: int, buffers: Sequence[Buffer], nbytes: int) -> None:
        self.write_batch([(sector, buffers, nbytes)])

    def write_blocks(self, items: Sequence[tuple[int, Buffer]]) -> int:
        """``(byte offset, data)`` writes (see ChangeFile.write_blocks); returns bytes."""
        self.write_batch([(off >> 9, (data,), len(data)) for off, data in items])
        return sum(map(len, (data for _, data in items)))

    def write_batch(self, items: Sequence[tuple[int, Sequence[Buffer], int]]) -> None:
        """Write blocks the original's way, parent entries last.

        Blocks already in the file are overwritten in place (as the original
        did; a torn write there is a v1 limitation).  New blocks are appended
        as one run of data, then the new tables they need (each written
        complete), then the entries of existing tables that link them in:
        until that last 8-byte write the file reads as before.
        """
        with self.lock:
            if self.end == 0:
                self.io.pwrite(bytes(504) + MAGIC, 0)
                self.tables[(0, 0)] = 0
                self.end = SECTOR
            for sector, buffers, nbytes in items:
                if sector + nbytes // SECTOR > MAX_BLOCKS:
                    raise OSError(errno.ENOSPC, "beyond what a version-1 file can hold")
                data = memoryview(b"".join(buffers)) if len(buffers) != 1 \
                    else memoryview(buffers[0]).cast("B")
                self._write_one(sector, data)
            self.seq += 1

    def _write_one(self, sector: int, data: memoryview) -> None:
        count = len(data) // SECTOR
        new: list[tuple[int, int]] = []  # (first sector, count) to append
        for s, n, loc in self.map.lookup(sector, count):
            piece = data[(s - sector) * SECTOR:(s - sector + n) * SECTOR]
            if loc is not None and loc >= 0:
                if not self.shared:
                    self.io.pwrite(piece, loc)
                    continue
                # a block several entries point at is copied on write
                start = s
                for i in range(n + 1):
                    if i == n or loc + i * SECTOR in self.shared:
                        if i > start - s:
                            a = start - s
                            self.io.pwrite(piece[a * SECTOR:i * SECTOR], loc + a * SECTOR)
                        if i < n:
                            new.append((s + i, 1))
                        start = s + i + 1
                continue
            new.append((s, n))
        if not new:
            return
        # data first, one run at the end of the file
        data_at = self.end
        iov = [data[(s - sector) * SECTOR:(s - sector + n) * SECTOR] for s, n in new]
        self.io.pwritev(iov, data_at)
        self.end += sum(n for _, n in new) * SECTOR
        self.data_units += sum(n for _, n in new)
        new_tables: dict[tuple[int, int], bytearray] = {}
        new_offsets: dict[tuple[int, int], int] = {}
        patches: dict[int, dict[int, int]] = {}

        def set_entry(level: int, prefix: int, idx: int, value: int) -> None:
            key = (level, prefix)
            if key in new_tables:
                _U64.pack_into(new_tables[key], idx * 8, value)
                return
            off = self.tables.get(key)
            if off is None:
                off = self.end
                self.end += SECTOR
                new_tables[key] = bytearray(SECTOR)
                new_offsets[key] = off
                self.tables[key] = off
                set_entry(level - 1, prefix >> 6, prefix & 63, off)
                _U64.pack_into(new_tables[key], idx * 8, value)
                return
            patches.setdefault(off, {})[idx] = value

        loc = data_at
        for s, n in new:
            for b in range(s, s + n):
                set_entry(LEVELS - 1, b >> 6, b & 63, loc)
                loc += SECTOR
        if new_tables:
            first = min(new_offsets.values())
            blob = bytearray(self.end - first)
            for key, off in new_offsets.items():
                blob[off - first:off - first + SECTOR] = new_tables[key]
            self.io.pwrite(blob, first)
        for off, entries in patches.items():
            idxs = sorted(entries)
            i = 0
            while i < len(idxs):  # consecutive entries of one table in one write
                j = i
                while j + 1 < len(idxs) and idxs[j + 1] == idxs[j] + 1:
                    j += 1
                raw = b"".join(_U64.pack(entries[k]) for k in idxs[i:j + 1])
                self.io.pwrite(raw, off + idxs[i] * 8)
                i = j + 1
        loc = data_at
        for s, n in new:
            self.map.set(s, n, loc)
            loc += n * SECTOR

    def zero(self, sector: int, count: int) -> None:
        """WRITE_ZEROES: version 1 has no zero state, so zeros are written as data."""
        chunk = bytes(min(count, 2048) * SECTOR)
        pos, end = sector, sector + count
        while pos < end:
            n = min(end - pos, 2048)
            self.write(pos, [memoryview(chunk)[:n * SECTOR]], n * SECTOR)
            pos += n

    def sync(self) -> None:
        with self.lock:
            upto = self.seq
        self.io.fdatasync()
        self.durable_seq = max(self.durable_seq, upto)

    # -- reading -----------------------------------------------------------------

    def lookup(self, sector: int, count: int) -> list[tuple[int, int, int | None]]:
        with self.lock:
            return self.map.lookup(sector, count)

    def stats(self) -> Stats:
        with self.lock:
            live = self.map.data_sectors * SECTOR
            return Stats(file_bytes=self.io.size(), data_bytes=max(self.data_units * SECTOR,
                                                                   live),
                         live_bytes=live, zero_bytes=0, extents=self.map.extent_count,
                         entries=self.check.data_blocks)

    def close(self, *, clean: bool = True) -> None:
        if self.io.fd < 0:
            return
        try:
            if clean and self.io.writable and self.durable_seq != self.seq:
                self.sync()
        finally:
            self.io.close()

