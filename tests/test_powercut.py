"""Power-cut simulation of the change file through its I/O seam.

Every write, size change and fdatasync the change file issues goes through
``layers/fileio.py``; :class:`RecordingIO` records them.  A *crash state* is
the file as a disk could have left it at some point of that record:
everything up to the last completed sync, plus any subset of the writes
after it, each of them whole, missing, or landed sector by sector (some
sectors, and a torn prefix of one).  Every state is opened and checked:

* it opens (a state from before the file's creation was synced may instead
  report a clear ``LBDError``);
* what it shows is the result of a *prefix* of the operations issued (the
  format's promise: a crash loses a tail, never a piece from the middle),
  and that prefix includes every operation completed before the last sync:
  an acknowledged write, a FUA write and a zeroing are never lost;
* no sector returns bytes that were never written to it (every sector of
  every write carries its write's number and its own sector number);
* opened for writing, a crash state takes new writes, and a second power
  cut during those is checked the same way (recovery must leave nothing
  behind that a later crash could bring back).

``LBD_LONG_TESTS=1`` runs many more seeds and crash points (docs/reliability.md).
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lbd.layers.changefile import AREA_SIZE, AREA_SLOTS, ZERO, ChangeFile
from lbd.layers.fileio import Buffer, FileIO

from lbd.errors import LBDError
from lbd.layer import Identity

SECTOR = 512
SIZE = 8 << 20
SECTORS = SIZE // SECTOR
LONG = os.environ.get("LBD_LONG_TESTS", "") not in ("", "0")
FACTOR = 10 if LONG else 1

Op = tuple[str, int, bytes]  # ("w", offset, data) | ("a", new size, b"") | ("s", 0, b"")

STATS = {"states": 0, "reopened_for_writing": 0, "second_crash_states": 0,
         "recycled_payloads": 0}


class RecordingIO(FileIO):
    """The change file's I/O, recorded in ``RecordingIO.ops`` as it is issued."""

    ops: list[Op] = []

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        RecordingIO.ops.append(("w", offset, b"".join(bytes(b) for b in buffers)))
        super().pwritev(buffers, offset)

    def truncate(self, length: int) -> None:
        RecordingIO.ops.append(("a", length, b""))
        super().truncate(length)

    def fdatasync(self) -> None:
        RecordingIO.ops.append(("s", 0, b""))
        super().fdatasync()

    def fsync(self) -> None:
        RecordingIO.ops.append(("s", 0, b""))
        super().fsync()


_TAG = struct.Struct("<II")


def sector_data(order: int, sector: int) -> bytes:
    """What write number ``order`` puts in device ``sector``: unique, self-describing."""
    return _TAG.pack(order, sector) * (SECTOR // _TAG.size)


@dataclass
class History:
    """The logical operations issued, in journal order, and where they sit in the record.

    ``entries[i] = (start, done, sector, count, is_data)``: the record indices
    before the operation began and after it returned.  ``base`` is the state
    the file started from (a recovered crash state): sector -> order or
    ``"Z"``.  Orders index ``entries``; write ``i`` wrote ``sector_data(i, s)``.
    """

    entries: list[tuple[int, int, int, int, bool]] = field(default_factory=list)
    versions: dict[int, list[tuple[int, bool]]] = field(default_factory=dict)

    def add(self, start: int, done: int, sector: int, count: int, is_data: bool) -> int:
        order = len(self.entries)
        self.entries.append((start, done, sector, count, is_data))
        for s in range(sector, sector + count):
            self.versions.setdefault(s, []).append((order, is_data))
        return order

    def prefix(self, p: int) -> History:
        h = History()
        for _start, _done, sector, count, is_data in self.entries[:p]:
            h.add(-1, -1, sector, count, is_data)  # already on disk, before any new record
        return h


class Workload:
    """Random writes, batches, zeroes, syncs and FUA writes on a recorded change file."""

    def __init__(self, cf: ChangeFile, hist: History, rng: random.Random) -> None:
        self.cf, self.hist, self.rng = cf, hist, rng

    def pick(self) -> tuple[int, int]:
        rng = self.rng
        if rng.random() < 0.4:  # hot spots: rewrites of the same extents (in place)
            return rng.randrange(8) * 64, 8
        return rng.randrange(0, SECTORS - 64), rng.choice([1, 1, 2, 8, 8, 16, 33])

    def payload(self, order: int, sector: int, count: int) -> bytes:
        return b"".join(sector_data(order, sector + i) for i in range(count))

    def write(self, items: list[tuple[int, int]], fua: bool = False) -> None:
        """Write ``(sector, count)`` items in one batch.

        An aligned write of whole 4 KiB blocks may reach the journal as one
        entry per block (a rewrite of synced data, docs/format.md), so a crash
        may keep some of its blocks and not the rest, like a disk: each block
        is a write of its own in the history (a number of its own in its data).
        """
        start = len(RecordingIO.ops)
        parts: list[tuple[int, int]] = []
        batch = []
        for s, n in items:
            pieces = [(s + j, 8) for j in range(0, n, 8)] if n > 8 and not (s | n) % 8 \
                else [(s, n)]
            first = len(self.hist.entries) + len(parts)
            data = b"".join(self.payload(first + i, ps, pn) for i, (ps, pn) in enumerate(pieces))
            parts += pieces
            batch.append((s, [data], n * SECTOR))
        if len(batch) == 1 and self.rng.random() < 0.5:
            self.cf.write(batch[0][0], batch[0][1], batch[0][2])
        else:
            self.cf.write_batch(batch)
        if fua:
            self.cf.sync()
        done = len(RecordingIO.ops)
        for s, n in parts:
            self.hist.add(start, done, s, n, True)

    def zero(self, sector: int, count: int, fua: bool = False) -> None:
        start = len(RecordingIO.ops)
        self.cf.zero(sector, count)
        if fua:
            self.cf.sync()
        self.hist.add(start, len(RecordingIO.ops), sector, count, False)

    # the mix: below each bound, in turn, a write, a batch (of up to BATCH
    # writes), a FUA write, a zeroing; then a sync, and (above the last) a
    # close and reopen
    MIX = (0.55, 0.65, 0.72, 0.82, 0.97)
    BATCH = 7

    def run(self, n_ops: int, *, reopen: str | None = None) -> None:
        rng = self.rng
        one, batch, fua, zero, sync = self.MIX
        for _ in range(n_ops):
            r = rng.random()
            if r < one:
                self.write([self.pick()])
            elif r < batch:
                self.write([self.pick() for _ in range(rng.randrange(2, self.BATCH))])
            elif r < fua:
                self.write([self.pick()], fua=True)
            elif r < zero:
                self.zero(*self.pick(), fua=rng.random() < 0.2)
            elif r < sync or reopen is None:
                self.cf.sync()
            else:  # a clean (index snapshot, header update) or unclean close, and reopen
                self.cf.close(clean=rng.random() < 0.7)
                self.cf = ChangeFile.open(reopen, writable=True, io_factory=RecordingIO)


Image = tuple[int, list[tuple[int, bytes]]]  # file size, writes in order


def build_state(ops: list[Op], crash_at: int, rng: random.Random,
                base: Image = (0, [])) -> tuple[Image, int]:
    """The file after a power cut once ``ops[:crash_at]`` were issued; and the last sync."""
    last_sync = max((i for i in range(crash_at) if ops[i][0] == "s"), default=-1)
    size = base[0]
    writes = list(base[1])

    def land(off: int, data: bytes) -> None:
        nonlocal size
        if data:
            writes.append((off, data))
            size = max(size, off + len(data))

    for kind, off, data in ops[:last_sync + 1]:
        if kind == "a":
            size = max(size, off)
        elif kind == "w":
            land(off, data)
    mode = rng.random()  # how chaotic this disk is after the sync
    for kind, off, data in ops[last_sync + 1:crash_at]:
        roll = rng.random()
        if kind == "a":
            if roll < 0.7:
                size = max(size, off)
        elif kind != "w":
            continue
        elif roll < 0.35 + mode * 0.3:
            land(off, data)  # the whole write landed
        elif roll < 0.6:
            pass  # none of it
        elif roll < 0.8:  # a prefix, torn inside a sector
            land(off, data[:rng.randrange(len(data) + 1)])
        else:  # sector by sector, in any order: some landed, one may be torn
            for pos in range(0, len(data), SECTOR):
                r2 = rng.random()
                if r2 < 0.5:
                    land(off + pos, data[pos:pos + SECTOR])
                elif r2 < 0.6:
                    land(off + pos, data[pos:pos + rng.randrange(SECTOR)])
    return (size, writes), last_sync


def write_image(img: Image, path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(img[0])
        for off, data in img[1]:
            f.seek(off)
            f.write(data)


def observe(cf: ChangeFile) -> dict[int, int | str]:
    """Every sector the change file holds: the write order found there, or "Z"."""
    seen: dict[int, int | str] = {}
    for s, n, loc in list(cf.map):
        if loc == ZERO:
            for i in range(n):
                seen[s + i] = "Z"
            continue
        raw = cf.io.pread(n * SECTOR, loc)
        for i in range(n):
            chunk = raw[i * SECTOR:(i + 1) * SECTOR]
            order, sec = _TAG.unpack_from(chunk)
            if sec != s + i or chunk != sector_data(order, sec):
                raise AssertionError(f"sector {s + i} holds bytes never written to it "
                                     f"(tag {order}/{sec}, file offset {loc + i * SECTOR})")
            seen[s + i] = order
    return seen


def _span(lo: int, hi: int) -> int:
    """A bit mask of the prefixes lo..hi (inclusive)."""
    return 0 if hi < lo else ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


def check_prefix(seen: dict[int, int | str], hist: History, n_durable: int,
                 n_issued: int) -> int:
    """The prefix length ``p`` of ``hist`` whose result is ``seen``; AssertionError if none.

    ``p`` must lie in ``[n_durable, n_issued]``: every operation completed
    before the last sync is in, nothing not yet issued is.
    """
    allowed = _span(n_durable, n_issued)
    for sector, got in seen.items():
        if sector not in hist.versions:
            raise AssertionError(f"sector {sector} was never written but holds {got}")
    for sector, vs in hist.versions.items():
        got = seen.get(sector, "A")
        mask = 0
        if got == "A":
            mask = _span(0, vs[0][0])
        else:
            for j, (order, is_data) in enumerate(vs):
                if (got == order and is_data) or (got == "Z" and not is_data):
                    nxt = vs[j + 1][0] if j + 1 < len(vs) else n_issued
                    mask |= _span(order + 1, nxt)
            if not mask and isinstance(got, int):
                raise AssertionError(f"sector {sector} holds write #{got}, which never "
                                     "wrote it")
        allowed &= mask
        if not allowed:
            durable = [v for v in vs if v[0] < n_durable]
            raise AssertionError(
                f"sector {sector} shows {got}: no crash keeps it with the other sectors "
                f"(versions {vs[-6:]}, the last before the sync: "
                f"{durable[-1] if durable else 'none'}, durable prefix {n_durable}, "
                f"issued {n_issued})")
    return allowed.bit_length() - 1  # the longest prefix that fits


def counts(hist: History, last_sync: int, crash_at: int) -> tuple[int, int]:
    n_durable = sum(1 for _, done, *_ in hist.entries if done <= last_sync)
    n_issued = sum(1 for start, *_ in hist.entries if start < crash_at)
    return n_durable, n_issued


def check_state(img: Image, path: str, hist: History, last_sync: int, crash_at: int,
                *, created_synced: bool = True) -> int | None:
    """Open a crash state read-only and check it; the prefix it shows (None: no file)."""
    write_image(img, path)
    try:
        cf = ChangeFile.open(path, writable=False)
    except LBDError as exc:
        if not created_synced and last_sync < 0:
            return None  # the creation itself never reached the disk: a clear error
        raise AssertionError(f"a crash state after a completed sync does not open: {exc}") \
            from exc
    try:
        STATS["states"] += 1
        p = check_prefix(observe(cf), hist, *counts(hist, last_sync, crash_at))
    finally:
        cf.close(clean=False)
    # every payload still served checks out (lbd-inspect --check): a crash
    # never leaves data that only looks corrupt, recycled space included
    ChangeFile.open(path, writable=False, verify=True, use_index=False).close(clean=False)
    return p


def second_crash(tmp_path: Path, img: Image, hist: History, p: int, seed: int,
                 n_ops: int, n_states: int) -> None:
    """Open a crash state for writing, go on writing, and cut the power again."""
    path = str(tmp_path / f"again-{seed}.lbd")
    write_image(img, path)
    RecordingIO.ops = []
    cf = ChangeFile.open(path, writable=True, io_factory=RecordingIO)
    STATS["reopened_for_writing"] += 1
    hist2 = hist.prefix(p)
    # opening for writing must not change what the file shows
    check_prefix(observe(cf), hist2, p, p)
    rng = random.Random(seed)
    wl = Workload(cf, hist2, rng)
    wl.run(n_ops, reopen=path)
    wl.cf.close(clean=rng.random() < 0.5)
    ops = RecordingIO.ops
    # the disk as the reopen found it: the crash image (all of it on the disk)
    target = str(tmp_path / "crash2.lbd")
    for _ in range(n_states):
        k = rng.randrange(0, len(ops) + 1)
        img2, last = build_state(ops, k, rng, base=img)
        check_state(img2, target, hist2, last, k)
        STATS["second_crash_states"] += 1


def powercut_run(tmp_path: Path, seed: int, n_ops: int, n_states: int, n_again: int) -> int:
    """Check ``n_states`` crash states of one workload; how many opened and were checked."""
    src = str(tmp_path / "src.lbd")
    RecordingIO.ops = []
    rng = random.Random(seed)
    hist = History()
    wl = Workload(ChangeFile.create(src, SIZE, Identity(), io_factory=RecordingIO), hist, rng)
    wl.run(n_ops, reopen=src)
    wl.cf.close(clean=rng.random() < 0.5)
    ops = list(RecordingIO.ops)
    first_sync = next(i for i, op in enumerate(ops) if op[0] == "s")
    target = str(tmp_path / "crash.lbd")
    again = set(rng.sample(range(n_states), n_again))
    checked = 0
    for j in range(n_states):
        k = rng.randrange(1, len(ops) + 1)
        img, last = build_state(ops, k, rng)
        p = check_state(img, target, hist, last, k, created_synced=k > first_sync)
        checked += p is not None
        if j in again and p is not None:
            second_crash(tmp_path, img, hist, p, seed * 1000 + j, n_ops=60, n_states=25)
    return checked


SEEDS = range(1, 9 * FACTOR + 1)


@pytest.fixture(scope="module", autouse=True)
def report_figures():  # type: ignore[no-untyped-def]
    """How many crash states this module checked (for docs/reliability.md; see -s)."""
    yield
    print(f"\npower-cut crash states checked: {STATS}")


@pytest.mark.parametrize("seed", SEEDS)
def test_power_cut_states(tmp_path: Path, seed: int) -> None:
    assert powercut_run(tmp_path, seed, n_ops=250, n_states=500, n_again=4) > 450


def crossing_workload(path: str, hist: History, rng: random.Random, n: int,
                      zeros: bool) -> ChangeFile:
    cf = ChangeFile.create(path, SIZE, Identity(), io_factory=RecordingIO)
    wl = Workload(cf, hist, rng)
    for i in range(n):
        if zeros and i > AREA_SLOTS - 60:
            wl.zero(rng.randrange(SECTORS - 8), rng.choice([1, 8]))  # no payload
        else:
            wl.write([(i * 3 % (SECTORS - 1), 1)])
        if (i % 97 == 0 and i < AREA_SLOTS - 60) or (zeros and cf.slot == AREA_SLOTS - 1):
            cf.sync()  # with zeros: synced right up to the NEXT entry
    return cf


@pytest.mark.parametrize("zeros", [False, True])
def test_power_cut_across_a_journal_area_boundary(tmp_path: Path, zeros: bool) -> None:
    """1100 one-sector operations cross from the first journal area into the next,
    every crash point around the NEXT entry; each state then takes new writes
    across the same boundary and loses power again.

    With ``zeros`` the operations near the boundary carry no payload, so the
    area a recovered file opens next is where the lost one was: a stale
    entry there must never be replayed after the second cut.
    """
    src = str(tmp_path / "src.lbd")
    RecordingIO.ops = []
    rng = random.Random(5)
    hist = History()
    crossing_workload(src, hist, rng, 1100, zeros).close(clean=False)
    ops = list(RecordingIO.ops)
    # the new area is written as zeros just before the NEXT entry points to it
    next_idx = next(i for i, op in enumerate(ops)
                    if op[0] == "w" and len(op[2]) == AREA_SIZE and not op[2].strip(b"\0"))
    target = str(tmp_path / "crash.lbd")
    for k in range(next_idx - 40, min(len(ops), next_idx + 60)):
        for rep in range(3 * FACTOR):
            img, last = build_state(ops, k, rng)
            p = check_state(img, target, hist, last, k)
            assert p is not None
            if rep == 0 and k % 4 == 0:
                again_across_the_boundary(tmp_path, img, hist, p, rng)


def again_across_the_boundary(tmp_path: Path, img: Image, hist: History, p: int,
                              rng: random.Random) -> None:
    path = str(tmp_path / "again.lbd")
    write_image(img, path)
    RecordingIO.ops = []
    cf = ChangeFile.open(path, writable=True, io_factory=RecordingIO)
    hist2 = hist.prefix(p)
    wl = Workload(cf, hist2, rng)
    # as many zero entries as it takes to open the next area, a few in it, then a sync
    while cf.slot < AREA_SLOTS - 1 and cf.area == cf.header.journal_start:
        wl.zero(rng.randrange(SECTORS - 8), 1)
    for _ in range(3):
        wl.zero(rng.randrange(SECTORS - 8), 1)
    cf.sync()
    wl.write([(7, 1)])
    cf.close(clean=False)
    ops = RecordingIO.ops
    for k in range(len(ops) - 6, len(ops) + 1):
        img2, last = build_state(ops, k, rng, base=img)
        check_state(img2, str(tmp_path / "crash2.lbd"), hist2, last, k)


class RecyclingWorkload(Workload):
    """Rewrites of a few hot blocks and 8 or 16 KiB pages between frequent
    syncs: rewrites of synced data go into recycled dead payloads, block by
    block (docs/format.md); a few partial writes and zeroes of the same
    blocks take blocks out of the block dict and back."""

    def pick(self) -> tuple[int, int]:
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            return rng.randrange(12) * 8, 8
        if r < 0.9:
            return rng.randrange(6) * 16, rng.choice([16, 32])
        return rng.randrange(12 * 8), rng.choice([1, 3, 8])

    MIX = (0.5, 0.7, 0.75, 0.8, 1.0)  # zeroes free whole blocks for recycling too
    BATCH = 9


@pytest.mark.parametrize("seed", range(1, 4 * FACTOR + 1))
def test_power_cut_while_recycling_dead_payloads(tmp_path: Path, seed: int) -> None:
    """Crash states of a file whose rewrites reuse dead space: every state shows a
    prefix that keeps each synced write (a recycled payload is never one a
    crash could bring back), and its live payloads all pass their checksums."""
    src = str(tmp_path / "src.lbd")
    RecordingIO.ops = []
    rng = random.Random(seed)
    hist = History()
    cf = ChangeFile.create(src, SIZE, Identity(), io_factory=RecordingIO)
    wl = RecyclingWorkload(cf, hist, rng)
    wl.run(400)
    STATS["recycled_payloads"] += cf.recycled_bytes // 4096
    assert cf.recycled_bytes >= 100 * 4096, cf.recycled_bytes  # it did recycle
    # far less than one new payload per rewrite (the partial writes still append)
    rewritten = sum(n * SECTOR for *_, n, d in hist.entries if d and n in (8, 16, 32))
    assert cf.end < rewritten // 2, (cf.end, rewritten)
    cf.close(clean=False)
    ops = list(RecordingIO.ops)
    first_sync = next(i for i, op in enumerate(ops) if op[0] == "s")
    target = str(tmp_path / "crash.lbd")
    again = set(rng.sample(range(300), 3))
    for j in range(300):
        k = rng.randrange(1, len(ops) + 1)
        img, last = build_state(ops, k, rng)
        p = check_state(img, target, hist, last, k, created_synced=k > first_sync)
        if j in again and p is not None:
            second_crash(tmp_path, img, hist, p, seed * 1000 + j, n_ops=60, n_states=25)
