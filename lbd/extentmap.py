"""A sector-granular map from device sectors to where their contents live.

Each sector is in one of three states: absent (not in this map; the layer
below answers), zero (reads as zeros, no data stored) or data (stored at a
byte offset in a file).  A data extent maps device sectors ``[s, s + n)`` to
file bytes ``[loc, loc + n * 512)``; a zero extent has ``loc == ZERO``.

The map is split into chunks of :data:`CHUNK_SECTORS` sectors held in a dict,
each chunk a short sorted list of extents, so lookups and updates cost a dict
probe plus a bisect over a small list, and memory is proportional to what was
written, never to the device size.  Extents never cross a chunk boundary.

Whole 4 KiB blocks (8 sectors starting at a multiple of 8: what file systems
and most clients write) are kept apart in a plain dict, block -> location
(a set of one cuts the block out of its chunk's extents first): setting,
reading or checking one costs a dict operation instead of a bisect and three
list inserts, and :meth:`ExtentMap.block` tells where a block written whole
lives.  The two never overlap: a set that is not a whole block first moves
("demotes") the blocks it touches into their chunks.
Queries, the counters and iteration cover both and move nothing (lookups of
larger ranges merge contiguous blocks on the fly).  The dict holds at most
:data:`BLOCKS_MAX` blocks (2 GiB of 4 KiB writes, ~50 MiB of memory); past
that, new blocks go to the chunks, which merge contiguous writes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator

ZERO = -1
MIXED = -2  # ExtentMap.single: the range is not one thing
CHUNK_SHIFT = 11
CHUNK_SECTORS = 1 << CHUNK_SHIFT  # 1 MiB of 512-byte sectors
SECTOR = 512
BLOCKS_MAX = 1 << 19  # whole blocks kept in the dict at most


class _Chunk:
    __slots__ = ("ends", "locs", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.locs: list[int] = []


class ExtentMap:
    """Sector ranges -> ``ZERO`` or a file byte offset."""

    def __init__(self) -> None:
        self._chunks: dict[int, _Chunk] = {}
        self._blocks: dict[int, int] = {}  # whole 4 KiB blocks no chunk extent overlaps
        # block(b): the location of 4 KiB block b if the block dict holds it
        # (a bound dict.get: the write path calls it per write).  Only
        # set(b * 8, 8, loc) puts a block there, so for a caller that sets
        # each payload it writes with one call, a location here is the whole
        # payload of one 8-sector write (the change file's in-place rewrites
        # rely on that).
        self.block: Callable[[int], int | None] = self._blocks.get
        self.data_sectors = 0  # sectors in the data state (chunks and blocks)
        self.zero_sectors = 0  # sectors in the zero state
        self._extent_count = 0  # extents in the chunks

    @property
    def extent_count(self) -> int:
        """Extents in the map (a whole block kept apart counts as one)."""
        return self._extent_count + len(self._blocks)

    def _demote(self, start: int, count: int) -> None:
        """Move the blocks overlapping ``[start, start + count)`` into their chunks."""
        blocks = self._blocks
        found = self.blocks_in(start, count)
        for b in found:
            loc = blocks.pop(b)
            if loc == ZERO:
                self.zero_sectors -= 8
            else:
                self.data_sectors -= 8
            s = b << 3
            self._set_in_chunk(s >> CHUNK_SHIFT, s, s + 8, loc)

    # -- queries ---------------------------------------------------------

    def lookup(self, start: int, count: int) -> list[tuple[int, int, int | None]]:
        """Cover ``[start, start + count)`` with ``(start, count, loc)`` runs.

        ``loc`` is a file byte offset, :data:`ZERO`, or ``None`` for absent.
        Adjacent runs are merged when their locations are contiguous.
        """
        blocks = self._blocks
        if blocks:
            b = start >> 3
            if b == (start + count - 1) >> 3:
                loc = blocks.get(b)
                if loc is not None:
                    return [(start, count,
                             loc if loc == ZERO else loc + (start - (b << 3)) * SECTOR)]
            elif self.blocks_in(start, count):
                return self._lookup_merged(start, count)
        return self._lookup_chunks(start, count)

    def _lookup_chunks(self, start: int, count: int) -> list[tuple[int, int, int | None]]:
        end = start + count
        chunks = self._chunks
        cidx = start >> CHUNK_SHIFT
        if (end - 1) >> CHUNK_SHIFT == cidx:
            # fast path: the range is inside one chunk and one extent (or none)
            chunk = chunks.get(cidx)
            if chunk is None:
                return [(start, count, None)]
            starts = chunk.starts
            i = bisect_right(starts, start) - 1
            if i >= 0 and chunk.ends[i] >= end:
                loc = chunk.locs[i]
                return [(start, count, loc if loc == ZERO else loc + (start - starts[i]) * SECTOR)]
            if (i < 0 or chunk.ends[i] <= start) and (i + 1 >= len(starts)
                                                     or starts[i + 1] >= end):
                return [(start, count, None)]
        out: list[tuple[int, int, int | None]] = []
        pos = start
        while pos < end:
            cidx = pos >> CHUNK_SHIFT
            cend = min(end, (cidx + 1) << CHUNK_SHIFT)
            chunk = chunks.get(cidx)
            if chunk is None:
                _append(out, pos, cend - pos, None)
                pos = cend
                continue
            starts, ends, locs = chunk.starts, chunk.ends, chunk.locs
            i = bisect_right(starts, pos) - 1
            if i < 0 or ends[i] <= pos:
                i += 1
            n = len(starts)
            while pos < cend:
                if i >= n or starts[i] >= cend:
                    _append(out, pos, cend - pos, None)
                    pos = cend
                    break
                s = starts[i]
                if s > pos:
                    _append(out, pos, s - pos, None)
                    pos = s
                e = min(ends[i], cend)
                loc = locs[i]
                if loc != ZERO:
                    loc += (pos - s) * SECTOR
                _append(out, pos, e - pos, loc)
                pos = e
                i += 1
        return out

    def blocks_in(self, start: int, count: int) -> list[int]:
        """The blocks of the dict that overlap ``[start, start + count)``, in order."""
        blocks = self._blocks
        b0 = start >> 3
        b1 = (start + count + 7) >> 3
        if b1 - b0 <= len(blocks):
            return [b for b in range(b0, b1) if b in blocks]
        return sorted(b for b in blocks if b0 <= b < b1)

    def _lookup_merged(self, start: int, count: int) -> list[tuple[int, int, int | None]]:
        """:meth:`lookup` of a range the block dict has a part of (nothing moves)."""
        blocks = self._blocks
        end = start + count
        out: list[tuple[int, int, int | None]] = []
        pos = start
        for b in self.blocks_in(start, count):
            s = max(b << 3, start)
            if s > pos:  # the chunks answer between the blocks
                for run in self._lookup_chunks(pos, s - pos):
                    _append(out, *run)
            e = min((b << 3) + 8, end)
            loc = blocks[b]
            _append(out, s, e - s, loc if loc == ZERO else loc + (s - (b << 3)) * SECTOR)
            pos = e
        if pos < end:
            for run in self._lookup_chunks(pos, end - pos):
                _append(out, *run)
        return out

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """All extents in sector order, as ``(start, count, loc)``."""
        chunks = self._chunks
        by_chunk: dict[int, list[int]] = {}
        for b in sorted(self._blocks):
            by_chunk.setdefault((b << 3) >> CHUNK_SHIFT, []).append(b)
        blocks = self._blocks
        for cidx in sorted(chunks.keys() | by_chunk.keys()):
            c = chunks.get(cidx)
            ext = [] if c is None else zip(c.starts, c.ends, c.locs)
            bl = by_chunk.get(cidx, ())
            if not bl:
                for s, e, loc in ext:
                    yield s, e - s, loc
                continue
            k = 0
            for s, e, loc in ext:
                while k < len(bl) and bl[k] << 3 < s:
                    yield bl[k] << 3, 8, blocks[bl[k]]
                    k += 1
                yield s, e - s, loc
            for b in bl[k:]:
                yield b << 3, 8, blocks[b]

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """Like iteration, with contiguous neighbours merged.

        Two maps that send every sector to the same place give the same runs,
        however their extents happen to be split (a replayed journal and a
        snapshot of the live map may split them differently).
        """
        prev: tuple[int, int, int] | None = None
        for s, n, loc in self:
            if prev is not None and prev[0] + prev[1] == s and _joins(
                    prev[0], prev[0] + prev[1], prev[2], loc):
                prev = (prev[0], prev[1] + n, prev[2])
                continue
            if prev is not None:
                yield prev
            prev = (s, n, loc)
        if prev is not None:
            yield prev

    def data_extents(self) -> Iterator[tuple[int, int, int]]:
        return ((s, n, loc) for s, n, loc in self if loc != ZERO)

    # -- updates ---------------------------------------------------------

    def set(self, start: int, count: int, loc: int) -> None:
        """Map ``[start, start + count)`` to ``loc`` (``ZERO`` or a byte offset)."""
        blocks = self._blocks
        if count == 8 and not start & 7:
            b = start >> 3
            old = blocks.get(b)
            if old is None:
                if len(blocks) < BLOCKS_MAX:
                    cidx = start >> CHUNK_SHIFT
                    chunk = self._chunks.get(cidx)
                    if chunk is not None and not _clear(chunk, start, start + 8):
                        self._drop_in_chunk(cidx, start, start + 8)  # the block replaces it
                    blocks[b] = loc
                    if loc == ZERO:
                        self.zero_sectors += 8
                    else:
                        self.data_sectors += 8
                    return
            else:
                blocks[b] = loc
                if old == ZERO:
                    if loc != ZERO:
                        self.zero_sectors -= 8
                        self.data_sectors += 8
                elif loc == ZERO:
                    self.data_sectors -= 8
                    self.zero_sectors += 8
                return
        elif blocks:
            self._demote(start, count)
        end = start + count
        cidx = start >> CHUNK_SHIFT
        if (end - 1) >> CHUNK_SHIFT == cidx:
            self._set_in_chunk(cidx, start, end, loc)
            return
        pos = start
        while pos < end:
            cidx = pos >> CHUNK_SHIFT
            cend = min(end, (cidx + 1) << CHUNK_SHIFT)
            piece_loc = loc if loc == ZERO else loc + (pos - start) * SECTOR
            self._set_in_chunk(cidx, pos, cend, piece_loc)
            pos = cend

    def set_many(self, runs: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """:meth:`set` each ``(start, count, loc)`` in order (a batch of writes).

        Returns the whole blocks among them that did not go to the block
        dict (it was full), for callers that track those themselves.
        """
        blocks = self._blocks
        get = blocks.get
        chunks = self._chunks
        missed: list[tuple[int, int, int]] = []
        data = zero = 0  # counter changes of the fast paths, added at the end
        for start, count, loc in runs:
            if count == 8 and not start & 7 and loc != ZERO:
                b = start >> 3
                old = get(b)
                if old is not None:
                    blocks[b] = loc
                    if old == ZERO:
                        zero -= 8
                        data += 8
                    continue
                if len(blocks) < BLOCKS_MAX and start >> CHUNK_SHIFT not in chunks:
                    blocks[b] = loc
                    data += 8
                    continue
                self.set(start, count, loc)
                if get(b) != loc:
                    missed.append((start, count, loc))
                continue
            self.set(start, count, loc)
        self.data_sectors += data
        self.zero_sectors += zero
        return missed

    def single(self, start: int, count: int) -> int | None:
        """What ``[start, start + count)`` is, when it is one thing (reads' hot path).

        ``None`` if all absent, :data:`ZERO` if all zero, the file offset if
        all one piece of data, :data:`MIXED` otherwise (use :meth:`lookup`).
        """
        end = start + count
        blocks = self._blocks
        if blocks:
            b = start >> 3
            if b == (end - 1) >> 3:
                loc = blocks.get(b)
                if loc is not None:
                    return loc if loc == ZERO else loc + (start - (b << 3)) * SECTOR
            elif self.blocks_in(start, count):
                runs = self._lookup_merged(start, count)
                return runs[0][2] if len(runs) == 1 else MIXED
        if (end - 1) >> CHUNK_SHIFT != start >> CHUNK_SHIFT:
            return MIXED
        chunk = self._chunks.get(start >> CHUNK_SHIFT)
        if chunk is None:
            return None
        starts = chunk.starts
        i = bisect_right(starts, start) - 1
        if i >= 0 and chunk.ends[i] >= end:
            loc = chunk.locs[i]
            return loc if loc == ZERO else loc + (start - starts[i]) * SECTOR
        if (i < 0 or chunk.ends[i] <= start) and (i + 1 >= len(starts) or starts[i + 1] >= end):
            return None
        return MIXED

    def maps_to(self, start: int, count: int, loc: int) -> bool:
        """Do sectors ``[start, start + count)`` map to data at file offset ``loc``?"""
        blocks = self._blocks
        if blocks:
            b = start >> 3
            if b == (start + count - 1) >> 3:
                xloc = blocks.get(b)
                if xloc is not None:
                    return xloc != ZERO and xloc + (start - (b << 3)) * SECTOR == loc
            elif self.blocks_in(start, count):
                return self.single(start, count) == loc and loc != ZERO
        chunk = self._chunks.get(start >> CHUNK_SHIFT)
        if chunk is None:
            return False
        i = bisect_right(chunk.starts, start) - 1
        if i < 0 or chunk.ends[i] < start + count:
            return False
        xloc = chunk.locs[i]
        return xloc != ZERO and xloc + (start - chunk.starts[i]) * SECTOR == loc

    def _set_in_chunk(self, cidx: int, s: int, e: int, loc: int) -> int:
        chunk = self._chunks.get(cidx)
        if chunk is None:
            chunk = self._chunks[cidx] = _Chunk()
        starts, ends, locs = chunk.starts, chunk.ends, chunk.locs
        n = len(starts)
        i = bisect_right(starts, s) - 1
        # fast paths (the common random-write cases): the range exactly
        # replaces one extent, or falls in a gap, and joins no neighbour
        if i >= 0 and starts[i] == s and ends[i] == e:
            if not ((i > 0 and ends[i - 1] == s and _joins(starts[i - 1], s, locs[i - 1], loc))
                    or (i + 1 < n and starts[i + 1] == e and _joins(s, e, loc, locs[i + 1]))):
                old = locs[i]
                locs[i] = loc
                if old == ZERO:
                    self.zero_sectors -= e - s
                    replaced = 0
                else:
                    self.data_sectors -= e - s
                    replaced = e - s
                if loc == ZERO:
                    self.zero_sectors += e - s
                else:
                    self.data_sectors += e - s
                return replaced
        elif (i < 0 or ends[i] <= s) and (i + 1 >= n or starts[i + 1] >= e):
            if not ((i >= 0 and ends[i] == s and _joins(starts[i], s, locs[i], loc))
                    or (i + 1 < n and starts[i + 1] == e and _joins(s, e, loc, locs[i + 1]))):
                starts.insert(i + 1, s)
                ends.insert(i + 1, e)
                locs.insert(i + 1, loc)
                self._extent_count += 1
                if loc == ZERO:
                    self.zero_sectors += e - s
                else:
                    self.data_sectors += e - s
                return 0
        # first extent that ends after s
        if i < 0 or ends[i] <= s:
            i += 1
        j = i
        new_s: list[int] = []
        new_e: list[int] = []
        new_l: list[int] = []
        replaced = 0
        while j < n and starts[j] < e:
            os_, oe, ol = starts[j], ends[j], locs[j]
            ov_s, ov_e = max(os_, s), min(oe, e)
            if ol == ZERO:
                self.zero_sectors -= ov_e - ov_s
            else:
                replaced += ov_e - ov_s
                self.data_sectors -= ov_e - ov_s
            if os_ < s:  # keep the head of the old extent
                new_s.append(os_)
                new_e.append(s)
                new_l.append(ol)
            j += 1
        new_s.append(s)
        new_e.append(e)
        new_l.append(loc)
        if j > i:
            os_, oe, ol = starts[j - 1], ends[j - 1], locs[j - 1]
            if oe > e:  # keep the tail of the last overlapped extent
                new_s.append(e)
                new_e.append(oe)
                new_l.append(ol if ol == ZERO else ol + (e - os_) * SECTOR)
        # merge with neighbours when contiguous
        if i > 0 and ends[i - 1] == new_s[0] and _joins(starts[i - 1], ends[i - 1], locs[i - 1],
                                                         new_l[0]):
            i -= 1
            new_s[0] = starts[i]
            new_l[0] = locs[i]
        if j < n and new_e[-1] == starts[j] and _joins(new_s[-1], new_e[-1], new_l[-1], locs[j]):
            new_e[-1] = ends[j]
            j += 1
        self._extent_count += len(new_s) - (j - i)
        starts[i:j] = new_s
        ends[i:j] = new_e
        locs[i:j] = new_l
        if loc == ZERO:
            self.zero_sectors += e - s
        else:
            self.data_sectors += e - s
        return replaced

    def discard(self, start: int, count: int) -> None:
        """Make ``[start, start + count)`` absent again (used by tools)."""
        if self._blocks:
            self._demote(start, count)
        pos, end = start, start + count
        while pos < end:
            cidx = pos >> CHUNK_SHIFT
            cend = min(end, (cidx + 1) << CHUNK_SHIFT)
            self._drop_in_chunk(cidx, pos, cend)
            pos = cend

    def _drop_in_chunk(self, cidx: int, pos: int, cend: int) -> None:
        """Make ``[pos, cend)``, inside chunk ``cidx``, absent in the chunk."""
        self._set_in_chunk(cidx, pos, cend, ZERO)  # one extent, then drop it
        chunk = self._chunks[cidx]
        i = bisect_right(chunk.starts, pos) - 1
        s, e = chunk.starts[i], chunk.ends[i]
        pieces = [(a, b) for a, b in ((s, pos), (cend, e)) if b > a]
        chunk.starts[i:i + 1] = [a for a, _ in pieces]
        chunk.ends[i:i + 1] = [b for _, b in pieces]
        chunk.locs[i:i + 1] = [ZERO] * len(pieces)
        self._extent_count += len(pieces) - 1
        self.zero_sectors -= cend - pos
        if not chunk.starts:
            del self._chunks[cidx]


def _clear(chunk: _Chunk, s: int, e: int) -> bool:
    """Does no extent of ``chunk`` overlap ``[s, e)``?"""
    starts = chunk.starts
    i = bisect_right(starts, s) - 1
    return (i < 0 or chunk.ends[i] <= s) and (i + 1 >= len(starts) or starts[i + 1] >= e)


def _joins(s: int, e: int, loc: int, next_loc: int) -> bool:
    if loc == ZERO or next_loc == ZERO:
        return loc == next_loc
    return loc + (e - s) * SECTOR == next_loc


def _append(out: list[tuple[int, int, int | None]], s: int, n: int, loc: int | None) -> None:
    if out:
        ps, pn, pl = out[-1]
        if ps + pn == s and (
            (pl is None and loc is None)
            or (pl == ZERO and loc == ZERO)
            or (pl is not None and loc is not None and pl >= 0 and loc >= 0
                and pl + pn * SECTOR == loc)
        ):
            out[-1] = (ps, pn + n, pl)
            return
    out.append((s, n, loc))
