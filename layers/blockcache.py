"""A bounded in-memory sector cache for the NBD layer: read cache and write-back cache.

The cache holds blocks of :data:`BLOCK` bytes; within a block each 512-byte
sector is tracked by bit masks:

- ``valid``: the cache holds the sector's current contents;
- ``dirty``: written here and not yet written to the remote;
- ``writing``: being written back, or written back but the remote has not
  yet acknowledged a FLUSH after it.  Such a sector is still kept: if the
  connection is lost before the FLUSH, it becomes dirty again.

Blocks with no dirty or writing sector are clean and evicted least recently
used first; dirty data is never evicted, only written back.  All methods are
thread-safe (one lock); no method does I/O.  A read that misses registers a
*fill*; a write or drop overlapping it in the meantime makes the fill stale,
so data read from the remote before a write never lands over it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

SECTOR = 512
BLOCK = 16 * 1024  # small: a random 4 KiB write takes a 16 KiB block
SPB = BLOCK // SECTOR  # sectors per block
FULL = (1 << SPB) - 1

Buffer = bytes | bytearray | memoryview


def _mask(s0: int, s1: int) -> int:
    """Bits for sectors [s0, s1) of a block."""
    return ((1 << (s1 - s0)) - 1) << s0


def _runs(bits: int, s0: int, s1: int, want: bool) -> Iterator[tuple[int, int]]:
    """Runs of sectors in [s0, s1) whose bit is ``want``: (first, end) pairs."""
    x = (bits if want else ~bits) & _mask(s0, s1)
    while x:
        low = x & -x  # the first sector of the next run
        t = x + low  # the carry clears the run and sets the bit just past it
        yield low.bit_length() - 1, (t & -t).bit_length() - 1
        x &= t


class _Block:
    __slots__ = ("data", "dirty", "valid", "writing")

    def __init__(self) -> None:
        self.data = bytearray(BLOCK)
        self.valid = 0
        self.dirty = 0
        self.writing = 0


class _Fill:
    __slots__ = ("end", "stale", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.stale = start, end, False


class BlockCache:
    def __init__(self, capacity: int) -> None:
        self.capacity_blocks = max(2, capacity // BLOCK)
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self._lock = threading.Lock()
        self._fills: list[_Fill] = []
        self.dirty_blocks = 0  # blocks with dirty or writing sectors
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return self.capacity_blocks * BLOCK

    @property
    def size(self) -> int:
        return len(self._blocks) * BLOCK

    def full_of_dirt(self) -> bool:
        """No room, and nothing clean to evict: time to write back."""
        return self.dirty_blocks >= self.capacity_blocks

    # -- reads ----------------------------------------------------------------------

    def lookup(self, offset: int, view: memoryview) -> list[tuple[int, int]]:
        """Copy what the cache holds into ``view``; return the missing (offset, length)."""
        missing: list[tuple[int, int]] = []
        end = offset + len(view)
        with self._lock:
            blocks = self._blocks
            pos = offset
            while pos < end:
                b = pos // BLOCK
                bstart = b * BLOCK
                bend = min(bstart + BLOCK, end)
                blk = blocks.get(b)
                if blk is None:
                    _add(missing, pos, bend - pos)
                    pos = bend
                    continue
                blocks.move_to_end(b)
                s0, s1 = (pos - bstart) // SECTOR, (bend - bstart) // SECTOR
                m = _mask(s0, s1)
                if blk.valid & m == m:
                    view[pos - offset:bend - offset] = blk.data[pos - bstart:bend - bstart]
                else:
                    for a, z in _runs(blk.valid, s0, s1, True):
                        view[bstart + a * SECTOR - offset:bstart + z * SECTOR - offset] = \
                            blk.data[a * SECTOR:z * SECTOR]
                    for a, z in _runs(blk.valid, s0, s1, False):
                        _add(missing, bstart + a * SECTOR, (z - a) * SECTOR)
                pos = bend
            if missing:
                self.misses += 1
            else:
                self.hits += 1
        return missing

    def begin_fill(self, offset: int, length: int) -> _Fill:
        fill = _Fill(offset, offset + length)
        with self._lock:
            self._fills.append(fill)
        return fill

    def end_fill(self, fill: _Fill, data: memoryview | None) -> None:
        """Store clean data read from the remote (None: the read failed)."""
        with self._lock:
            self._fills.remove(fill)
            if data is None or fill.stale:
                return
            pos, end = fill.start, fill.end
            while pos < end:
                b = pos // BLOCK
                bstart = b * BLOCK
                bend = min(bstart + BLOCK, end)
                blk = self._get(b)
                if blk is None:
                    return  # no room (everything dirty): just don't cache
                s0, s1 = (pos - bstart) // SECTOR, (bend - bstart) // SECTOR
                if blk.valid == 0 and s0 == 0 and s1 == SPB:
                    blk.data[:] = data[pos - fill.start:bend - fill.start]
                    blk.valid = FULL
                else:
                    for a, z in _runs(blk.valid, s0, s1, False):
                        blk.data[a * SECTOR:z * SECTOR] = data[
                            bstart + a * SECTOR - fill.start:bstart + z * SECTOR - fill.start]
                    blk.valid |= _mask(s0, s1)
                pos = bend

    def _get(self, b: int) -> _Block | None:
        """The block, made if missing (evicting clean blocks); None if there is no room."""
        blk = self._blocks.get(b)
        if blk is not None:
            self._blocks.move_to_end(b)
            return blk
        if len(self._blocks) >= self.capacity_blocks and not self._evict():
            return None
        blk = self._blocks[b] = _Block()
        return blk

    def _evict(self) -> bool:
        """Drop the least recently used clean block; False if every block is dirty.

        Dirty and writing blocks met on the way go to the back, so the next
        eviction does not walk past them again (they cannot be evicted
        anyway; a write-back leaves them clean, and recently used).
        """
        blocks = self._blocks
        for _ in range(len(blocks)):
            b, blk = next(iter(blocks.items()))
            if not (blk.dirty | blk.writing):
                del blocks[b]
                return True
            blocks.move_to_end(b)
        return False

    def _stale_fills(self, start: int, end: int) -> None:
        for f in self._fills:
            if f.start < end and start < f.end:
                f.stale = True

    # -- writes ----------------------------------------------------------------------

    def write(self, offset: int, buffers: Sequence[Buffer], nbytes: int) -> bool:
        """Store written data as dirty; False (nothing stored) if there is no room."""
        if len(buffers) == 1 and type(buffers[0]) is bytes:
            b = offset // BLOCK
            i = offset - b * BLOCK
            if i + nbytes <= BLOCK:  # the common case, inside one block: less work
                with self._lock:
                    blocks = self._blocks
                    blk = blocks.get(b)
                    if blk is not None:
                        blocks.move_to_end(b)
                    elif len(blocks) < self.capacity_blocks or (
                            self.dirty_blocks < len(blocks) and self._evict()):
                        blk = blocks[b] = _Block()
                    else:
                        return False  # full of dirty data
                    if self._fills:
                        self._stale_fills(offset, offset + nbytes)
                    blk.data[i:i + nbytes] = buffers[0]
                    if not (blk.dirty | blk.writing):
                        self.dirty_blocks += 1
                    m = _mask(i // SECTOR, (i + nbytes) // SECTOR)
                    blk.valid |= m
                    blk.dirty |= m
                return True
        with self._lock:
            end = offset + nbytes
            needed = [b for b in range(offset // BLOCK, (end - 1) // BLOCK + 1)
                      if b not in self._blocks]
            free = self.capacity_blocks - len(self._blocks)
            if len(needed) > free:
                clean = len(self._blocks) - self.dirty_blocks  # blocks with neither
                if len(needed) > free + clean:
                    return False
            self._stale_fills(offset, end)
            pos = offset
            for buf in buffers:
                mv = memoryview(buf).cast("B")
                i = 0
                while i < len(mv):
                    b = pos // BLOCK
                    bstart = b * BLOCK
                    n = min(len(mv) - i, bstart + BLOCK - pos)
                    blk = self._get(b)
                    assert blk is not None  # room was checked above
                    blk.data[pos - bstart:pos - bstart + n] = mv[i:i + n]
                    m = _mask((pos - bstart) // SECTOR, (pos - bstart + n) // SECTOR)
                    if not (blk.dirty | blk.writing):
                        self.dirty_blocks += 1
                    blk.valid |= m
                    blk.dirty |= m
                    pos += n
                    i += n
            return True

    def drop(self, offset: int, length: int) -> None:
        """Forget ``[offset, offset + length)``, dirty or not (it is being zeroed)."""
        end = offset + length
        with self._lock:
            self._stale_fills(offset, end)
            for b in range(offset // BLOCK, (end - 1) // BLOCK + 1):
                blk = self._blocks.get(b)
                if blk is None:
                    continue
                bstart = b * BLOCK
                m = _mask((max(offset, bstart) - bstart) // SECTOR,
                          (min(end, bstart + BLOCK) - bstart) // SECTOR)
                was_dirty = bool(blk.dirty | blk.writing)
                blk.valid &= ~m
                blk.dirty &= ~m
                blk.writing &= ~m
                if was_dirty and not (blk.dirty | blk.writing):
                    self.dirty_blocks -= 1
                if not blk.valid:
                    del self._blocks[b]

    # -- write-back ---------------------------------------------------------------------

    def take_dirty(self) -> list[tuple[int, bytearray]]:
        """Every dirty run as (offset, data copy), merged; they become 'writing'."""
        runs: list[tuple[int, bytearray]] = []
        with self._lock:
            for b in sorted(b for b, blk in self._blocks.items() if blk.dirty):
                blk = self._blocks[b]
                bstart = b * BLOCK
                for a, z in _runs(blk.dirty, 0, SPB, True):
                    off = bstart + a * SECTOR
                    piece = blk.data[a * SECTOR:z * SECTOR]
                    if runs and runs[-1][0] + len(runs[-1][1]) == off:
                        runs[-1][1].extend(piece)
                    else:
                        runs.append((off, bytearray(piece)))
                blk.writing |= blk.dirty
                blk.dirty = 0
        return runs

    def written(self, ok: bool) -> None:
        """The write-back ended: flushed on the remote (ok), or it failed / was lost."""
        with self._lock:
            for blk in self._blocks.values():
                if not blk.writing:
                    continue
                if ok:
                    blk.writing = 0
                    if not blk.dirty:
                        self.dirty_blocks -= 1
                else:
                    blk.dirty |= blk.writing
                    blk.writing = 0

    def dirty_bytes(self) -> int:
        with self._lock:
            return sum((blk.dirty | blk.writing).bit_count() for blk in self._blocks.values()
                       ) * SECTOR

    def held_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The dirty or writing (not yet on the remote for sure) ranges in a range."""
        out: list[tuple[int, int]] = []
        end = offset + length
        with self._lock:
            for b in range(offset // BLOCK, (end - 1) // BLOCK + 1):
                blk = self._blocks.get(b)
                if blk is None or not (blk.dirty | blk.writing):
                    continue
                bstart = b * BLOCK
                s0 = (max(offset, bstart) - bstart) // SECTOR
                s1 = (min(end, bstart + BLOCK) - bstart) // SECTOR
                for a, z in _runs(blk.dirty | blk.writing, s0, s1, True):
                    _add(out, bstart + a * SECTOR, (z - a) * SECTOR)
        return out


def _add(runs: list[tuple[int, int]], offset: int, length: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == offset:
        runs[-1] = (runs[-1][0], runs[-1][1] + length)
    else:
        runs.append((offset, length))
