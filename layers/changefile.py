"""The native change-file format (version 2); spec in docs/format.md.

A change file is a header (two 512-byte slots, A/B) followed by journal areas
of 64-byte entries and data payloads.  Every write appends its data at the end
of the file and then one journal entry saying where it went; nothing already
written is ever overwritten in place, so a crash can only lose a tail of
entries that were never flushed, and every entry and payload carries a CRC-32C
that tells a torn tail from good data.

This module is the only code that reads or writes the format: the expandable
layer and the offline tools both use :class:`ChangeFile`.
"""

from __future__ import annotations

import collections
import logging
import operator
import struct
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from crc32c import crc32c

from lbd.errors import ConfigError, CorruptionError
from lbd.extentmap import ZERO, ExtentMap
from lbd.layer import Identity

from .fileio import Buffer, FileIO, fsync_dir

log = logging.getLogger(__name__)

SECTOR = 512
MAGIC = b"LBD-CHG\n"
VERSION = 2
V1_MAGIC = bytes.fromhex("4c42445801010101")  # the original Java LBD's format
HEADER_SIZE = 4096  # two 512-byte slots, the rest reserved
ENTRY_SIZE = 64
AREA_SLOTS = 1024  # entries per journal area; the last slot holds NEXT
AREA_SIZE = AREA_SLOTS * ENTRY_SIZE
DATA_ALIGN = 4096
_ALIGN_MASK = DATA_ALIGN - 1
GROW_STEP = 64 << 20  # the file is extended (sparsely) this much at a time

# journal entry types
E_DATA = 1
E_ZERO = 2
E_INDEX = 3
E_NEXT = 4
ENTRY_MAGIC = 0x4C45  # "EL" little-endian
F_IN_PLACE = 1  # DATA entry whose payload rewrote an earlier unsynced payload in place
F_REUSED = 2  # DATA entry whose payload went into dead space (a recycled 4 KiB payload)
DEAD_MAX = 1 << 20  # dead payloads kept for recycling at most (~70 MiB of memory)
SPLIT_MAX = 64 << 10  # aligned rewrites up to this size go block by block (pages, journals)

_HEADER = struct.Struct("<8sIIQQ16s16sII64sQQQQQ")
_ENTRY = struct.Struct("<HBBIQQQQQII4x")  # 60 bytes, then the entry's CRC-32C
_U32 = struct.Struct("<I")
_INDEX_HEAD = struct.Struct("<QQQ")  # extents, data bytes total, end of used space
_INDEX_EXTENT = struct.Struct("<QQq")  # sector, count, loc (-1 = zero)



class Entry(NamedTuple):
    """A decoded journal entry; ``a``/``b``/``c`` depend on the type.

    DATA: a = device sector, b = sectors, c = payload file offset.
    ZERO: a = device sector, b = sectors.
    INDEX: a = extent count, b = snapshot bytes, c = snapshot file offset.
    NEXT: b = slots in the next area, c = next area file offset.
    """

    magic: int
    type: int
    flags: int
    reserved: int
    seq: int
    a: int
    b: int
    c: int
    durable: int  # every entry with seq <= this was synced before this one was written
    crc: int  # CRC-32C of the payload (DATA, INDEX)
    reserved2: int


@dataclass
class Header:
    device_size: int
    uuid: bytes
    parent: Identity
    created_ns: int
    generation: int = 0
    journal_start: int = HEADER_SIZE
    index_area: int = 0
    index_slot: int = 0
    index_seq: int = 0
    version: int = VERSION

    def encode(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.version, SECTOR, self.device_size, self.created_ns,
                           self.uuid, self.parent.ident, self.parent.kind, 0,
                           self.parent.desc.encode()[:64], self.generation, self.journal_start,
                           self.index_area, self.index_slot, self.index_seq)
        raw = raw.ljust(508, b"\0")
        return raw + _U32.pack(crc32c(raw))

    @classmethod
    def decode(cls, raw: bytes) -> Header | None:
        if len(raw) < 512 or raw[:8] != MAGIC:
            return None
        if _U32.unpack_from(raw, 508)[0] != crc32c(raw[:508]):
            return None
        (_, version, sector, size, created, uid, pid, pkind, _flags, pdesc, gen, jstart,
         iarea, islot, iseq) = _HEADER.unpack_from(raw)
        if sector != SECTOR:
            return None
        parent = Identity(pkind, pid, pdesc.rstrip(b"\0").decode(errors="replace"))
        return cls(size, uid, parent, created, gen, jstart, iarea, islot, iseq, version)


@dataclass
class Stats:
    """Space accounting of one change file."""

    file_bytes: int
    data_bytes: int  # payload bytes in the file, live or dead
    live_bytes: int  # payload bytes still referenced by the map
    zero_bytes: int  # device bytes recorded as zero (no payload)
    extents: int
    entries: int

    @property
    def dead_bytes(self) -> int:
        return self.data_bytes - self.live_bytes


def detect(path: str) -> str:
    """'native', 'v1', 'empty' or 'unknown' for an existing file."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head[:8] == MAGIC:
        return "native"
    if len(head) == 512 and head[504:512] == V1_MAGIC:
        return "v1"
    return "unknown"


class ChangeFile:
    """An open change file: its header, its extent map and its journal cursor.

    Thread safety: the map and the append cursor are guarded by one lock, so
    reads may run in worker threads while the event loop appends.  Payload
    bytes are never rewritten, so a location read from the map stays valid.
    """

    version = VERSION

    def __init__(self, io: FileIO, header: Header) -> None:
        self.io = io
        self.header = header
        self.map = ExtentMap()
        self.lock = threading.RLock()
        self._seed = crc32c(header.uuid)
        self.seq = 0  # last entry written
        self.durable_seq = 0  # entries up to here are known to be on stable storage
        self.area = header.journal_start  # current journal area
        self.slot = 0  # next free slot in it
        self.end = HEADER_SIZE  # where the next payload or area goes
        self.reserved = 0  # the file's size: room up to here needs no extension
        # Only payloads written since the last sync started may be rewritten
        # in place.  Payloads are appended in order, so for whole 4 KiB
        # blocks (ExtentMap.block) that is "at or past the sync mark", the
        # end of the file when the last sync started (or when opened);
        # other sizes are listed: first sector -> (loc, nbytes).
        self._sync_mark = 1 << 62  # nothing, until create/open set it
        self._unsynced: dict[int, tuple[int, int]] = {}
        # Dead 4 KiB payloads that later whole-block rewrites may reuse
        # (docs/format.md, "Recycling"): (location, an upper bound of the
        # sequence number of the entry that made it dead), oldest first.  One
        # may be reused once an entry saying that entry was durable is itself
        # durable: _recycle_ok is the largest such sequence number, _stamped
        # the durable mark written into the latest entry.
        self._dead: collections.deque[tuple[int, int]] = collections.deque()
        self._recycle_ok = 0
        self._stamped = 0
        self._recycled: set[int] = set()  # reused since the last sync started: may be rewritten
        # Only payloads written since the file was opened are recycled: a
        # block loaded from an index snapshot may be a piece of a larger
        # payload, whose CRC must keep matching while the rest is live.
        self._floor = 1 << 62
        self.recycled_bytes = 0  # payload bytes written into dead space (statistics)
        self.data_bytes = 0
        self.entries = 0
        self.dropped_tail = 0  # entries dropped as torn when opened
        self.areas: list[int] = []  # journal areas followed when opened (tools check them)
        self.index_error: str | None = None  # why a named index snapshot was not used

    # -- opening -------------------------------------------------------------

    @classmethod
    def create(cls, path: str, device_size: int, parent: Identity,
               io_factory: Callable[..., FileIO] = FileIO, *, uuid: bytes | None = None,
               created_ns: int | None = None) -> ChangeFile:
        """A new, empty change file.

        ``uuid`` keeps the identity of a file this one replaces (compaction,
        conversion, a merged stack), so change files created on it still fit.
        """
        io = io_factory(path, writable=True, create=True)
        try:
            io.lock("change file")
            header = Header(device_size, uuid or uuidlib.uuid4().bytes, parent,
                            created_ns or time.time_ns())
            raw = header.encode()
            io.pwrite(raw + raw + bytes(HEADER_SIZE - 1024) + _ZERO_AREA, 0)
            io.fdatasync()
            fsync_dir(path)
        except BaseException:
            io.close()
            raise
        cf = cls(io, header)
        cf.end = cf.reserved = HEADER_SIZE + AREA_SIZE
        cf._sync_mark = cf._floor = cf.end
        return cf

    @classmethod
    def open(cls, path: str, *, writable: bool,
             io_factory: Callable[..., FileIO] = FileIO, verify: bool = False,
             use_index: bool = True) -> ChangeFile:
        """Open an existing native change file, replaying its journal.

        A torn tail (entries written after the last completed sync that did
        not fully reach the disk) is dropped; for a writable open the slots
        it occupied are zeroed so they can never be mistaken for entries.
        With ``verify`` the CRC of every payload still referenced is checked, not only the tail's;
        ``use_index=False`` ignores the index snapshot and replays the whole
        journal (``lbd-inspect --check`` compares the two).
        """
        io = io_factory(path, writable=writable)
        try:
            io.lock("change file")
            header = _read_header(io, path)
            cf = cls(io, header)
            cf._replay(verify=verify, use_index=use_index)
            if writable:
                cf._reset_tail()
            # what the file held when opened is neither rewritten nor recycled
            cf._sync_mark = cf._floor = cf.end
        except BaseException:
            io.close()
            raise
        return cf

    def _replay(self, *, verify: bool, use_index: bool = True) -> None:
        h = self.header
        fsize = self.io.size()
        area, slot, seq = h.journal_start, 0, 1
        if h.index_area and use_index:
            try:
                self._load_index(h.index_area, h.index_slot, h.index_seq)
                area, slot, seq = h.index_area, h.index_slot + 1, h.index_seq + 1
            except CorruptionError as exc:
                log.warning("%s: index snapshot unusable (%s); replaying the whole journal",
                            self.io.path, exc)
                self.index_error = str(exc)
                self.map = ExtentMap()
                self.data_bytes = 0
        # Pass 1: follow the journal while entries are valid and in sequence.
        entries: list[tuple[int, int, Entry]] = []
        max_durable = 0
        area_bytes, area_loaded = b"", -1
        self.areas = [area]
        while area >= HEADER_SIZE:
            if area_loaded != area:
                area_bytes, area_loaded = self.io.pread(AREA_SIZE, area), area
            e = self._decode_entry(area_bytes, slot)
            if e is None or e.seq != seq:
                break
            if e.type == E_NEXT:
                if slot != AREA_SLOTS - 1 or e.c % SECTOR or e.c < HEADER_SIZE:
                    break
                area, slot, seq = e.c, 0, seq + 1
                self.areas.append(area)
                continue
            if slot >= AREA_SLOTS - 1:
                break
            entries.append((area, slot, e))
            max_durable = max(max_durable, e.durable)
            slot += 1
            seq += 1
        good, max_durable = self._cut_torn_tail([e for _, _, e in entries], fsize)
        for _, _, e in entries[:good]:
            self._apply(e)
        if verify:
            self._verify([e for _, _, e in entries[:good]], fsize)
        if good < len(entries):
            self.dropped_tail = len(entries) - good
            log.warning("%s: dropped %d torn journal entries written after the last sync",
                        self.io.path, self.dropped_tail)
            area, slot, e = entries[good]
            seq = e.seq
        self.area, self.slot, self.seq = area, slot, seq - 1
        self.durable_seq = min(self.seq, max_durable)
        # New data goes after everything the journal still references; what
        # lies beyond (sparse room, a dropped torn tail) is free space.
        used = [self.end, self.area + AREA_SIZE]
        for _, _, e in entries[:good]:
            if e.type == E_DATA:
                used.append(e.c + e.b * SECTOR)
            elif e.type == E_INDEX:
                used.append(e.c + e.b)
        self.end = _align(max(used), DATA_ALIGN)
        self.reserved = fsize

    def _cut_torn_tail(self, entries: list[Entry], fsize: int) -> tuple[int, int]:
        """How many entries survive, and the durable mark among them.

        Entries that no surviving entry vouches for as synced may be torn:
        their payload CRCs are checked and the journal is cut at the first
        bad one.  A payload rewritten in place by a later surviving entry
        (same location and length, see :meth:`write_batch`) is not checked:
        its CRC is the later entry's.  Cutting can un-vouch or un-supersede
        earlier entries, so this repeats until nothing changes.
        """
        n = len(entries)
        next_same: list[int | None] = [None] * n
        last: dict[tuple[int, int], int] = {}
        for i in range(n - 1, -1, -1):
            e = entries[i]
            if e.type == E_DATA:
                next_same[i] = last.get((e.c, e.b))
                last[(e.c, e.b)] = i
        prefix_durable = [0] * (n + 1)
        for i, e in enumerate(entries):
            prefix_durable[i + 1] = max(prefix_durable[i], e.durable)
        checked: dict[int, bool] = {}
        cut = n
        while True:
            durable = prefix_durable[cut]
            bad = None
            for i in range(cut):
                e = entries[i]
                if e.type not in (E_DATA, E_INDEX) or e.seq <= durable:
                    continue
                j = next_same[i]
                if j is not None and j < cut:
                    continue
                if i not in checked:
                    checked[i] = self._payload_ok(e, fsize)
                if not checked[i]:
                    bad = i
                    break
            if bad is None:
                return cut, durable
            cut = bad

    def _verify(self, entries: list[Entry], fsize: int) -> None:
        """Check the payload CRC of every entry whose data is still served.

        Index snapshots are all checked.  A DATA payload that no sector
        references any more is not: its space may have been recycled
        (docs/format.md), and it is never read.  Of the entries that share
        one payload (in-place rewrites, recycling), the last vouches for it.
        """
        last: dict[tuple[int, int], int] = {}
        for i, e in enumerate(entries):
            if e.type == E_DATA:
                last[(e.c, e.b)] = i
        for i, e in enumerate(entries):
            if e.type == E_INDEX or (e.type == E_DATA and last[(e.c, e.b)] == i
                                     and self._live(e)):
                if not self._payload_ok(e, fsize):
                    raise CorruptionError(f"{self.io.path}: journal entry {e.seq} was synced "
                                          "but its data fails its checksum")

    def _live(self, e: Entry) -> bool:
        """Whether some sector of DATA entry ``e`` still reads from its payload."""
        for s, _n, loc in self.map.lookup(e.a, e.b):
            if loc is not None and loc != ZERO and loc == e.c + (s - e.a) * SECTOR:
                return True
        return False

    def _decode_entry(self, area_bytes: bytes, slot: int) -> Entry | None:
        off = slot * ENTRY_SIZE
        raw = area_bytes[off:off + ENTRY_SIZE]
        if len(raw) < ENTRY_SIZE or _U32.unpack_from(raw, 60)[0] != crc32c(raw[:60], self._seed):
            return None
        e = Entry._make(_ENTRY.unpack_from(raw))
        return e if e.magic == ENTRY_MAGIC else None

    def _payload_ok(self, e: Entry, fsize: int) -> bool:
        length = e.b * SECTOR if e.type == E_DATA else e.b
        if e.c + length > fsize:
            return False
        crc = 0
        pos = 0
        while pos < length:
            n = min(length - pos, 8 << 20)
            crc = crc32c(self.io.pread(n, e.c + pos), crc)
            pos += n
        return crc == e.crc

    def _apply(self, e: Entry) -> None:
        self.entries += 1
        if e.type == E_DATA:
            self.map.set(e.a, e.b, e.c)
            if not e.flags & (F_IN_PLACE | F_REUSED):
                self.data_bytes += e.b * SECTOR
        elif e.type == E_ZERO:
            self.map.set(e.a, e.b, ZERO)
        # E_INDEX: a snapshot of the state already built; nothing to apply

    def _load_index(self, area: int, slot: int, seq: int) -> None:
        e = self._decode_entry(self.io.pread(AREA_SIZE, area), slot)
        if e is None or e.type != E_INDEX or e.seq != seq:
            raise CorruptionError("index entry missing or damaged")
        if not self._payload_ok(e, self.io.size()):
            raise CorruptionError("index snapshot checksum mismatch")
        blob = self.io.pread(e.b, e.c)
        count, data_bytes, used_end = _INDEX_HEAD.unpack_from(blob)
        body = _INDEX_HEAD.size + count * _INDEX_EXTENT.size
        if e.a != count or body > len(blob):
            raise CorruptionError("index snapshot has a bad extent count")
        m = ExtentMap()
        for s, n, loc in _INDEX_EXTENT.iter_unpack(blob[_INDEX_HEAD.size:body]):
            m.set(s, n, loc)
        self.map = m
        self.data_bytes = data_bytes
        self.entries = 1
        self.end = max(used_end, e.c + e.b)

    def _reset_tail(self) -> None:
        """Zero every slot after the last good entry, then sync.

        Stale or torn entries there could otherwise be read back as valid
        once new entries fill the slots before them.
        """
        start = self.area + self.slot * ENTRY_SIZE
        stop = self.area + AREA_SIZE
        if start < stop and self.io.pread(stop - start, start).strip(b"\0"):
            self.io.pwrite(bytes(stop - start), start)
        # A lost tail may have opened journal areas past the end of what
        # survived, full of entries whose sequence numbers would line up
        # with new ones: a new area there could replay them after the next
        # crash.  Everything new goes after all data the file holds.
        fsize = self.io.size()
        if self.end < fsize:
            data_end = max((s + n for s, n, is_data in self.io.seek_data_holes(self.end, fsize)
                            if is_data), default=self.end)
            self.end = _align(data_end, DATA_ALIGN)
        self.sync()

    # -- writing ---------------------------------------------------------------

    def _entry(self, seq: int, etype: int, a: int, b: int, c: int, crc: int,
               flags: int = 0) -> bytes:
        self._stamped = self.durable_seq
        raw = _ENTRY.pack(ENTRY_MAGIC, etype, flags, 0, seq, a, b, c, self.durable_seq, crc, 0)
        return raw + _U32.pack(crc32c(raw, self._seed))

    def _slot_pos(self) -> int:
        """Position of the next journal slot, opening a new area when full."""
        if self.slot >= AREA_SLOTS - 1:
            new_area = _align(self.end, DATA_ALIGN)
            self._room(new_area + AREA_SIZE)
            # written, not fallocated: its blocks are then reserved (no ENOSPC
            # for entries) without the unwritten-extent conversion each first
            # entry write in a block would cost at the next fdatasync
            self.io.pwrite(_ZERO_AREA, new_area)
            self.io.pwrite(self._entry(self.seq + 1, E_NEXT, 0, AREA_SLOTS, new_area, 0),
                           self.area + (AREA_SLOTS - 1) * ENTRY_SIZE)
            self.seq += 1
            self.end = new_area + AREA_SIZE
            self.area, self.slot = new_area, 0
            self.areas.append(new_area)
        return self.area + self.slot * ENTRY_SIZE

    def _append_entry(self, etype: int, a: int, b: int, c: int, crc: int) -> None:
        pos = self._slot_pos()
        self.io.pwrite(self._entry(self.seq + 1, etype, a, b, c, crc), pos)
        self.seq += 1
        self.slot += 1
        self.entries += 1

    def _room(self, end: int) -> None:
        """Extend the file (sparsely) ahead of appends.

        Appending past the end of file costs a size update per write; growing
        in large steps keeps every write inside the file.
        """
        if end > self.reserved:
            self.reserved = _align(end + GROW_STEP, GROW_STEP)
            self.io.truncate(self.reserved)

    def write(self, sector: int, buffers: Sequence[Buffer], nbytes: int) -> None:
        """Append ``nbytes`` (a multiple of 512) of data for device ``sector``."""
        self.write_batch([(sector, buffers, nbytes)])

    def write_batch(self, items: Sequence[tuple[int, Sequence[Buffer], int]]) -> None:
        """``(sector, buffers, nbytes)`` writes: :meth:`write_blocks` with sector addresses."""
        self.write_blocks([(sector << 9, buffers[0] if len(buffers) == 1 else b"".join(buffers))
                           for sector, buffers, _ in items])

    def write_blocks(self, items: Sequence[tuple[int, Buffer]]) -> int:
        """Apply ``(byte offset, data)`` writes with one data write and one journal write.

        Payloads are appended back to back at the end of the file and their
        entries go into consecutive slots, in order, so a later item wins
        where items overlap.  One exception keeps the file from growing under
        rewrites of the same blocks: when a write covers exactly the payload
        of an entry that no sync has covered yet (no sync has even started
        since it was written), that payload is rewritten in place and a new
        entry (flag IN_PLACE) carries the new CRC.  Its entry is written
        before its data, so whatever the moment of a crash, the older entry
        or the newer one checks out (docs/format.md).  And a whole-block
        rewrite of synced data goes into a dead 4 KiB payload that may be
        recycled (flag REUSED, written before its entry), if there is one.
        Offsets and lengths are multiples of 512.  Returns the number of
        bytes written.
        """
        with self.lock:
            if set(map(len, map(_second, items))) != _ONE_BLOCK:
                items = self._split_rewrites(items)
            end = self.end
            placed = []  # (sector, count, loc, crc, entry flags): the entries, in order
            iov: list[Buffer] = []  # the appended payloads (and alignment gaps)
            rewrites: list[tuple[Buffer, int]] = []  # (data, loc), in order
            reused: list[tuple[Buffer, int]] = []  # (data, loc) into dead payloads
            taken: list[tuple[int, int]] = []  # the dead payloads they took
            killed: list[int] = []  # synced whole-block payloads this batch makes dead
            runs: list[tuple[int, int, int]] = []  # map updates, in order
            fresh: set[int] = set()  # whole blocks appended (or moved) by this batch
            spill = False  # a payload other than a whole block was appended
            unsynced = self._unsynced
            maps_to = self.map.maps_to
            block = self.map.block
            mark = self._sync_mark
            dead = self._dead
            recycled = self._recycled
            recycle_ok = self._recycle_ok
            floor = self._floor
            total = appended = 0
            for offset, data in items:
                nbytes = len(data)
                total += nbytes
                crc = crc32c(data)
                sector = offset >> 9
                count = nbytes >> 9
                if nbytes == 4096 and not offset & 4095:
                    # a whole block: the map's block dict holds exactly the
                    # payloads of 8-sector writes; those past the sync mark
                    # were appended after the last sync started
                    b = offset >> 12
                    loc = block(b)
                    if loc is None:
                        if unsynced:  # the dict was full when it was written
                            hit = unsynced.get(sector)
                            if hit is not None and hit[1] == 4096 and \
                                    maps_to(sector, 8, hit[0]):
                                loc = hit[0]
                    elif loc < mark and loc not in recycled:
                        if loc >= floor and b not in fresh:  # synced: now wholly dead
                            killed.append(loc)
                            if dead and dead[0][1] <= recycle_ok:
                                slot = dead.popleft()
                                taken.append(slot)
                                placed.append((sector, 8, slot[0], crc, F_REUSED))
                                reused.append((data, slot[0]))
                                runs.append((sector, 8, slot[0]))
                                fresh.add(b)
                                continue
                        loc = None  # appended below
                    if loc is not None and (loc >= mark or loc in recycled):
                        placed.append((sector, 8, loc, crc, F_IN_PLACE))
                        rewrites.append((data, loc))
                        if spill or b in fresh:  # must win over this batch's append
                            runs.append((sector, 8, loc))
                        continue
                    fresh.add(b)
                else:
                    hit = unsynced.get(sector)
                    if hit is not None and hit[1] == nbytes and maps_to(sector, count, hit[0]):
                        loc = hit[0]
                        placed.append((sector, count, loc, crc, F_IN_PLACE))
                        rewrites.append((data, loc))
                        if appended or reused:
                            runs.append((sector, count, loc))
                        continue
                    spill = True
                if not nbytes & _ALIGN_MASK and end & _ALIGN_MASK:
                    loc = (end + _ALIGN_MASK) & ~_ALIGN_MASK
                    iov.append(_ZEROS[:loc - end])
                else:
                    loc = end
                iov.append(data)
                placed.append((sector, count, loc, crc, 0))
                runs.append((sector, count, loc))
                if nbytes != 4096 or offset & 4095:
                    unsynced[sector] = (loc, nbytes)
                appended += nbytes
                end = loc + nbytes
            if iov:
                self._room(end)
                self.io.pwritev_pieces(iov, self.end)
                self.end = end
            if reused:
                try:  # before their entries: until those exist, the space is still dead
                    self.io.pwrite_each(reused)
                except OSError:
                    dead.extendleft(reversed(taken))
                    raise
            # entries: consecutive slots of the current area, then the next area
            pack = _ENTRY.pack
            pack_crc = _U32.pack
            seed = self._seed
            durable = self.durable_seq
            i = 0
            while i < len(placed):
                pos = self._slot_pos()
                chunk = placed[i:i + AREA_SLOTS - 1 - self.slot]
                seq = self.seq
                parts = []
                for sector, count, loc, crc, flags in chunk:
                    seq += 1
                    raw = pack(ENTRY_MAGIC, E_DATA, flags, 0, seq,
                               sector, count, loc, durable, crc, 0)
                    parts.append(raw)
                    parts.append(pack_crc(crc32c(raw, seed)))
                self.io.pwrite(b"".join(parts), pos)
                self.seq = seq
                self.slot += len(chunk)
                self.entries += len(chunk)
                i += len(chunk)
            self._stamped = durable
            if rewrites:
                try:
                    self.io.pwrite_each(rewrites)
                except OSError as exc:
                    k = getattr(exc, "items_written", 0)
                    in_place = [(s, c) for s, c, _loc, _crc, f in placed if f == F_IN_PLACE]
                    self._revouch([(data, loc, s, c) for (data, loc), (s, c)
                                   in zip(rewrites[k:], in_place[k:])])
                    raise
            # The map: appended payloads, and in-place rewrites that must win
            # over a payload appended earlier in this batch (the others need
            # nothing: the map already points at them).  Whole blocks the
            # block dict had no room for are listed as unsynced instead.
            if runs:
                for sector, count, loc in self.map.set_many(runs):
                    unsynced[sector] = (loc, count << 9)
            if killed:  # only now that the map agrees
                self._bury(killed)
            if taken:
                recycled.update(loc for loc, _ in taken)
                self.recycled_bytes += 4096 * len(taken)
            self.data_bytes += appended
            return total

    def _bury(self, locs: list[int]) -> None:
        """Whole-block payloads the entries just written made dead: recyclable later.

        The last entry's number bounds those of the entries that killed them.
        """
        seq = self.seq
        dead = self._dead
        dead.extend([(loc, seq) for loc in locs])
        while len(dead) > DEAD_MAX:  # bounded memory: the oldest stay dead
            dead.popleft()

    def _split_rewrites(self, items: Sequence[tuple[int, Buffer]]) -> list[tuple[int, Buffer]]:
        """Aligned rewrites of data, cut into whole 4 KiB blocks.

        Each block then gets a payload (and entry) of its own, rewritten in
        place until a sync and recycled block by block after one: a
        database's 8 or 16 KiB pages, a file system's journal (docs/format.md,
        "Recycling dead payloads").  First writes (of absent or zeroed data)
        stay whole, and so does an exact rewrite of a whole payload not yet
        synced (it is rewritten in place as it is).
        """
        out: list[tuple[int, Buffer]] = []
        single, unsynced, maps_to = self.map.single, self._unsynced, self.map.maps_to
        for offset, data in items:
            nbytes = len(data)
            if nbytes > 4096 and nbytes <= SPLIT_MAX and not (offset | nbytes) & 4095:
                sector = offset >> 9
                loc = single(sector, 8)
                hit = unsynced.get(sector)
                if loc is not None and loc != ZERO and (
                        hit is None or hit[1] != nbytes
                        or not maps_to(sector, nbytes >> 9, hit[0])):
                    mv = memoryview(data)
                    out += [(offset + k, mv[k:k + 4096]) for k in range(0, nbytes, 4096)]
                    continue
            out.append((offset, data))
        return out

    def _revouch(self, failed: Sequence[tuple[Buffer, int, int, int]]) -> None:
        """After in-place rewrites whose data write failed: vouch for what is there.

        Their entries (already written) carry the CRC of data that did not
        land; replay would cut the journal at them and lose every later
        write.  A new IN_PLACE entry per payload, with the CRC of the bytes
        actually there, supersedes each (docs/format.md).  If even that
        fails, the disk is beyond help: the error is logged.
        """
        try:
            for _buffers, loc, sector, count in failed:
                crc = crc32c(self.io.pread(count * SECTOR, loc))
                pos = self._slot_pos()
                self.io.pwrite(self._entry(self.seq + 1, E_DATA, sector, count, loc, crc,
                                           F_IN_PLACE), pos)
                self.seq += 1
                self.slot += 1
                self.entries += 1
        except OSError as exc:
            log.error("%s: a rewrite failed and so did recording what is on disk instead "
                      "(%s); writes after it may be lost in a crash", self.io.path, exc)

    def zero(self, sector: int, count: int) -> None:
        """Record ``count`` sectors as zero (TRIM / WRITE_ZEROES).

        The whole-block payloads it covers become dead, for recycling.
        """
        with self.lock:
            block, floor = self.map.block, self._floor
            first, end = (sector + 7) >> 3, (sector + count) >> 3
            freed = [] if end <= first else [
                loc for loc in map(block, self.map.blocks_in(first << 3, (end - first) << 3))
                if loc is not None and loc >= floor]
            self._append_entry(E_ZERO, sector, count, 0, 0)
            self.map.set(sector, count, ZERO)
            if freed:
                self._bury(freed)

    def sync(self) -> None:
        """Make every entry written so far durable."""
        with self.lock:
            upto = self.seq
            stamped = self._stamped
            self._unsynced.clear()  # from now on their payloads may reach the disk
            self._recycled.clear()
            self._sync_mark = self.end
        self.io.fdatasync()
        with self.lock:
            if upto > self.durable_seq:
                self.durable_seq = upto
            # the entries just synced say everything up to `stamped` was durable
            if stamped > self._recycle_ok:
                self._recycle_ok = stamped

    def write_index(self) -> None:
        """Append a snapshot of the map and point the header at it.

        Done at clean close, so the next open loads the map in one read
        instead of replaying the journal.
        """
        with self.lock:
            if self.seq == self.header.index_seq:
                return
            extents = list(self.map)
            loc = _align(self.end, DATA_ALIGN)
            blob = bytearray(_INDEX_HEAD.pack(len(extents), self.data_bytes, loc))
            for s, n, xloc in extents:
                blob += _INDEX_EXTENT.pack(s, n, xloc)
            blob += bytes(-len(blob) % SECTOR)
            self.io.pwrite(blob, loc)
            self.end = loc + len(blob)
            self._slot_pos()
            area, slot = self.area, self.slot
            self._append_entry(E_INDEX, len(extents), len(blob), loc, crc32c(blob))
            self.sync()
            h = self.header
            h.generation += 1
            h.index_area, h.index_slot, h.index_seq = area, slot, self.seq
            self.io.pwrite(h.encode(), SECTOR * (h.generation % 2))
            self.io.fdatasync()

    # -- reading ---------------------------------------------------------------

    def lookup(self, sector: int, count: int) -> list[tuple[int, int, int | None]]:
        with self.lock:
            return self.map.lookup(sector, count)

    def stats(self) -> Stats:
        with self.lock:
            return Stats(file_bytes=self.io.size(), data_bytes=self.data_bytes,
                         live_bytes=self.map.data_sectors * SECTOR,
                         zero_bytes=self.map.zero_sectors * SECTOR,
                         extents=self.map.extent_count, entries=self.entries)

    def close(self, *, clean: bool = True) -> None:
        if self.io.fd < 0:
            return
        try:
            if clean and self.io.writable:
                try:
                    self.write_index()
                except OSError as exc:  # e.g. a full disk: the journal has everything
                    log.warning("%s: could not write the index snapshot (%s); the next open "
                                "replays the journal", self.io.path, exc.strerror or exc)
                    self.sync()  # the acknowledged writes must still be durable
        finally:
            self.io.close()


def _read_header(io: FileIO, path: str) -> Header:
    raw = io.pread(1024, 0)
    if not raw:
        raise ConfigError(f"{path}: empty file is not a change file")
    if len(raw) >= 512 and raw[504:512] == V1_MAGIC:
        raise ConfigError(f"{path}: version-1 change file (original LBD): open it with "
                          "lbd.layers.changefile_v1")
    if raw[:8] != MAGIC:
        raise ConfigError(f"{path}: not an LBD change file (bad magic)")
    slots = [Header.decode(raw[:512]), Header.decode(raw[512:1024])]
    valid = [h for h in slots if h is not None]
    if not valid:
        raise CorruptionError(f"{path}: both header copies fail their checksum")
    h = max(valid, key=lambda x: x.generation)
    if h.version != VERSION:
        raise ConfigError(f"{path}: change-file version {h.version} is not supported")
    return h


_ZEROS = memoryview(bytes(DATA_ALIGN))
_ZERO_AREA = bytes(AREA_SIZE)
_second = operator.itemgetter(1)
_ONE_BLOCK = {4096}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a
